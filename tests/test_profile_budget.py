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
from lems_core.model import compressible_layers
from lems_core.pipeline import ProfileSettings, build_profile
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
    monkeypatch.setattr(streaming, "Decomposer", Watched)
    monkeypatch.setattr(streaming, "_decompose_block", decompose)
    return seen


def test_a_budgeted_profile_keeps_its_ledgers_within_budget_and_holds_no_factors_across_blocks(
        tmp_path, watch, one_thread):
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
    assert len(grams) == 1, "the statistics count in one ledger"
    assert 0 < grams[0].peak <= grams[0].limit <= budget
    assert grams[0].peak > grad_gram_bytes(block0)  # it counts the window's Grams and the factors
    assert all(l.peak <= l.limit <= budget for l in sweep)  # block inputs off the device (none on a CPU run)
    search = torch.zeros(cfg.n_search, cfg.seq_len, dtype=torch.long)
    assert sweep or blocks.block_input_bytes(loaded.model, search) <= budget  # kept in memory: they fit
    assert grams[0].live == 0
    n_blocks = len({l.block for l in layers})
    assert sorted(watch.alive_before_block) == list(range(n_blocks))
    assert all(n == 0 for n in watch.alive_before_block.values()), watch.alive_before_block  # none kept per block
    assert len(watch.factors) == 0  # nothing kept after the build
