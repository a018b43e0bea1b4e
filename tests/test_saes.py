"""SAES-SVD (other-seed-methods.md §1): CEALC closed form, ACES, closed loop; SVD-LLM v2 selectable."""
import numpy as np
import pytest
import torch

from lems_core.calibration import CalibrationConfig
from lems_core.decompositions import Decomposer
from lems_core.evaluation import make_final_error_scorer
from lems_core.model import compressible_layers
from lems_core.pipeline import BASE_DECOMPOSITION, RANK_DEPENDENT, plan_factorizations, statistics_for
from lems_core.run import Run
from lems_core.decompositions.saes import (FsFoa, GroupStats, SaesOptions, Whitening, aces_beta, cealc_factorization,
                                           fs_foa, saes_factorizations)
from lems_core.statistics import collect_input_stats

from helpers import uniform_ranks, tiny_loaded


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- CEALC
def test_beta_zero_is_svd_llm_exactly(model, ids):
    """beta = 0: G = W K, the SVD-LLM whitened weight, whatever Delta is (§1.3 [DERIVED])."""
    stats = collect_input_stats(model, ids)
    layer = compressible_layers(model)[4]  # gate_proj of block 0
    weight = model.get_submodule(layer.name).weight
    gram = stats[layer.name].gram
    delta = torch.randn(gram.shape, generator=torch.Generator().manual_seed(1)) * gram.abs().mean()
    white = Whitening.of(GroupStats(gram, delta))
    rank = layer.eq_rank // 2
    ours = cealc_factorization(weight, white, 0.0, rank)
    ref = Decomposer("svd_llm")(layer, weight, stats[layer.name])
    assert np.allclose(ours.sigma, ref.sigma, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ours.weight(rank), ref.weight(rank), atol=1e-6)
    assert ours.max_rank == rank


def test_open_loop_beta_zero_reproduces_static_svd_llm(model, ids):
    """Both streams from the FP model and beta = 0: every layer equals static SVD-LLM."""
    ranks = uniform_ranks(model, 0.5)
    ours, betas = saes_factorizations(model, ranks, ids, SaesOptions(closed_loop=False, fixed_beta=0.0))
    stats = collect_input_stats(model, ids)
    dec = Decomposer("svd_llm")
    assert set(betas.values()) == {0.0}
    for layer in compressible_layers(model):
        ref = dec(layer, model.get_submodule(layer.name).weight, stats[layer.name])
        assert torch.allclose(ours[layer.name].weight(ranks[layer.name]), ref.weight(ranks[layer.name]), atol=1e-5), layer.name


def test_beta_interpolates_towards_fp_target():
    """beta -> 1 regresses the FP output W X^f onto X: the unconstrained solution maps X to W X^f."""
    g = torch.Generator().manual_seed(2)
    n, tokens = 6, 200
    w = torch.randn(5, n, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    x_fp = x + 0.3 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    stats = GroupStats(torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64))
    stats.add(x, x_fp)
    f = cealc_factorization(w, Whitening.of(stats), 1.0, 5)  # full rank: plain least squares
    lstsq = torch.linalg.lstsq(x, x_fp @ w.T).solution.T
    assert torch.allclose(f.weight(5).double(), lstsq, atol=1e-4)


