"""A profile built under ``max_memory`` through ``build_profile``, the path ``lems profile --max-memory`` runs.

The code's own accounting (the streamed build's Gram ledger, which also counts a
block's factors until they are written; the KL sweep's block-input ledger) stays
within the budget, and the factor tensors alive in Python do not grow with depth.
"""
import weakref

import pytest
import torch

from lems_core import blocks, streaming
from lems_core.calibration import CalibrationConfig
from lems_core.memory import GramLedger, grad_gram_bytes, input_gram_bytes
from lems_core.model import compressible_layers, decoder_blocks
from lems_core.pipeline import ProfileSettings, build_profile
from lems_core.pipeline import evaluation as pipeline_evaluation
from lems_core.profile import Profile
from lems_core.run import Run
from lems_core.streaming import block_factor_bytes, decomposition_workspace

from helpers import tiny_loaded, word_corpus


class _Watch:
    """Every ledger the build creates, and the factor tensors the decompositions returned (weakly)."""

    def __init__(self):
        self.ledgers: list[GramLedger] = []
        self.factors = weakref.WeakSet()
        self.alive_before_block: dict[int, int] = {}


@pytest.fixture()
def watch(monkeypatch):
    seen = _Watch()

    class Recorded(GramLedger):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.ledgers.append(self)

    class Watched(streaming.Decomposer):
        def __call__(self, *args, **kwargs):
            got = super().__call__(*args, **kwargs)
            seen.factors.update((got.left, got.right))
            return got

    real_decompose = streaming._decompose_block

    def decompose(loaded, block, *args, **kwargs):
        seen.alive_before_block[block.block] = len(seen.factors)  # after the previous block was written
        return real_decompose(loaded, block, *args, **kwargs)

    monkeypatch.setattr(streaming, "GramLedger", Recorded)
    monkeypatch.setattr(blocks, "GramLedger", Recorded)
    monkeypatch.setattr(pipeline_evaluation, "GramLedger", Recorded)
    monkeypatch.setattr(streaming, "Decomposer", Watched)
    monkeypatch.setattr(streaming, "_decompose_block", decompose)
    return seen


def test_a_budgeted_profile_keeps_its_ledgers_within_budget_and_holds_no_factors_across_blocks(
        tmp_path, watch, one_thread, budget_beyond_interpreter):
    loaded = tiny_loaded(5)
    layers = compressible_layers(loaded.model)
    block0 = [l for l in layers if l.block == 0]
    # room for the work arrays, one block's factors and about two blocks of Grams: more than one window
    budget = decomposition_workspace(layers) + block_factor_bytes(layers) + 2 * grad_gram_bytes(
        block0) + input_gram_bytes(block0)
    cfg = CalibrationConfig(dataset=str(word_corpus(tmp_path / "c.txt")), split="train", n_samples=2, seq_len=32,
                            seed=1, n_search=2)
    folder = build_profile(loaded, "kfac", cfg, ProfileSettings(bias_fit_ratios=(0.6,)),
                           run=Run(cache_dir=tmp_path, max_memory=budget))
    profile = Profile.load(folder)
    assert profile.kl_ref is not None and profile.bias_fit is not None  # the sweep and the fit ran
    grams = [l for l in watch.ledgers if l.what == "Gram"]
    sweep = [l for l in watch.ledgers if l.what == "block input"]
    fit = [l for l in watch.ledgers if l.what == "compressed block factor"]
    assert len(grams) == 1, "the statistics count in one ledger"
    assert 0 < grams[0].peak <= grams[0].limit <= budget
    assert grams[0].peak > grad_gram_bytes(block0)  # it counts the window's Grams and the factors
    assert all(l.peak <= l.limit <= budget for l in sweep)  # block inputs off the device (none on a CPU run)
    assert fit and all(0 < l.peak <= l.limit <= budget and l.live == 0 for l in fit)  # the bias fit's candidates
    one_block = max(sum(p.numel() * p.element_size() for p in b.parameters() if p.dim() == 2)
                    for b in decoder_blocks(loaded.model))
    assert max(l.peak for l in fit) <= one_block  # one block's truncated factors at a time, not the model's
    search = torch.zeros(cfg.n_search, cfg.seq_len, dtype=torch.long)
    assert sweep or blocks.block_input_bytes(loaded.model, search) <= budget  # kept in memory: they fit
    assert grams[0].live == 0
    n_blocks = len({l.block for l in layers})
    assert sorted(watch.alive_before_block) == list(range(n_blocks))
    assert all(n == 0 for n in watch.alive_before_block.values()), watch.alive_before_block  # none kept per block
    assert len(watch.factors) == 0  # nothing kept after the build


