"""ERC-SVD (other-seed-methods.md §2): REC residual compensation and PLC partial-layer compression."""
import numpy as np
import pytest
import torch

from lems_core.allocators import BudgetBelowMinimumError, allocate, params_of, realised_ratio
from lems_core.calibration import CalibrationConfig
from lems_core.decompositions import Decomposer
from lems_core.decompositions.erc import rec_factorization, rec_factorizations, rec_ranks
from lems_core.allocators.erc_plc import allocate_erc_plc, plc_candidates, plc_keep_ratio
from lems_core.evaluation import make_final_error_scorer
from lems_core.model import compressible_layers, tiny_model
from lems_core.pipeline import calibration_windows, factorizations_for, plan_factorizations
from lems_core.profile import synthetic_profile
from lems_core.run import Run
from lems_core.statistics import collect_input_stats

from helpers import tiny_loaded


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(model, ids):
    stats = collect_input_stats(model, ids)
    dec = Decomposer("svd_llm")
    return {l.name: dec(l, model.get_submodule(l.name).weight, stats[l.name]) for l in compressible_layers(model)}, stats


# ----------------------------------------------------------------- REC
def test_rec_rank_split():
    layer = compressible_layers(tiny_model("llama", seed=0, hidden_size=128, intermediate_size=320))[4]  # 320x128
    assert layer.eq_rank == 91
    assert rec_ranks(layer, 60) == (56, 4)  # r_r = int(0.05 * 91) = 4
    assert rec_ranks(layer, 3) == (1, 2)  # capped so the whitened stage keeps >= 1
    assert rec_ranks(layer, 1) == (1, 0)


@pytest.mark.parametrize("keep", [0.8, 0.5, 0.3])
def test_rec_weight_error_at_most_svd_llm(model, base, keep):
    """Theorem 3: ||W - W_hat||_F <= ||W - SVD-LLM_r(W)||_F at the same total rank and params."""
    factors, _ = base
    strictly = 0
    for layer in compressible_layers(model):
        rank = max(1, int(keep * layer.eq_rank))
        w = model.get_submodule(layer.name).weight.detach().double()
        rec = rec_factorization(w, factors[layer.name], layer, rank)
        assert rec.left.shape == (layer.out_features, rank) and rec.right.shape == (rank, layer.in_features)
        assert rec.left.numel() + rec.right.numel() == layer.rank_params(rank)
        e_rec = float((w - rec.weight(rank).double()).norm())
        e_svd = float((w - factors[layer.name].weight(rank).double()).norm())
        assert e_rec <= e_svd * (1 + 1e-6)
        strictly += e_rec < e_svd * (1 - 1e-4)
    assert strictly >= 14  # a real improvement where r_r >= 1 (21 layers)


def test_rec_trades_activation_error(model, base):
    """[DERIVED]: on the calibration activation loss REC is never better than SVD-LLM."""
    factors, stats = base
    for layer in compressible_layers(model)[:7]:
        rank = int(0.5 * layer.eq_rank)
        w = model.get_submodule(layer.name).weight.detach().double()
        gram = stats[layer.name].gram.double()
        loss = lambda wr: float(torch.trace((w - wr.double()) @ gram @ (w - wr.double()).T))
        assert loss(rec_factorization(w, factors[layer.name], layer, rank).weight(rank)) >= \
            loss(factors[layer.name].weight(rank)) * (1 - 1e-4)


# ----------------------------------------------------------------- PLC
def test_plc_keep_ratio_matches_paper_formula():
    profile = synthetic_profile(num_blocks=8)
    # removed convention: R_l = N R_o / k, kept 1 - R_l
    assert plc_keep_ratio(profile, 0.8, 4) == pytest.approx(1 - 8 * 0.2 / 4)
    assert plc_candidates(32) == list(range(2, 33, 2))
    assert plc_candidates(3) == [1, 2, 3]


@pytest.mark.parametrize("ratio", [0.9, 0.7, 0.5])
def test_plc_budget_holds_and_k_search_picks_min_score(ratio):
    profile = synthetic_profile(num_blocks=8)
    calls = []

    def score(ranks):  # a stand-in error, minimal at k = 6 compressed blocks
        k = len({l.block for l in profile.layers if ranks[l.name] is not None})
        calls.append(k)
        return (k - 6) ** 2 + 0.1 * k

    alloc = allocate(profile, "erc_plc", ratio, score_fn=score)
    trials = alloc.info["trials"]
    feasible = [t for t in trials if t["feasible"]]
    assert alloc.info["k"] == min(feasible, key=lambda t: t["score"])["k"]
    assert alloc.info["k"] == 6
    assert sorted(calls) == sorted(t["k"] for t in feasible)  # infeasible k are never scored
    assert params_of(profile, alloc.ranks) <= ratio * profile.total_params
    assert realised_ratio(profile, alloc.ranks) > ratio - 0.02  # the budget is used, not wasted
    first = profile.num_blocks - alloc.info["k"]
    assert all((r is None) == (l.block < first) for l in profile.layers for r in [alloc.ranks[l.name]])
    for t in trials:  # k is feasible iff each compressed block keeps more than 5%
        assert t["feasible"] == (t["block_keep"] > 0.05)


def test_plc_infeasible_everywhere_is_a_clear_error():
    profile = synthetic_profile(num_blocks=8)
    with pytest.raises(BudgetBelowMinimumError, match="erc_plc"):
        allocate_erc_plc(profile, 0.7, lambda r: 0.0, candidates=[1, 2])  # keep 1 - 8*0.3/k < 0.05
    with pytest.raises(BudgetBelowMinimumError):
        allocate_erc_plc(profile, 0.04, lambda r: 0.0)


def test_plc_with_final_error_on_tiny_model(model, ids, base):
    """The paper's metric end to end: REC factors, final-block output error, argmin k."""
    factors, _ = base
    from lems_core.profile import Profile
    layers = compressible_layers(model)
    profile = Profile("tiny", "t", "svd_llm", {}, layers, {n: f.sigma for n, f in factors.items()})
    scorer = make_final_error_scorer(model, ids, lambda ranks: rec_factorizations(model, factors, ranks))
    alloc = allocate_erc_plc(profile, 0.8, scorer)
    feasible = [t for t in alloc.info["trials"] if t["feasible"]]
    assert [t["k"] for t in feasible] == [1, 2, 3]
    assert alloc.objective == min(t["score"] for t in feasible)
    assert alloc.objective == pytest.approx(scorer(alloc.ranks))


# ----------------------------------------------------------------- pipeline
def test_erc_through_the_pipeline(tmp_path):
    loaded = tiny_loaded(5)
    m = loaded.model
    path = tmp_path / "corpus.txt"
    path.write_text("".join(chr(c) for c in np.random.default_rng(0).integers(32, 127, 20000)))
    cfg = CalibrationConfig(dataset=str(path), split="train", n_samples=2, seq_len=32, seed=1, n_search=1)
    ranks = {l.name: int(0.6 * l.eq_rank) for l in compressible_layers(m)}
    ours = plan_factorizations(loaded, cfg, "erc", ranks, run=Run(cache_dir=tmp_path / "c"))
    calib, _ = calibration_windows(loaded, cfg)
    base = factorizations_for(loaded, cfg, "svd_llm", calib_ids=calib, run=Run(cache_dir=tmp_path / "c"))
    expected = rec_factorizations(m, base, ranks)
    assert set(ours) == set(expected) == set(ranks)
    for name, f in ours.items():
        assert torch.allclose(f.weight(ranks[name]), expected[name].weight(ranks[name]), atol=1e-6)
