import json
import os
import re
import subprocess
import sys

import pytest
import torch

import lems_core.compression as compression
from lems_core import safe_io
from lems_core.budget import force_factorised
from lems_core.compression import (RANKS_FILE, WEIGHTS_FILE, CompressedModelError, LowRankLinear, compress_model,
                                   count_parameters, load_compressed, save_compressed)
from lems_core.decompositions import Decomposer
from lems_core.model import compressible_layers, tiny_model

from helpers import error_within


def _factor_fn(model):
    decomposer = Decomposer("svd")
    return lambda layer: decomposer(layer, model.get_submodule(layer.name).weight)


def test_low_rank_pair_reproduces_the_truncated_weight():
    model = tiny_model("llama", seed=2)
    layer = compressible_layers(model)[0]
    factors = _factor_fn(model)(layer)
    compress_model(model, {layer.name: 5}, lambda l: factors)
    module = model.get_submodule(layer.name)
    assert isinstance(module, LowRankLinear) and module.rank == 5
    x = torch.randn(3, layer.in_features)
    assert torch.allclose(module(x), x @ factors.weight(5).T, atol=1e-5)


def test_break_even_rank_keeps_layer_dense_and_params_shrink():
    model = tiny_model("llama", seed=2)
    layers = compressible_layers(model)
    dense = count_parameters(model)
    ranks = {l.name: (l.eq_rank if l.kind == "q" else 4) for l in layers}
    applied = compress_model(model, ranks, _factor_fn(model))
    assert all(applied[l.name] is None for l in layers if l.kind == "q")
    assert isinstance(model.get_submodule(layers[0].name), torch.nn.Linear)
    expected = dense - sum(l.params - l.rank_params(4) for l in layers if l.kind != "q")
    assert count_parameters(model) == expected


def test_unknown_layers_are_rejected_before_any_change():
    model = tiny_model("llama", seed=2)
    with pytest.raises(KeyError, match="not in this model"):
        compress_model(model, {"model.layers.9.mlp.up_proj": 4}, _factor_fn(model))
    assert all(isinstance(model.get_submodule(l.name), torch.nn.Linear) for l in compressible_layers(model))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_and_reload_runs_identically(tmp_path, arch):
    model = tiny_model(arch, seed=4, tie_word_embeddings=True)
    ids = torch.randint(0, 256, (2, 16))
    ranks = {l.name: 6 for l in compressible_layers(model)}
    compress_model(model, ranks, _factor_fn(model))
    with torch.no_grad():
        expected = model(ids).logits
    save_compressed(model, None, ranks, tmp_path / "m", meta={"note": "test"})
    reloaded, _, saved_ranks, meta = load_compressed(tmp_path / "m")
    assert saved_ranks == ranks and meta == {"note": "test"}
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)
    assert count_parameters(reloaded) == count_parameters(model)


def test_forced_factorised_rank_replaces_the_layer_even_at_break_even(tmp_path):
    """A plan's ``force_factorised`` layer (the reference's rank-eq MRCS layers) is really low-rank."""
    from lems_core.plan import RankPlan, plan_from_ranks
    from lems_core.profile import synthetic_profile

    model = tiny_model("llama", seed=2)
    layers = compressible_layers(model)
    q = next(l for l in layers if l.kind == "q")
    ranks = {l.name: None for l in layers}
    ranks[q.name] = force_factorised(q.eq_rank)
    profile = synthetic_profile()
    profile.layers, profile.fingerprint = layers, "tiny"
    plan = RankPlan.from_json(plan_from_ranks(profile, ranks, "mrcs").to_json(), layers=layers)  # through the JSON
    dense = count_parameters(model)
    factors = _factor_fn(model)(q)
    applied = compress_model(model, plan.ranks(), lambda l: factors)
    module = model.get_submodule(q.name)
    assert isinstance(module, LowRankLinear) and module.rank == q.eq_rank and applied[q.name] == q.eq_rank
    assert count_parameters(model) == dense - q.params + q.eq_rank * (q.out_features + q.in_features)
    x = torch.randn(3, q.in_features)
    assert torch.allclose(module(x), x @ factors.weight(q.eq_rank).T, atol=1e-5)
    save_compressed(model, None, applied, tmp_path / "m")
    reloaded, _, saved, _ = load_compressed(tmp_path / "m")
    assert isinstance(reloaded.get_submodule(q.name), LowRankLinear) and saved[q.name] == q.eq_rank


def test_rank_beyond_the_factors_names_the_layer():
    model = tiny_model("llama", seed=2)
    q = next(l for l in compressible_layers(model) if l.kind == "q")
    with pytest.raises(ValueError, match=f"layer {q.name}: cannot factorise at rank {q.eq_rank + 1}"):
        compress_model(model, {q.name: force_factorised(q.eq_rank + 1)}, _factor_fn(model))  # static factors stop at eq


# ------------------------------------------------------------ saved folders: hostile files, atomic writes
@pytest.fixture()
def saved(tmp_path):
    """A tiny llama factorised at rank 6 everywhere, saved to tmp_path/m: (folder, model, ranks)."""
    model = tiny_model("llama", seed=4)
    ranks = {l.name: 6 for l in compressible_layers(model)}
    compress_model(model, ranks, _factor_fn(model))
    return save_compressed(model, None, ranks, tmp_path / "m"), model, ranks