# ----------------------------------------------------------------- ACES
def _random_sd(seed, m=12, n=9, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(m, n, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(3, 0.1, n, dtype=torch.float64))
    return s, scale * torch.randn(m, n, generator=g, dtype=torch.float64)


def test_fs_foa_coefficients_are_the_projected_ratio():
    s, d = _random_sd(0)
    rank = 4
    coeffs = fs_foa(s, d, rank)
    u, _, vh = torch.linalg.svd(s)
    pl = torch.eye(12, dtype=s.dtype) - u[:, :rank] @ u[:, :rank].T
    pr = torch.eye(9, dtype=s.dtype) - vh[:rank].T @ vh[:rank]
    for beta in (0.0, 0.3, 0.9):
        g = s + beta * d
        direct = float((pl @ g @ pr).pow(2).sum() / g.pow(2).sum())
        assert coeffs.ratio(beta) == pytest.approx(direct, rel=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_stationary_quadratic_matches_numeric_derivative(seed):
    coeffs = fs_foa(*_random_sd(seed), rank=3)
    q2, q1, q0 = coeffs.stationary_quadratic()
    for beta in (0.1, 0.45, 0.8):
        h = 1e-6
        deriv = (coeffs.ratio(beta + h) - coeffs.ratio(beta - h)) / (2 * h)
        den = coeffs.A + 2 * coeffs.B * beta + coeffs.C * beta ** 2
        assert q2 * beta ** 2 + q1 * beta + q0 == pytest.approx(deriv * den ** 2 / 2, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_aces_closed_form_is_the_grid_argmin(seed):
    coeffs = fs_foa(*_random_sd(seed, scale=0.2 + 0.4 * seed), rank=3)
    opts = SaesOptions()
    beta = aces_beta(coeffs, opts)
    grid = np.linspace(opts.beta_min, opts.beta_max, 20001)
    assert opts.beta_min <= beta <= opts.beta_max
    assert coeffs.ratio(beta) <= coeffs.ratio(grid).min() + 1e-12


def test_aces_finds_an_interior_minimum():
    """Numerator (beta - 0.6)^2 + 0.01 over a constant denominator: the minimum is 0.6."""
    coeffs = FsFoa(a=0.37, b=-0.6, c=1.0, A=1.0, B=0.0, C=0.0)
    assert aces_beta(coeffs) == pytest.approx(0.6, abs=1e-12)
    wide = SaesOptions(beta_min=0.0, beta_max=0.5)
    assert aces_beta(coeffs, wide) == 0.5  # clipped to the interval's end
    assert aces_beta(coeffs, SaesOptions(beta_cap=0.4, shrink=0.5)) == pytest.approx(0.2)


# ----------------------------------------------------------------- closed loop
def test_closed_loop_reduces_final_block_error(model, ids):
    """At the same ranks, SAES-SVD's final-block output is closer to the FP model's than
    open-loop SVD-LLM's (tiny random llama, keep 0.5, 4x48 tokens: 0.37 vs 0.51;
    closed-loop beta = 0 alone is worse, 0.55, and fixed beta = 0.5 better, 0.27)."""
    ranks = uniform_ranks(model, 0.5)
    stats = collect_input_stats(model, ids)
    dec = Decomposer("svd_llm")
    svd_llm = {l.name: dec(l, model.get_submodule(l.name).weight, stats[l.name]) for l in compressible_layers(model)}
    ours, betas = saes_factorizations(model, ranks, ids)
    error = lambda factors: make_final_error_scorer(model, ids, lambda r: factors)(ranks)
    e_svd, e_saes = error(svd_llm), error(ours)
    assert e_saes < 0.9 * e_svd, (e_saes, e_svd)
    assert all(0.25 <= b <= 0.75 for b in betas.values())
    for layer in compressible_layers(model):  # sized to the plan's rank
        assert ours[layer.name].left.shape == (layer.out_features, ranks[layer.name])
        assert ours[layer.name].right.shape == (ranks[layer.name], layer.in_features)
        assert len(ours[layer.name].sigma) == min(layer.out_features, layer.in_features)


def test_dense_layers_are_skipped_and_model_untouched(model, ids):
    ranks = uniform_ranks(model, 0.5)
    dense = [n for n in ranks if ".mlp." in n]
    ranks.update({n: None for n in dense})
    before = {n: p.clone() for n, p in model.named_parameters()}
    ours, _ = saes_factorizations(model, ranks, ids)
    assert set(ours) == {n for n, r in ranks.items() if r is not None}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(type(model.get_submodule(n)).__name__ == "Linear" for n in ranks)


# ----------------------------------------------------------------- through the pipeline
@pytest.fixture()
def loaded():
    return tiny_loaded(3)


@pytest.fixture()
def cfg(tmp_path):
    rng = np.random.default_rng(0)  # random printable bytes: ~95 distinct tokens, full-rank activations
    path = tmp_path / "corpus.txt"
    path.write_text("".join(chr(c) for c in rng.integers(32, 127, 20000)))
    return CalibrationConfig(dataset=str(path), split="train", n_samples=2, seq_len=32, seed=1, n_search=1)


def test_svd_llm_v2_is_selectable_and_optimal(loaded, cfg, tmp_path):
    """"svd_llm_v2" through plan_factorizations equals the Decomposer, and its activation
    loss at rank r is the whitened tail energy (SVD-LLM v2 Theorem 3.1, methods.md §3.6)."""
    from dataclasses import replace
    cfg = replace(cfg, n_samples=4, seq_len=64)  # 256 tokens: well-conditioned Grams of the 64-wide inputs
    ranks = uniform_ranks(loaded.model, 0.6)
    factors = plan_factorizations(loaded, cfg, "svd_llm_v2", ranks, run=Run(cache_dir=tmp_path / "c"))
    from lems_core.pipeline import calibration_windows
    calib, _ = calibration_windows(loaded, cfg)
    stats = statistics_for(loaded, calib, cfg, "svd_llm_v2", run=Run(cache_dir=tmp_path / "c"))
    dec = Decomposer("svd_llm_v2")
    for layer in compressible_layers(loaded.model)[:4]:  # q k v o: 64-wide inputs
        w = loaded.model.get_submodule(layer.name).weight
        ref = dec(layer, w, stats.inputs[layer.name])
        r = ranks[layer.name]
        assert torch.allclose(factors[layer.name].weight(r), ref.weight(r), atol=1e-6)
        diff = (w - factors[layer.name].weight(r)).double()
        loss = float(torch.trace(diff @ stats.inputs[layer.name].gram.double() @ diff.T))
        assert loss == pytest.approx(float(np.sum(ref.sigma[r:] ** 2)), rel=1e-3)


def test_saes_is_registered_and_cached(loaded, cfg, tmp_path):
    assert BASE_DECOMPOSITION["saes"] == "svd_llm" and "saes" in RANK_DEPENDENT
    ranks = uniform_ranks(loaded.model, 0.5)
    ranks[compressible_layers(loaded.model)[0].name] = None
    cache = tmp_path / "c"
    first = plan_factorizations(loaded, cfg, "saes", ranks, run=Run(cache_dir=cache))
    assert set(first) == {n for n, r in ranks.items() if r is not None}
    assert list((cache / "tensors" / "factors").glob("*.safetensors"))
    again = plan_factorizations(loaded, cfg, "saes", ranks, run=Run(cache_dir=cache))
    for name, f in first.items():
        assert torch.equal(f.left, again[name].left) and np.array_equal(f.sigma, again[name].sigma)
