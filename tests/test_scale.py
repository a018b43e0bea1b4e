"""Issue #10: memory-budgeted streaming statistics, offloaded models, torch.distributed builds."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lems_core.calibration import CalibrationConfig
from lems_core.decompositions import DecompositionOptions, Decomposer
from lems_core.memory import (GramLedger, MemoryBudgetError, grad_gram_bytes, input_gram_bytes, parse_bytes,
                              plan_windows)
from lems_core.model import compressible_layers
from lems_core.run import Run
from lems_core.statistics import collect_grad_grams, collect_input_stats, window_grad_grams
from lems_core.blocks import capture_block_inputs
from lems_core.streaming import (StreamPlan, block_factor_bytes, decomposition_workspace, plan_stream,
                                 streamed_factorizations)
from helpers import tiny_loaded, word_corpus

ROOT = Path(__file__).resolve().parents[1]


def test_parse_bytes_reads_units_and_rejects_nonsense():
    assert parse_bytes("1.5GB") == int(1.5 * 2**30)
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes(1000) == 1000
    for bad in ("lots", "-3GB", "0", "12 parsecs"):
        with pytest.raises(MemoryBudgetError):
            parse_bytes(bad)


def test_windows_fit_the_budget_and_a_block_too_big_is_an_error(model):
    layers = compressible_layers(model)
    per_block_g = grad_gram_bytes(l for l in layers if l.block == 0)
    per_block_a = input_gram_bytes(l for l in layers if l.block == 0)
    budget = 2 * per_block_g + per_block_a  # two blocks of G per window
    windows = plan_windows(layers, {"inputs", "grads"}, budget)
    assert [w.blocks for w in windows] == [(0, 1), (2,)]
    assert all(w.gram_bytes <= budget for w in windows)
    assert len(plan_windows(layers, {"inputs", "grads"}, None)) == 1
    with pytest.raises(MemoryBudgetError, match="one block"):
        plan_windows(layers, {"inputs", "grads"}, per_block_g)


def test_blockwise_backward_gives_the_full_backward_grams(model, ids):
    layers = compressible_layers(model)
    full = collect_grad_grams(model, ids, layers)
    items = capture_block_inputs(model, ids, 1)
    late = [l for l in layers if l.block >= 1]
    for p in model.parameters():
        p.grad = None
    window = window_grad_grams(model, items, ids, late)
    assert set(window) == {l.name for l in late}
    assert all(p.grad is None for p in model.parameters())  # no weight gradients: memory stays one block's graph
    for l in late:
        torch.testing.assert_close(window[l.name], full[l.name], rtol=1e-4, atol=1e-6)


def _stream_plan(loaded, budget_blocks: int) -> StreamPlan:
    """A plan whose Gram budget holds ``budget_blocks`` blocks of G plus one block of A."""
    layers = compressible_layers(loaded.model)
    gram = budget_blocks * grad_gram_bytes(l for l in layers if l.block == 0) + input_gram_bytes(
        l for l in layers if l.block == 0)
    return plan_stream(layers, "kfac", decomposition_workspace(layers) + block_factor_bytes(layers) + gram, "cpu")


def test_live_gram_bytes_never_exceed_the_budget_and_factors_match(tmp_path, one_thread):
    """The ledger (the code's own accounting) stays within the Gram budget over a 2-window build."""
    loaded = tiny_loaded(0)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    plan = _stream_plan(loaded, 2)
    assert plan.passes == 2
    ledger = GramLedger(limit=plan.gram_budget)
    options = DecompositionOptions()
    shards = streamed_factorizations(loaded, ids, "kfac", options, tmp_path / "f", plan, ledger=ledger)
    layers = compressible_layers(loaded.model)
    assert 0 < ledger.peak <= plan.gram_budget
    assert ledger.peak < input_gram_bytes(layers) + grad_gram_bytes(layers)  # never the whole model's Grams
    assert ledger.live == 0 and ledger.held == ()
    # the same factors as the classic all-at-once path
    inputs = collect_input_stats(loaded.model, ids)
    grads = collect_grad_grams(loaded.model, ids, layers)
    decomposer = Decomposer("kfac", options)
    for l in layers:
        ref = decomposer(l, loaded.model.get_submodule(l.name).weight, inputs[l.name], grads[l.name])
        got = shards[l.name]
        np.testing.assert_allclose(got.sigma, ref.sigma, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(got.left @ got.right, ref.left @ ref.right, rtol=1e-3, atol=1e-4)


def test_a_budget_below_the_live_grams_is_caught_by_the_ledger(tmp_path, one_thread):
    """The accounting is real: a ledger limited below one window's need raises."""
    loaded = tiny_loaded(0)
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    plan = _stream_plan(loaded, 1)
    with pytest.raises(MemoryBudgetError, match="exceed the budget"):
        streamed_factorizations(loaded, ids, "kfac", DecompositionOptions(), tmp_path / "f", plan,
                                ledger=GramLedger(limit=plan.windows[0].gram_bytes - 1))


def test_fp16_factors_are_stored_half_size(tmp_path, one_thread):
    loaded = tiny_loaded(0)
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    plan = _stream_plan(loaded, 3)
    a = streamed_factorizations(loaded, ids, "svd_llm", DecompositionOptions(), tmp_path / "a", plan,
                                run=Run(factor_dtype="fp32"))
    b = streamed_factorizations(loaded, ids, "svd_llm", DecompositionOptions(), tmp_path / "b", plan,
                                run=Run(factor_dtype="fp16"))
    size = lambda d: sum(p.stat().st_size for p in d.glob("block_*.safetensors"))  # noqa: E731
    assert size(tmp_path / "b") < 0.6 * size(tmp_path / "a")
    name = compressible_layers(loaded.model)[0].name
    torch.testing.assert_close(b[name].left, a[name].left, rtol=1e-2, atol=1e-3)


@pytest.fixture()
def corpus(tmp_path):
    return word_corpus(tmp_path / "corpus.txt")


def test_two_process_gloo_torchrun_build_equals_one_process(tmp_path, corpus):
    """torchrun --nproc_per_node 2 (gloo): layers sharded, rank 0 merges; same profile as one process."""
    from lems_core.pipeline import ProfileSettings, build_profile
    from lems_core.profile import Profile
    import dist_worker

    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "dist.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "dist_worker.py"),
                           str(corpus), str(tmp_path / "cache2"), str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["world"] == 2
    assert [(r["plan"], r["rank"], r["device"]) for r in doc["spread"]] == [("a", 0, "cpu"), ("b", 1, "cpu"), ("c", 0, "cpu")]
    two = Profile.load(doc["folder"])
    cfg = CalibrationConfig(dataset=str(corpus), **dist_worker.CFG)
    settings, run = ProfileSettings(extra_ratios=(0.5,)), Run(cache_dir=tmp_path / "cache1")
    one = Profile.load(build_profile(tiny_loaded(8), "kfac", cfg, settings, run=run))
    assert Path(doc["folder"]).name == Path(build_profile(tiny_loaded(8), "kfac", cfg, settings,
                                                          run=run)).name  # same key
    assert [l.name for l in two.layers] == [l.name for l in one.layers]
    assert two.meta["world_size"] == 2
    for l in one.layers:
        np.testing.assert_allclose(two.spectra[l.name], one.spectra[l.name], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(two.kl_ref, one.kl_ref, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(two.measured[0.5], one.measured[0.5], rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(two.measured_nll[0.5], one.measured_nll[0.5], rtol=1e-4)
    assert np.isfinite(two.kl_ref).all()
    _assert_same_bias_fit(two.bias_fit, one.bias_fit)
    index = [json.loads(p.read_text()) for p in (tmp_path / "cache2").glob("tensors/factor_blocks/*/index.json")]
    gathered = [doc for doc in index if doc["meta"].get("gathered_from_ranks") == 2]
    assert len(gathered) == 1 and set(gathered[0]["layers"]) == {l.name for l in one.layers}  # complete, at rank 0


def _assert_same_bias_fit(got: dict | None, want: dict | None) -> None:
    """The same seeded (alpha, gamma) trials, the same KL scores (float tolerance) and the same winner."""
    assert got is not None and want is not None, "a profile lacks the bias fit"
    assert set(got["ratios"]) == set(want["ratios"]) == {"0.6", "0.8"}
    for ratio, entry in want["ratios"].items():
        mine = got["ratios"][ratio]
        assert [(t["alpha"], t["gamma"]) for t in mine["trials"]] == [(t["alpha"], t["gamma"]) for t in entry["trials"]]
        np.testing.assert_allclose([t["score"] for t in mine["trials"]], [t["score"] for t in entry["trials"]],
                                   rtol=1e-3, atol=1e-9)
        assert (mine["alpha"], mine["gamma"]) == (entry["alpha"], entry["gamma"])


def _whole_and_offloaded(tmp_path):
    """A tiny llama, and the same checkpoint loaded by accelerate with blocks 1 and 2 on disk."""
    from lems_core.model import tiny_model
    from lems_core.offload import load_offloaded

    whole = tiny_model("llama", seed=3)
    whole.save_pretrained(tmp_path / "ckpt")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    off = load_offloaded(str(tmp_path / "ckpt"), device_map=device_map, offload_folder=tmp_path / "offload",
                         dtype=torch.float32)
    return whole, off


def test_a_model_loaded_with_disk_offloading_gives_the_same_statistics(tmp_path, one_thread):
    """accelerate device_map with two of three blocks on disk: same fingerprint, Grams and streamed factors."""
    from lems_core.model import LoadedModel, model_fingerprint
    from lems_core.offload import is_offloaded

    whole, off = _whole_and_offloaded(tmp_path)
    up = "model.layers.2.mlp.up_proj"
    assert is_offloaded(off.model.get_submodule(up)) and off.model.get_submodule(up).weight.device.type == "meta"
    assert off.fingerprint == model_fingerprint(whole)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    a, b = collect_input_stats(whole, ids), collect_input_stats(off.model, ids)
    for name in a:
        torch.testing.assert_close(b[name].gram, a[name].gram)
        torch.testing.assert_close(b[name].abs_max, a[name].abs_max)
    ga, gb = collect_grad_grams(whole, ids), collect_grad_grams(off.model, ids)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name])
    plan = plan_stream(compressible_layers(whole), "kfac", None, "cpu")
    fa = streamed_factorizations(LoadedModel(whole, None, "w", "w"), ids, "kfac", DecompositionOptions(),
                                 tmp_path / "fa", plan)
    fb = streamed_factorizations(off, ids, "kfac", DecompositionOptions(), tmp_path / "fb", plan)
    np.testing.assert_allclose(fb[up].sigma, fa[up].sigma, rtol=1e-6)
    assert off.model.get_submodule(up).weight.device.type == "meta"  # put back after the decomposition


def test_a_budget_too_small_is_a_specific_error_and_exit_2(tmp_path, corpus, capsys):
    from lems_core.cli import main
    from lems_core.pipeline import build_profile

    cfg = CalibrationConfig(dataset=str(corpus), split="train", n_samples=2, seq_len=32, seed=1, n_search=1)
    with pytest.raises(MemoryBudgetError, match="raise --max-memory"):
        build_profile(tiny_loaded(8), "kfac", cfg, run=Run(cache_dir=tmp_path, max_memory=4096))
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--max-memory", "plenty"])
    assert exc.value.code == 2
    assert "cannot read memory size" in capsys.readouterr().err


def test_profile_built_under_a_budget_matches_the_classic_one(tmp_path, corpus, one_thread, budget_beyond_interpreter):
    """Streamed (2 windows, factors on disk) vs all Grams at once: same spectra and KL, same profile key."""
    from lems_core.pipeline import build_profile
    from lems_core.profile import Profile

    cfg = CalibrationConfig(dataset=str(corpus), split="train", n_samples=2, seq_len=32, seed=1, n_search=1)
    loaded = tiny_loaded(8)
    budget = _stream_plan(loaded, 2).max_memory
    classic = build_profile(loaded, "kfac", cfg, run=Run(cache_dir=tmp_path / "a"))
    streamed = build_profile(loaded, "kfac", cfg, run=Run(cache_dir=tmp_path / "b", max_memory=budget))
    assert classic.name == streamed.name
    a, b = Profile.load(classic), Profile.load(streamed)
    assert b.meta["max_memory"] == budget
    for l in a.layers:
        np.testing.assert_allclose(b.spectra[l.name], a.spectra[l.name], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(b.kl_ref, a.kl_ref, rtol=1e-3, atol=1e-7)
    assert list((tmp_path / "b" / "tensors" / "factor_blocks").glob("*/block_0002.safetensors"))


def test_kl_sweep_on_an_offloaded_model_equals_the_whole_model(tmp_path, one_thread):
    """Single-layer KL with blocks on disk: the low-rank stand-in is built on the factors' device."""
    from lems_core.model import LoadedModel
    from lems_core.sensitivity import layer_kl_sweep

    whole, off = _whole_and_offloaded(tmp_path)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    plan = plan_stream(compressible_layers(whole), "svd_llm", None, "cpu")
    fa = streamed_factorizations(LoadedModel(whole, None, "w", "w"), ids, "svd_llm", DecompositionOptions(),
                                 tmp_path / "fa", plan)
    fb = streamed_factorizations(off, ids, "svd_llm", DecompositionOptions(), tmp_path / "fb", plan)
    layers = compressible_layers(whole)
    sa = layer_kl_sweep(whole, layers, lambda l: fa[l.name], ids, [0.3]).kl
    sb = layer_kl_sweep(off.model, layers, lambda l: fb[l.name], ids, [0.3]).kl
    assert np.isfinite(sb[0.3]).all() and (sb[0.3] > 0).all()
    np.testing.assert_allclose(sb[0.3], sa[0.3], rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------ FWSVD streamed under the budget
def test_fwsvd_fisher_rows_stream_under_the_budget_and_give_the_unstreamed_factors(tmp_path, one_thread):
    """One block per window: the Fisher rows and each layer's weight-gradient transient stay within the
    ledger's budget, no weight .grad is allocated, and the factors equal collect_fisher_rows'."""
    from lems_core.memory import fisher_row_bytes, weight_grad_bytes
    from lems_core.statistics import collect_fisher_rows

    loaded = tiny_loaded(0)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    layers = compressible_layers(loaded.model)
    block0 = [l for l in layers if l.block == 0]
    one_block = fisher_row_bytes(block0) + weight_grad_bytes(block0)
    plan = plan_stream(layers, "fwsvd", decomposition_workspace(layers) + block_factor_bytes(layers) + one_block, "cpu")
    assert plan.passes == 3
    ledger = GramLedger(limit=plan.gram_budget)
    shards = streamed_factorizations(loaded, ids, "fwsvd", DecompositionOptions(), tmp_path / "f", plan, ledger=ledger)
    assert weight_grad_bytes(layers) <= ledger.peak <= plan.gram_budget  # the transient is counted
    assert ledger.live == 0 and ledger.held == ()
    assert all(p.grad is None for p in loaded.model.parameters())
    fisher = collect_fisher_rows(loaded.model, ids, layers)
    decomposer = Decomposer("fwsvd", DecompositionOptions())
    for l in layers:
        ref = decomposer(l, loaded.model.get_submodule(l.name).weight, None, None, fisher[l.name])
        np.testing.assert_allclose(shards[l.name].sigma, ref.sigma, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(shards[l.name].left @ shards[l.name].right, ref.left @ ref.right,
                                   rtol=1e-3, atol=1e-5)
    with pytest.raises(MemoryBudgetError, match="exceed the budget"):  # the accounting is real
        streamed_factorizations(loaded, ids, "fwsvd", DecompositionOptions(), tmp_path / "g", plan,
                                ledger=GramLedger(limit=weight_grad_bytes(layers) - 1))


# ------------------------------------------------------------------ KL-sweep block inputs off the device
def _svd_factors(model):
    decomposer = Decomposer("svd")
    return {l.name: decomposer(l, model.get_submodule(l.name).weight) for l in compressible_layers(model)}


@pytest.mark.parametrize("where", ["disk", "cpu"])
def test_kl_sweep_with_block_inputs_off_the_device_equals_the_in_memory_sweep(tmp_path, where, one_thread):
    """Inputs memory-mapped on disk (or in RAM), three batches' bytes on the device at most: same KL and NLL,
    and the ledger (the code's own accounting) never shows more block-input bytes on the device."""
    import gc

    from lems_core.blocks import InputPlacement, block_input_bytes
    from lems_core.model import tiny_model
    from lems_core.sensitivity import SweepOptions, layer_kl_sweep

    model = tiny_model("llama", seed=6)
    ids = torch.randint(0, 256, (5, 32), generator=torch.Generator().manual_seed(6))
    layers, factors = compressible_layers(model), _svd_factors(model)
    with_nll = SweepOptions(batch_size=2, with_nll=True)
    swept_a = layer_kl_sweep(model, layers, lambda l: factors[l.name], ids, [0.3, 0.6], with_nll)
    a, ref_a, nll_a = swept_a.kl, swept_a.reference, swept_a.nll
    batch = block_input_bytes(model, ids[:2])
    placement = InputPlacement(where, 3 * batch, tmp_path)
    ledger = GramLedger(limit=placement.budget, what="block input")
    swept_b = layer_kl_sweep(model, layers, lambda l: factors[l.name], ids, [0.3, 0.6], with_nll,
                             inputs=placement, ledger=ledger)
    b, ref_b, nll_b = swept_b.kl, swept_b.reference, swept_b.nll
    del swept_b
    for r in (0.3, 0.6):
        np.testing.assert_allclose(b[r], a[r], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(nll_b[r], nll_a[r], rtol=1e-6)
    assert ref_b.nll == pytest.approx(ref_a.nll, rel=1e-6) and ref_b.floor == pytest.approx(ref_a.floor, abs=1e-9)
    assert 2 * batch <= ledger.peak <= placement.budget < 2 * block_input_bytes(model, ids)
    assert ledger.live == 0
    assert all(l.device.type == "cpu" for l in ref_b.logits)
    assert ref_b.logits.where == "disk" and list(tmp_path.glob("lems-logits-*/*.bin"))  # CPU device: RAM is short
    del ref_b
    gc.collect()
    assert not list(tmp_path.glob("lems-block-inputs-*"))  # every store's file is gone with it
    assert not list(tmp_path.glob("lems-logits-*"))
    with pytest.raises(MemoryBudgetError, match="below two batches of block inputs"):
        layer_kl_sweep(model, layers, lambda l: factors[l.name], ids, [0.3], SweepOptions(batch_size=2),
                       inputs=InputPlacement(where, 2 * batch - 1, tmp_path))


def test_input_placement_follows_the_memory_budget(tmp_path, corpus, one_thread, monkeypatch):
    """Block inputs stay on the device when they fit --max-memory, go to disk on a CPU device otherwise,
    and a profile built with them on disk equals the one built with them in memory."""
    from lems_core import pipeline
    from lems_core.blocks import InputPlacement, block_input_bytes, plan_input_placement
    from lems_core.pipeline import ProfileSettings, build_profile
    from lems_core.profile import Profile

    loaded = tiny_loaded(8)
    ids = torch.zeros(4, 32, dtype=torch.long)
    need = 2 * block_input_bytes(loaded.model, ids)
    assert plan_input_placement(loaded.model, ids, need, "cpu") == InputPlacement("device")
    assert plan_input_placement(loaded.model, ids, need - 1, "cpu", tmp_path) == InputPlacement("disk", need - 1, tmp_path)
    assert plan_input_placement(loaded.model, ids, need - 1, "cuda:0").where == "cpu"
    cfg = CalibrationConfig(dataset=str(corpus), split="train", n_samples=2, seq_len=32, seed=1, n_search=3)
    no_fit = ProfileSettings(bias_fit_ratios=())
    memory = build_profile(loaded, "svd_llm", cfg, no_fit, run=Run(cache_dir=tmp_path / "a"))
    chosen = []

    def on_disk(model, search_ids, max_memory, device):
        chosen.append(InputPlacement("disk", 2 * block_input_bytes(model, search_ids), tmp_path))  # one batch of 3
        return chosen[-1]
    monkeypatch.setattr(pipeline.profiling, "plan_input_placement", on_disk)
    disk = build_profile(loaded, "svd_llm", cfg, no_fit, run=Run(cache_dir=tmp_path / "b"))
    assert chosen and memory.name == disk.name
    np.testing.assert_allclose(Profile.load(disk).kl_ref, Profile.load(memory).kl_ref, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------ evaluate / compress an offloaded model
@pytest.fixture()
def checkpoint(tmp_path, monkeypatch):
    """A tiny llama saved with a word tokenizer, a corpus of its words, a kfac plan for it; cache in tmp_path."""
    from helpers import word_tokenizer
    from lems_core.model import model_fingerprint, tiny_model
    from lems_core.plan import from_loadconfig

    monkeypatch.setenv("LEMS_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_model("llama", seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    word_tokenizer(model.config.vocab_size).save_pretrained(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    corpus = tmp_path / "words.txt"
    corpus.write_text("\n".join(" ".join(f"w{i}" for i in rng.integers(2, 256, 12)) for _ in range(200)))
    cfg = CalibrationConfig(dataset=str(corpus), split="train", n_samples=2, seq_len=32, seed=1, n_search=2)
    layers = compressible_layers(model)
    plan = from_loadconfig({l.name: 0.5 for l in layers}, layers, str(tmp_path / "ckpt"), model_fingerprint(model),
                           method="uniform", decomposition="kfac", meta={"calibration": cfg.to_dict()})
    plan.save(tmp_path / "plan.json")
    block = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    return {"folder": tmp_path / "ckpt", "corpus": corpus, "cfg": cfg, "plan": plan, "plan_path": tmp_path / "plan.json",
            "weights_memory": 2 * model.model.embed_tokens.weight.numel() * 4 + block}


def test_evaluating_a_plan_offloaded_gives_the_ppl_and_kl_of_the_whole_model(tmp_path, checkpoint, one_thread):
    """Every block on disk (accelerate, max_memory below the model): compression, PPL and KL as loaded whole."""
    from lems_core import pipeline
    from lems_core.evaluation import EvalProtocol
    from lems_core.offload import OffloadSpec, is_offloaded

    c = checkpoint
    spec = OffloadSpec(c["weights_memory"], str(tmp_path / "offload"))
    kwargs = dict(protocol=EvalProtocol(32, 2), calibration=c["cfg"])
    whole = pipeline.evaluate_plan(c["plan"], [str(c["corpus"])], run=Run(cache_dir=tmp_path / "c1", device="cpu"),
                                   **kwargs)
    off_run = Run(cache_dir=tmp_path / "c2", device="cpu", offload=spec)
    off = pipeline.evaluate_plan(c["plan"], [str(c["corpus"])], run=off_run, **kwargs)
    (key, loaded), = pipeline.LOADED_MODELS.items()  # the model the offloaded evaluation ran on
    assert key[2] == spec
    assert all(is_offloaded(loaded.model.get_submodule(l.name)) for l in compressible_layers(loaded.model))
    assert list((tmp_path / "c2").glob("tensors/factor_blocks/*/index.json"))  # factorised block by block
    ds = str(c["corpus"])
    assert off.ppl[ds] == pytest.approx(whole.ppl[ds], rel=1e-5)
    assert off.dense_ppl[ds] == pytest.approx(whole.dense_ppl[ds], rel=1e-5)
    assert off.kl == pytest.approx(whole.kl, rel=1e-4) and off.kl > 0
    assert off.ppl[ds] != pytest.approx(off.dense_ppl[ds], rel=1e-4)  # the plan was applied
    with pytest.raises(ValueError, match="needs the model loaded whole"):
        pipeline.evaluate_plan(c["plan"], [ds], decomposition="saes", run=off_run, **kwargs)


def test_cli_evaluate_and_compress_accept_the_offload_flags(tmp_path, checkpoint, capsys, one_thread):
    """evaluate / evaluate-plans / compress with --weights-memory and --offload-folder: the numbers and the
    saved weights of the model loaded whole; bad values exit 2 with a specific message."""
    from safetensors.torch import load_file

    from lems_core.cli import main

    c = checkpoint
    common = ["--model", str(c["folder"]), "--calib-dataset", str(c["corpus"]), "--device", "cpu"]
    offload = ["--weights-memory", str(c["weights_memory"]), "--offload-folder", str(tmp_path / "offload")]
    evaluate = ["evaluate", "--plan", str(c["plan_path"]), "--datasets", str(c["corpus"]), "--seq-len", "32",
                "--max-windows", "2", *common]

    def run(argv) -> dict | list:
        capsys.readouterr()
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)
    from lems_core import pipeline
    from lems_core.offload import has_offloaded_weights

    whole, off = run(evaluate), run(evaluate + offload)
    (key, loaded), = pipeline.LOADED_MODELS.items()  # the model the command ran on
    assert key[2] is not None and has_offloaded_weights(loaded.model)
    assert off["ppl"] == pytest.approx(whole["ppl"], rel=1e-5) and off["kl"] == pytest.approx(whole["kl"], rel=1e-4)
    both = run(["evaluate-plans", "--plans", str(c["plan_path"]), "--datasets", str(c["corpus"]), "--seq-len", "32",
                "--max-windows", "2", *common, *offload])
    assert both[0]["ppl"] == pytest.approx(whole["ppl"], rel=1e-5)
    for name, extra in (("whole", []), ("off", offload)):
        assert main(["compress", "--plan", str(c["plan_path"]), "-o", str(tmp_path / name), *common, *extra]) == 0
    assert next(iter(pipeline.LOADED_MODELS))[2] is not None  # the second compress ran offloaded
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "off" / "model.safetensors"))
    assert set(a) == set(b) and all(t.device.type != "meta" for t in b.values())
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    capsys.readouterr()
    for command in (evaluate, ["compress", "--plan", str(c["plan_path"]), "-o", str(tmp_path / "x"), *common]):
        with pytest.raises(SystemExit) as exc:
            main(command + ["--weights-memory", "plenty"])
        assert exc.value.code == 2 and "cannot read memory size" in capsys.readouterr().err
        assert main(command + ["--offload-folder", str(c["corpus"])]) == 2
        assert "exists and is not a folder" in capsys.readouterr().err
    pipeline.LOADED_MODELS.clear()
    assert main(evaluate + ["--weights-memory", "1KB", "--offload-folder", str(tmp_path / "offload")]) == 2
    assert "not even the input embeddings" in capsys.readouterr().err  # not torch's "copy out of meta tensor"
    assert main(evaluate + offload + ["--decomposition", "lcsvd"]) == 2
    assert "needs the model loaded whole" in capsys.readouterr().err


def test_reference_logits_go_to_the_device_cpu_ram_or_disk_by_the_budget(tmp_path, one_thread):
    """place_off_device: the device when they fit --max-memory, else CPU RAM beside a GPU, else disk; a disk
    shelf holds the same logits, memory-mapped, and its folder goes with it."""
    import gc

    from lems_core.blocks import TensorShelf, place_off_device
    from lems_core.pipeline import reference_logits

    assert place_off_device(100, "cpu", 100) == "device" and place_off_device(101, "cpu", 100) == "disk"
    assert place_off_device(101, "cuda:0", 100) == "cpu"  # the CPU RAM's default budget holds 101 bytes
    assert place_off_device(1 << 60, "cuda:0", 100) == "disk"
    loaded = tiny_loaded(2)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    kept, spilled = reference_logits(loaded, ids), reference_logits(loaded, ids, max_memory=1)
    assert kept.where == "device" and spilled.where == "disk" and len(spilled) == len(kept) == 3
    for a, b in zip(kept, spilled):
        assert b.dtype == a.dtype and b.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    shelf = TensorShelf("disk", tmp_path)
    shelf.append(torch.arange(6.0).view(2, 3))
    assert torch.equal(shelf[0], torch.arange(6.0).view(2, 3)) and len(list(tmp_path.glob("lems-logits-*/*.bin"))) == 1
    del shelf
    gc.collect()
    assert not list(tmp_path.glob("lems-logits-*"))
    with pytest.raises(ValueError, match="one of device, cpu, disk"):
        TensorShelf("gpu")


def test_evaluate_under_max_memory_streams_the_factors_and_gives_the_same_numbers(tmp_path, checkpoint, capsys, budget_beyond_interpreter,
                                                                                 monkeypatch, one_thread):
    """evaluate / evaluate-plans / compress --max-memory: factors from the streamed build under the budget
    (the ledger never over it), reference logits on disk, PPL and KL of the run without a budget; a budget
    below one block's statistics exits 2 and names the smallest that runs."""
    from safetensors.torch import load_file

    from lems_core import pipeline, streaming
    from lems_core.cli import main

    c = checkpoint
    loaded = pipeline.get_model(str(c["folder"]), "cpu")
    layers, budget = compressible_layers(loaded.model), _stream_plan(loaded, 1).max_memory
    common = ["--model", str(c["folder"]), "--calib-dataset", str(c["corpus"]), "--device", "cpu"]
    evaluate = ["evaluate", "--plan", str(c["plan_path"]), "--datasets", str(c["corpus"]), "--seq-len", "32",
                "--max-windows", "2", *common]
    ledgers, shelves = [], []
    real_stream, real_logits = streaming.streamed_factorizations, pipeline.evaluation.reference_logits

    def streamed(*args, ledger=None, **kwargs):
        ledgers.append(ledger or streaming.GramLedger(limit=args[5].gram_budget))
        return real_stream(*args, ledger=ledgers[-1], **kwargs)

    def logits(*args, **kwargs):
        shelves.append(real_logits(*args, **kwargs))
        return shelves[-1]
    monkeypatch.setattr(pipeline.artefacts, "streamed_factorizations", streamed)
    monkeypatch.setattr(pipeline.evaluation, "reference_logits", logits)

    def run(argv) -> dict | list:
        capsys.readouterr()
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)
    whole = run(evaluate)
    assert not ledgers and shelves[-1].where == "device"  # the tiny model's Grams fit: the classic path
    monkeypatch.setattr(pipeline.evaluation, "place_off_device", lambda *a: "disk")  # as if the logits outgrew the budget
    capped = run(evaluate + ["--max-memory", str(budget)])
    assert ledgers and all(0 < l.peak <= l.limit <= budget for l in ledgers) and shelves[-1].where == "disk"
    assert capped["ppl"] == pytest.approx(whole["ppl"], rel=1e-5) and capped["kl"] == pytest.approx(whole["kl"], rel=1e-4)
    both = run(["evaluate-plans", "--plans", str(c["plan_path"]), "--datasets", str(c["corpus"]), "--seq-len", "32",
                "--max-windows", "2", *common, "--max-memory", str(budget)])
    assert both[0]["ppl"] == pytest.approx(whole["ppl"], rel=1e-5)
    ledgers.clear()
    for name, extra in (("whole", []), ("capped", ["--max-memory", str(budget)])):
        assert main(["compress", "--plan", str(c["plan_path"]), "-o", str(tmp_path / name), *common, *extra]) == 0
    assert ledgers  # the capped compress factorised under the budget
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "capped" / "model.safetensors"))
    assert set(a) == set(b) and len(a) > len(layers)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    capsys.readouterr()
    assert main(evaluate + ["--max-memory", str(budget // 4)]) == 2
    assert "memory budget" in capsys.readouterr().err.lower()
    with pytest.raises(SystemExit) as exc:
        main(evaluate + ["--max-memory", "lots"])
    assert exc.value.code == 2 and "cannot read memory size" in capsys.readouterr().err


def test_a_cached_torchrun_profile_without_its_bias_fit_is_rebuilt(tmp_path, corpus, one_thread):
    """Multi-process builds used to skip the fit under the single-process key: such a profile is not reused."""
    from lems_core.pipeline import build_profile
    from lems_core.profile import Profile

    cfg = CalibrationConfig(dataset=str(corpus), split="train", n_samples=2, seq_len=32, seed=1, n_search=1)
    loaded = tiny_loaded(8)
    folder = build_profile(loaded, "svd_llm", cfg, run=Run(cache_dir=tmp_path))
    profile = Profile.load(folder)
    assert profile.bias_fit is not None
    profile.bias_fit, profile.meta["world_size"] = None, 2  # what a torchrun build wrote before the fix
    profile.save(folder)
    assert Profile.load(build_profile(loaded, "svd_llm", cfg, run=Run(cache_dir=tmp_path))).bias_fit is not None
    profile.meta["world_size"] = 1  # a single-process profile without a fit (older builds) is kept as it is
    profile.save(folder)
    assert Profile.load(build_profile(loaded, "svd_llm", cfg, run=Run(cache_dir=tmp_path))).bias_fit is None


def test_a_rank_that_never_joins_is_reported_within_the_collective_timeout(tmp_path):
    """LEMS_DIST_TIMEOUT_S reaches the process group: rank 0 gives up on a silent rank 1 in seconds, naming it."""
    import re

    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LEMS_DIST_TIMEOUT_S": "2"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "dist_stall_worker.py")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=90)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "DistributedError: rank 0 of 2: the merge of spectra and KL values at rank 0 failed or timed out" in output
    assert "after at most 2 s, LEMS_DIST_TIMEOUT_S) waiting for rank 1" in output
    waited = float(re.search(r"rank 0 waited ([0-9.]+) s", output).group(1))
    assert 1.5 <= waited < 30, output[-3000:]  # the 2 s timeout, not the default 30 min


def test_collective_timeouts_come_from_the_environment_and_refuse_nonsense(monkeypatch):
    from datetime import timedelta

    from lems_core import distributed

    monkeypatch.delenv("LEMS_DIST_TIMEOUT_S", raising=False)
    monkeypatch.delenv("LEMS_DIST_SOLO_TIMEOUT_S", raising=False)
    assert distributed.process_group_timeout() == timedelta(minutes=30)
    assert distributed.solo_timeout() == timedelta(hours=6)
    monkeypatch.setenv("LEMS_DIST_TIMEOUT_S", "90")
    assert distributed.process_group_timeout() == timedelta(seconds=90)
    for bad in ("soon", "0", "-5", "inf", "nan", "1e400", "9" * 400):
        monkeypatch.setenv("LEMS_DIST_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="LEMS_DIST_TIMEOUT_S must be a number of seconds"):
            distributed.process_group_timeout()
