"""LC-SVD (other-seed-methods.md §3, reconstructed): block-collaborative subspaces and the rank search."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from lems_core import pipeline
from lems_core.allocators import allocate, params_of
from lems_core.calibration import CalibrationConfig
from lems_core.decompositions import SPECS, Decomposer
from lems_core.decompositions.lcsvd import LcOptions, lcsvd_factorizations, svd_llm_subspace
from lems_core.budget import block_params
from lems_core.evaluation import make_final_error_scorer
from lems_core.allocators.lcsvd_search import allocate_lcsvd_search, project_to_budget, sensitivity_prior
from lems_core.model import compressible_layers
from lems_core.profile import synthetic_profile
from lems_core.run import Run
from lems_core.statistics import collect_input_stats

from helpers import uniform_ranks, tiny_loaded


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- decomposition
def test_initial_subspace_is_svd_llm(model, ids):
    """[DERIVED]: U_r U_r^T W with U_r from SVD(W chol(H)) is the SVD-LLM rank-r weight."""
    stats = collect_input_stats(model, ids)
    for layer in compressible_layers(model)[:7]:
        w = model.get_submodule(layer.name).weight
        rank = layer.eq_rank // 2
        u, sigma = svd_llm_subspace(w, stats[layer.name].gram, rank)
        ref = Decomposer("svd_llm")(layer, w, stats[layer.name])
        assert torch.allclose((u @ (u.T @ w.double())).float(), ref.weight(rank), atol=1e-5)
        assert np.allclose(sigma, ref.sigma)


def test_learned_subspaces_do_not_increase_block_loss(model, ids):
    """Each block's output loss after training <= its SVD-LLM initialisation (tiny llama,
    keep 0.5, 20 Adam steps: 0.055/0.092/0.102 -> 0.028/0.049/0.055), and the final block's
    output error is below open-loop SVD-LLM's (0.24 vs 0.51)."""
    ranks = uniform_ranks(model, 0.5)
    factors, records = lcsvd_factorizations(model, ranks, ids, LcOptions(max_steps=20, lr=2e-3))
    assert set(records) == {0, 1, 2}
    for rec in records.values():
        assert rec.final_loss <= rec.init_loss
    assert any(rec.final_loss < 0.9 * rec.init_loss for rec in records.values())
    for layer in compressible_layers(model):
        assert factors[layer.name].left.shape == (layer.out_features, ranks[layer.name])
    stats = collect_input_stats(model, ids)
    dec = Decomposer("svd_llm")
    svd_llm = {l.name: dec(l, model.get_submodule(l.name).weight, stats[l.name]) for l in compressible_layers(model)}
    error = lambda f: make_final_error_scorer(model, ids, lambda r: f)(ranks)
    assert error(factors) < error(svd_llm)


def test_minibatch_training_and_local_target_run(model, ids):
    ranks = uniform_ranks(model, 0.5)
    ranks.update({n: None for n in ranks if ".layers.1." in n})  # a dense block is skipped
    _, records = lcsvd_factorizations(model, ranks, ids, LcOptions(max_steps=4, batches_per_step=2, target="local"))
    assert set(records) == {0, 2}
    assert all(r.final_loss <= r.init_loss and r.steps <= 4 for r in records.values())


def test_lcsvd_through_the_pipeline(tmp_path, monkeypatch):
    assert pipeline.BASE_DECOMPOSITION["lcsvd"] == "svd_llm" and "lcsvd" in pipeline.RANK_DEPENDENT
    monkeypatch.setitem(SPECS, "lcsvd", replace(SPECS["lcsvd"], options=LcOptions(max_steps=3)))

    loaded = tiny_loaded(6)
    m = loaded.model
    path = tmp_path / "corpus.txt"
    path.write_text("".join(chr(c) for c in np.random.default_rng(0).integers(32, 127, 20000)))
    cfg = CalibrationConfig(dataset=str(path), split="train", n_samples=2, seq_len=32, seed=1, n_search=1)
    ranks = uniform_ranks(m, 0.6)
    factors = pipeline.plan_factorizations(loaded, cfg, "lcsvd", ranks, run=Run(cache_dir=tmp_path / "c"))
    assert set(factors) == set(ranks)
    with pipeline.compressed(loaded, ranks, factors):
        assert torch.isfinite(m(torch.arange(16)[None]).logits).all()


# ----------------------------------------------------------------- rank search
def test_projection_meets_the_budget_exactly():
    rng = np.random.default_rng(0)
    weights = rng.uniform(1, 3, 10)
    removed = rng.uniform(-0.5, 1.5, 10)
    out = project_to_budget(removed, weights, 0.3 * weights.sum(), 0.0, 0.95)
    assert (weights * out).sum() == pytest.approx(0.3 * weights.sum(), rel=1e-9)
    assert out.min() >= 0 and out.max() <= 0.95
    assert np.all(np.diff(out[np.argsort(removed)]) >= -1e-12)  # order preserved


def test_prior_compresses_sensitive_blocks_less():
    sens = np.array([3.0, 1.0, 0.5, 0.2, 0.1, 0.1])
    removed = sensitivity_prior(sens, 0.7, np.ones(6), 1.0, 0.0, 0.95)
    assert removed.mean() == pytest.approx(0.3)
    assert np.all(np.diff(removed) >= 0) and removed[0] < removed[-1]


def _score(profile):
    """A stand-in for calibration PPL: block 0 and the last block hurt most when compressed."""
    hurt = np.array([4.0, 1.0, 0.8, 0.7, 0.8, 2.0])

    def score(ranks):
        lost = np.zeros(profile.num_blocks)
        for l in profile.layers:
            r = ranks[l.name]
            lost[l.block] += 0.0 if r is None else (1 - r / l.eq_rank) ** 2
        return float(np.exp((hurt * lost).sum() / 10))
    return score


@pytest.mark.parametrize("ratio", [0.8, 0.5])
def test_search_meets_budget_is_reproducible_and_picks_argmin(ratio):
    profile = synthetic_profile(num_blocks=6)
    a = allocate(profile, "lcsvd_search", ratio, score_fn=_score(profile), n_candidates=12, seed=3)
    b = allocate_lcsvd_search(profile, ratio, _score(profile), n_candidates=12, seed=3)
    assert a.ranks == b.ranks and a.info["trials"] == b.info["trials"]
    assert params_of(profile, a.ranks) <= ratio * profile.total_params
    trials = a.info["trials"]
    assert [t["candidate"] for t in trials[:2]] == ["uniform", "prior"] and len(trials) == 14
    scored = [t["score"] for t in trials if t["score"] is not None]
    assert a.objective == min(scored)
    assert a.objective <= trials[0]["score"]  # never worse than uniform
    keep = np.array(a.info["prior_keep"])
    assert keep[0] > keep[2]  # the sensitive first block is compressed less by the prior
    for t in trials:  # every candidate is on the budget before rounding
        assert (block_params(profile) * (1 - np.array(t["block_keep"]))).sum() == \
            pytest.approx((1 - ratio) * profile.total_params, rel=1e-6)
    other = allocate_lcsvd_search(profile, ratio, _score(profile), n_candidates=12, seed=4)
    assert other.info["trials"][2:] != trials[2:]