def test_a_per_block_compressed_forward_gives_the_whole_compressed_models_logits_one_block_at_a_time(tmp_path):
    """compressed_per_block (the budgeted bias fit's and evaluation's forward) equals compress_model's, with
    only the running block's low-rank Linears in the model and the dense model back afterwards."""
    from lems_core.compression import LowRankLinear, compress_model, compressed_per_block, restore_dense
    from lems_core.factor_store import FactorShards, finish, write_block
    from lems_core.decompositions import Decomposer
    from helpers import uniform_ranks

    loaded = tiny_loaded(7)
    model = loaded.model
    layers = compressible_layers(model)
    decompose = Decomposer("svd")
    factors = {l.name: decompose(l, model.get_submodule(l.name).weight.detach()) for l in layers}
    for block in sorted({l.block for l in layers}):
        write_block(tmp_path, block, {l.name: factors[l.name] for l in layers if l.block == block})
    finish(tmp_path, {l.name: l.block for l in layers}, "fp32")
    shards = FactorShards(tmp_path)
    ranks = uniform_ranks(model, 0.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        originals = {name: model.get_submodule(name) for name in ranks}
        compress_model(model, ranks, lambda l: factors[l.name])
        whole = model(ids).logits
        restore_dense(model, originals)
        live_counts = []
        watchers = [b.register_forward_hook(lambda *_: live_counts.append(
            sum(isinstance(m, LowRankLinear) for m in model.modules()))) for b in decoder_blocks(model)]
        ledger = GramLedger()
        with compressed_per_block(model, ranks, lambda l: shards.truncated(l.name), ledger) as applied:
            streamed = model(ids).logits
        for w in watchers:
            w.remove()
        after = model(ids).logits
    per_block = max(sum(1 for l in layers if l.block == b and applied[l.name] is not None)
                    for b in {l.block for l in layers})
    assert max(live_counts) == per_block > 0  # the running block only (its hook runs before the swap-out)
    assert ledger.live == 0 and ledger.peak > 0
    eps = torch.finfo(torch.float32).eps
    scale = whole.abs().max().item()
    assert torch.allclose(streamed, whole, atol=64 * eps * scale, rtol=0)
    assert torch.equal(after, dense) and not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_a_budget_sets_aside_what_the_process_already_holds(tmp_path, monkeypatch):
    """--max-memory bounds the process beyond the weights: the build's plan sets the interpreter's share aside first."""
    from lems_core.memory import MemoryBudgetError, process_overhead
    from lems_core.pipeline import artefacts

    loaded = tiny_loaded(5)
    assert process_overhead(loaded.model, "cuda") == 0  # a GPU budget: the CUDA context is outside it
    assert process_overhead(loaded.model, "cpu") > 0  # the interpreter and torch, beyond the weights
    layers = compressible_layers(loaded.model)
    block0 = [l for l in layers if l.block == 0]
    needed = decomposition_workspace(layers) + block_factor_bytes(layers) + grad_gram_bytes(block0) + input_gram_bytes(block0)
    free = streaming.plan_stream(layers, "kfac", needed + 10**6, "cpu")
    reserved = streaming.plan_stream(layers, "kfac", needed + 10**6 + 5 * 10**6, "cpu", reserve=5 * 10**6)
    assert reserved.gram_budget == free.gram_budget and reserved.windows == free.windows
    with pytest.raises(MemoryBudgetError, match="what the process already holds"):
        streaming.plan_stream(layers, "kfac", needed, "cpu", reserve=needed)
    planned = []
    real_plan = artefacts.plan_stream
    monkeypatch.setattr(artefacts, "process_overhead", lambda *_: 123_456)
    monkeypatch.setattr(artefacts, "plan_stream", lambda *a, **k: planned.append(real_plan(*a, **k)) or planned[-1])
    cfg = CalibrationConfig(dataset=str(word_corpus(tmp_path / "c.txt")), split="train", n_samples=2, seq_len=16,
                            seed=1, n_search=1)
    build_profile(loaded, "svd_llm", cfg, ProfileSettings(bias_fit_ratios=()), run=Run(cache_dir=tmp_path,
                                                                                         max_memory=2**30))
    assert planned and all(p.reserve == 123_456 for p in planned)


def test_weights_mapped_from_their_files_are_not_taken_for_the_processs_own_memory(tmp_path):
    """A folder's weights loaded by transformers sit in the safetensors file's mapping (RssFile): the overhead
    subtracts only the parameters in anonymous memory, so it is not understated by the weights' size."""
    from transformers import AutoModelForCausalLM

    from lems_core.memory import _inside, file_mappings, process_overhead, status_bytes
    from lems_core.model import tiny_model

    tiny_model("llama", seed=0, vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4).save_pretrained(tmp_path / "m")  # ~10 MB of weights
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    mapped = file_mappings()
    assert mapped and all(end > start >= 0 and rss >= 0 for start, end, rss in mapped)
    params = list(model.parameters())
    in_file = {id(p) for p in params if _inside(p.data_ptr(), mapped)}
    anon = sum(p.numel() * p.element_size() for p in params if id(p) not in in_file)
    before = status_bytes("RssAnon")
    overhead = process_overhead(model, "cpu")
    after = status_bytes("RssAnon")
    mapped_bytes = sum(p.numel() * p.element_size() for p in params if id(p) in in_file)
    assert mapped_bytes > 4 * 2**20  # loaded memory-mapped, as from any folder
    slack = 2**20  # RssAnon moves by a few pages between the three reads
    assert before - anon - slack <= overhead <= after - anon + slack  # RssAnon less only the anonymous weights


def test_every_tensor_the_gram_ledger_released_is_gone_before_it_counts_the_next(
        tmp_path, monkeypatch, one_thread, budget_beyond_interpreter):
    """The ledger's live bytes are what is alive: a block's input Grams die when the build releases them, not
    when the next block's statistics start (else they sit, uncounted, through the next window's backward)."""
    stale: list[str] = []

    class Checked(GramLedger):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.refs: dict[str, weakref.ref] = {}
            self.released: dict[str, weakref.ref] = {}

        def take(self, key, tensor):
            stale.extend(k for k, ref in self.released.items() if ref() is not None)
            self.released.clear()
            self.refs[key] = weakref.ref(tensor)
            return super().take(key, tensor)

        def release(self, key):
            if key in self.refs:
                self.released[key] = self.refs.pop(key)
            super().release(key)

        def release_prefix(self, prefix):
            for key in [k for k in self.refs if k.startswith(prefix)]:
                self.released[key] = self.refs.pop(key)
            super().release_prefix(prefix)

    monkeypatch.setattr(streaming, "GramLedger", Checked)
    loaded = tiny_loaded(5)
    layers = compressible_layers(loaded.model)
    block0 = [l for l in layers if l.block == 0]
    budget = decomposition_workspace(layers) + block_factor_bytes(layers) + grad_gram_bytes(
        block0) + input_gram_bytes(block0)  # one block per window
    cfg = CalibrationConfig(dataset=str(word_corpus(tmp_path / "c.txt")), split="train", n_samples=2, seq_len=16,
                            seed=1, n_search=1)
    build_profile(loaded, "kfac", cfg, ProfileSettings(measure_scale=False, bias_fit_ratios=()),
                  run=Run(cache_dir=tmp_path, max_memory=budget))
    assert not stale, stale


def test_a_cpu_budget_hands_freed_memory_back_to_the_os_before_the_process_is_measured(tmp_path, monkeypatch):
    """glibc's heap keeps freed Grams under its moving mmap threshold as resident holes; a budgeted CPU build
    fixes the threshold (``memory.release_freed_memory``) before it measures what the process holds."""
    import platform

    from lems_core import memory
    from lems_core.pipeline import artefacts

    assert memory.release_freed_memory("cuda") is False  # a GPU budget does not bound the CPU heap
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert memory.release_freed_memory("cpu") is True
    calls = []
    monkeypatch.setattr(artefacts, "release_freed_memory", lambda device: calls.append(("release", str(device))))
    monkeypatch.setattr(artefacts, "process_overhead", lambda *_: calls.append(("reserve",)) or 0)
    cfg = CalibrationConfig(dataset=str(word_corpus(tmp_path / "c.txt")), split="train", n_samples=2, seq_len=16,
                            seed=1, n_search=1)
    build_profile(tiny_loaded(2), "svd_llm", cfg, ProfileSettings(bias_fit_ratios=()),
                  run=Run(cache_dir=tmp_path, max_memory=2**30))
    assert calls == [("release", "cpu"), ("reserve",)]
