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
from lems_core.statistics import collect_grad_grams, collect_input_stats, window_grad_grams
from lems_core.blocks import capture_block_inputs
from lems_core.streaming import StreamPlan, decomposition_workspace, plan_stream, streamed_factorizations
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
    return plan_stream(layers, "kfac", decomposition_workspace(layers) + gram, "cpu")


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
    a = streamed_factorizations(loaded, ids, "svd_llm", DecompositionOptions(), tmp_path / "a", plan, "fp32")
    b = streamed_factorizations(loaded, ids, "svd_llm", DecompositionOptions(), tmp_path / "b", plan, "fp16")
    size = lambda d: sum(p.stat().st_size for p in d.glob("block_*.safetensors"))  # noqa: E731
    assert size(tmp_path / "b") < 0.6 * size(tmp_path / "a")
    name = compressible_layers(loaded.model)[0].name
    torch.testing.assert_close(b[name].left, a[name].left, rtol=1e-2, atol=1e-3)


@pytest.fixture()
def corpus(tmp_path):
    return word_corpus(tmp_path / "corpus.txt")


def test_two_process_gloo_torchrun_build_equals_one_process(tmp_path, corpus):
    """torchrun --nproc_per_node 2 (gloo): layers sharded, rank 0 merges; same profile as one process."""
    from lems_core.pipeline import build_profile
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
    one = Profile.load(build_profile(tiny_loaded(8), "kfac", cfg, extra_ratios=(0.5,), cache_dir=tmp_path / "cache1"))
    assert Path(doc["folder"]).name == Path(build_profile(tiny_loaded(8), "kfac", cfg, extra_ratios=(0.5,),
                                                          cache_dir=tmp_path / "cache1")).name  # same key
    assert [l.name for l in two.layers] == [l.name for l in one.layers]
    assert two.meta["world_size"] == 2
    for l in one.layers:
        np.testing.assert_allclose(two.spectra[l.name], one.spectra[l.name], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(two.kl_ref, one.kl_ref, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(two.measured[0.5], one.measured[0.5], rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(two.measured_nll[0.5], one.measured_nll[0.5], rtol=1e-4)
    assert np.isfinite(two.kl_ref).all()


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
    from lems_core.model import LoadedModel, model_fingerprint, tiny_model
    from lems_core.offload import is_offloaded, load_offloaded

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
        build_profile(tiny_loaded(8), "kfac", cfg, cache_dir=tmp_path, max_memory=4096)
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--max-memory", "plenty"])
    assert exc.value.code == 2
    assert "cannot read memory size" in capsys.readouterr().err


def test_profile_built_under_a_budget_matches_the_classic_one(tmp_path, corpus, one_thread):
    """Streamed (2 windows, factors on disk) vs all Grams at once: same spectra and KL, same profile key."""
    from lems_core.pipeline import build_profile
    from lems_core.profile import Profile

    cfg = CalibrationConfig(dataset=str(corpus), split="train", n_samples=2, seq_len=32, seed=1, n_search=1)
    loaded = tiny_loaded(8)
    budget = _stream_plan(loaded, 2).max_memory
    classic = build_profile(loaded, "kfac", cfg, cache_dir=tmp_path / "a")
    streamed = build_profile(loaded, "kfac", cfg, cache_dir=tmp_path / "b", max_memory=budget)
    assert classic.name == streamed.name
    a, b = Profile.load(classic), Profile.load(streamed)
    assert b.meta["max_memory"] == budget
    for l in a.layers:
        np.testing.assert_allclose(b.spectra[l.name], a.spectra[l.name], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(b.kl_ref, a.kl_ref, rtol=1e-3, atol=1e-7)
    assert list((tmp_path / "b" / "tensors" / "factor_blocks").glob("*/block_0002.safetensors"))


def test_kl_sweep_on_an_offloaded_model_equals_the_whole_model(tmp_path, one_thread):
    """Single-layer KL with blocks on disk: the low-rank stand-in is built on the factors' device."""
    from lems_core.model import LoadedModel, tiny_model
    from lems_core.offload import load_offloaded
    from lems_core.sensitivity import layer_kl_sweep

    whole, off = _whole_and_offloaded(tmp_path)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    plan = plan_stream(compressible_layers(whole), "svd_llm", None, "cpu")
    fa = streamed_factorizations(LoadedModel(whole, None, "w", "w"), ids, "svd_llm", DecompositionOptions(),
                                 tmp_path / "fa", plan)
    fb = streamed_factorizations(off, ids, "svd_llm", DecompositionOptions(), tmp_path / "fb", plan)
    layers = compressible_layers(whole)
    sa, _ = layer_kl_sweep(whole, layers, lambda l: fa[l.name], ids, [0.3])
    sb, _ = layer_kl_sweep(off.model, layers, lambda l: fb[l.name], ids, [0.3])
    assert np.isfinite(sb[0.3]).all() and (sb[0.3] > 0).all()
    np.testing.assert_allclose(sb[0.3], sa[0.3], rtol=1e-4, atol=1e-8)