def _edit_json(path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _contents(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _hidden_siblings(folder) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("name", [WEIGHTS_FILE, RANKS_FILE, "config.json"])
def test_a_pipe_in_a_saved_folder_is_refused_without_blocking(saved, name):
    folder = saved[0]
    (folder / name).unlink()
    os.mkfifo(folder / name)
    error = error_within(1.0, lambda: load_compressed(folder))
    assert isinstance(error, CompressedModelError), error
    assert f"{folder / name} is not a regular file (a named pipe)" in str(error)


ABSURD_RANKS = [(1e12, "rank must be an integer or null, got 1000000000000.0"),
                (2.5, "rank must be an integer or null, got 2.5"),
                (True, "rank must be an integer or null, got True"), (-3, "rank -3 out of range [1, 64]"),
                (0, "rank 0 out of range [1, 64]"), (2**23, f"rank {2**23} out of range [1, 64] for a 64x64 matrix")]


@pytest.mark.parametrize("rank, message", ABSURD_RANKS, ids=[str(r) for r, _ in ABSURD_RANKS])
def test_absurd_saved_ranks_are_refused_before_any_structure_is_built(saved, rank, message, monkeypatch):
    folder, _, ranks = saved
    first = next(iter(ranks))  # model.layers.0.self_attn.q_proj, 64 x 64
    _edit_json(folder / RANKS_FILE, lambda doc: doc["ranks"].update({first: rank}))
    built = []
    monkeypatch.setattr(compression, "apply_structure", lambda *a: built.append(a))
    with pytest.raises(CompressedModelError, match=re.escape(f"layer {first}: {message}")):
        load_compressed(folder)
    assert built == []


@pytest.mark.parametrize("edit, message", [
    (lambda doc: doc["ranks"].update({"model.layers.9.mlp.up_proj": 4}), "1 layers are not compressible Linears"),
    (lambda doc: doc["ranks"].update({"lm_head": 4}), "e.g. ['lm_head']"),
    (lambda doc: doc.update({"ranks": [6, 6]}), "'ranks' must be an object"),
    (lambda doc: doc.update({"schema": "other/1"}), "not a compressed model (schema 'other/1')"),
])
def test_unknown_layers_and_malformed_ranks_files_are_refused(saved, edit, message):
    folder = saved[0]
    _edit_json(folder / RANKS_FILE, edit)
    with pytest.raises(CompressedModelError, match=re.escape(message)):
        load_compressed(folder)


def test_ranks_that_disagree_with_the_weights_or_the_config_are_refused(saved):
    folder, _, ranks = saved
    first = next(iter(ranks))
    _edit_json(folder / RANKS_FILE, lambda doc: doc["ranks"].update({first: 5}))  # in range, not what was saved
    with pytest.raises(CompressedModelError, match=re.escape(f"{first}.a.weight (6, 64) (expected (5, 64))")):
        load_compressed(folder)
    _edit_json(folder / RANKS_FILE, lambda doc: doc["ranks"].update({first: 6}))
    _edit_json(folder / "config.json", lambda doc: doc.update({"lems_low_rank": {first: 6}}))
    with pytest.raises(CompressedModelError, match="lems_low_rank disagrees with ranks.json"):
        load_compressed(folder)


def test_a_crash_mid_save_leaves_the_earlier_folder_whole(saved, monkeypatch):
    folder, model, ranks = saved
    before = _contents(folder)

    def crash(model, path):
        path.write_bytes(b"half a tensor")
        raise OSError("No space left on device")

    monkeypatch.setattr(compression, "write_weights", crash)
    with pytest.raises(OSError, match="No space left"):
        save_compressed(model, None, ranks, folder, meta={"second": True}, overwrite=True)
    assert _contents(folder) == before and _hidden_siblings(folder) == []
    with pytest.raises(OSError, match="No space left"):
        save_compressed(model, None, ranks, folder.parent / "fresh")
    assert not (folder.parent / "fresh").exists() and _hidden_siblings(folder) == []
    monkeypatch.undo()
    assert load_compressed(folder)[2] == ranks


def test_overwrite_replaces_an_earlier_export_as_a_whole_and_nothing_else(saved, tmp_path):
    folder, model, ranks = saved
    (folder / "plan.json").write_text("{}")  # a file the next export does not write: must not survive
    with pytest.raises(CompressedModelError, match="is not empty; pass overwrite"):
        save_compressed(model, None, ranks, folder, meta={"second": True})
    save_compressed(model, None, ranks, folder, meta={"second": True}, overwrite=True)
    assert not (folder / "plan.json").exists() and load_compressed(folder)[3] == {"second": True}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(CompressedModelError, match="holds files that are not a compressed model"):
        save_compressed(model, None, ranks, mine, overwrite=True)
    assert _contents(mine) == {"notes.txt": b"keep"}


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_save(saved):
    folder, model, ranks = saved
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    prefix = f".{folder.name}.tmp-{safe_io.host_tag()}-"
    abandoned = folder.parent / f"{prefix}{int(dead.stdout)}-0a0b"
    running = folder.parent / f"{prefix}{os.getppid()}-0c0d"
    for path in (abandoned, running):
        path.mkdir()
        (path / WEIGHTS_FILE).write_bytes(b"partial")
    save_compressed(model, None, ranks, folder, overwrite=True)
    assert not abandoned.exists() and running.exists()
