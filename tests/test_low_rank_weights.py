"""A layer whose weight has lower rank than the kept rank: exact, finite factors everywhere.

One Linear of a tiny LLaMA is set to an exact rank-2 product W = A @ B (small
integers over a power of two, so every entry is exact in float32 and W has rank 2
in any precision). Its whitened matrix then has min(m, n) - 2 zero singular values
inside the kept rank; every decomposition must give finite factors for them, and a
non-finite factor reaching a stage (profile build, evaluate, compress) is refused
there with an error naming the layer.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch

from lems_core.compression import compress_model
from lems_core.decompositions import METHODS, RANK_DEPENDENT, SPECS, Decomposer, Factorization
from lems_core.evaluation import EvalProtocol
from lems_core.model import compressible_layers, model_fingerprint
from lems_core.run import Run
from lems_core.statistics import collect_fisher_rows, collect_grad_grams, collect_input_stats

from helpers import tiny_loaded, word_corpus

LOW_RANK = "model.layers.1.mlp.down_proj"  # 64 x 160: eq 45, so the kept rank spans 43 zero directions
TRUE_RANK = 2
EPS32 = torch.finfo(torch.float32).eps


def exact_rank_two(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A @ B with entries k/16, |k| <= 4: each product entry is a sum of two multiples of 2^-8, exact in float32."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-4, 5, (rows, TRUE_RANK), generator=g).float() / 16
    b = torch.randint(-4, 5, (TRUE_RANK, cols), generator=g).float() / 16
    return a @ b


def with_low_rank_layer(seed: int = 5):
    """A tiny loaded LLaMA whose LOW_RANK layer holds an exact rank-2 weight."""
    loaded = tiny_loaded(seed)
    linear = loaded.model.get_submodule(LOW_RANK)
    with torch.no_grad():
        linear.weight.copy_(exact_rank_two(linear.out_features, linear.in_features, seed))
    loaded.fingerprint = model_fingerprint(loaded.model)
    return loaded


@pytest.fixture(scope="module")
def setup():
    loaded = with_low_rank_layer()
    model = loaded.model
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    stats = collect_input_stats(model, ids), collect_grad_grams(model, ids), collect_fisher_rows(model, ids)
    return loaded, ids, {l.name: l for l in compressible_layers(model)}, stats


def static_factors(setup, method: str, name: str) -> Factorization:
    loaded, _, layers, (inputs, grads, fisher) = setup
    weight = loaded.model.get_submodule(name).weight
    return Decomposer(method)(layers[name], weight, inputs[name], grads[name], fisher[name])


def product_bound(left: torch.Tensor, right: torch.Tensor) -> float:
    """Frobenius bound on left @ right - W for float32 factors of an exact float64 factorisation:
    each factor carries a relative rounding of at most eps32 / 2 per entry, so
    ||dL R + L dR|| <= eps32 ||L|| ||R||; twice that leaves room for the float64 work."""
    return 2 * EPS32 * float(torch.linalg.norm(left.double()) * torch.linalg.norm(right.double()))


def test_the_weight_really_has_rank_two(setup):
    weight = setup[0].model.get_submodule(LOW_RANK).weight.detach().double().numpy()
    assert np.linalg.matrix_rank(weight) == TRUE_RANK


@pytest.mark.parametrize("method", METHODS)
def test_static_factors_are_finite_and_reproduce_the_weight(setup, method):
    """Every static method: finite factors up to eq; at any rank >= 2 they rebuild W (M = P W Q has rank 2)."""
    f = static_factors(setup, method, LOW_RANK)
    assert f.max_rank > TRUE_RANK
    assert np.all(np.isfinite(f.sigma)) and torch.isfinite(f.left).all() and torch.isfinite(f.right).all()
    weight = setup[0].model.get_submodule(LOW_RANK).weight.double()
    for rank in (TRUE_RANK, TRUE_RANK + 1, f.max_rank):
        left, right = f.factors(rank)
        error = float(torch.linalg.norm(left.double() @ right.double() - weight))
        assert error <= product_bound(left, right), f"{method} at rank {rank}"


def test_plain_svd_spectrum_is_zero_past_the_true_rank(setup):
    """numpy's matrix_rank tolerance (s_max * eps * max(m, n)) bounds the spectrum past the rank."""
    f = static_factors(setup, "svd", LOW_RANK)
    layer = setup[2][LOW_RANK]
    tolerance = f.sigma[0] * np.finfo(np.float64).eps * max(layer.out_features, layer.in_features)
    assert np.all(f.sigma[:TRUE_RANK] > tolerance) and np.all(f.sigma[TRUE_RANK:] <= tolerance)


@pytest.mark.parametrize("method", RANK_DEPENDENT)
def test_rank_dependent_factors_are_finite(setup, method):
    """The closed-loop / residual / block-trained methods at a rank above 2 on the rank-2 layer."""
    loaded, ids, layers, _ = setup
    spec = SPECS[method]
    ranks = {name: (max(TRUE_RANK, int(0.8 * l.eq_rank)) if l.block == 1 else None) for name, l in layers.items()}
    base = {name: static_factors(setup, spec.base, name) for name in layers} if spec.base_factors else None
    options = dataclasses.replace(spec.options, max_steps=3) if method == "lcsvd" else spec.options
    factors = spec.factorizations(loaded.model, ranks, ids, options, base, None)
    f = factors[LOW_RANK]
    assert f.max_rank == ranks[LOW_RANK]
    assert torch.isfinite(f.left).all() and torch.isfinite(f.right).all()


def test_evaluate_keeping_more_than_the_true_rank_gives_a_finite_perplexity(tmp_path, monkeypatch):
    from lems_core import pipeline
    from lems_core.calibration import CalibrationConfig
    from lems_core.plan import from_loadconfig

    loaded = with_low_rank_layer()
    monkeypatch.setattr(pipeline.models, "get_model", lambda source, device=None, offload=None: loaded)
    corpus = word_corpus(tmp_path / "corpus.txt")
    cfg = CalibrationConfig(dataset=str(corpus), split="train", n_samples=3, seq_len=48, seed=1, n_search=2)
    layers = compressible_layers(loaded.model)
    plan = from_loadconfig({l.name: 0.8 for l in layers}, layers, "tiny-llama", loaded.fingerprint,
                           decomposition="svd", meta={"calibration": cfg.to_dict()})
    assert plan.ranks()[LOW_RANK] > TRUE_RANK
    result = pipeline.evaluate_plan(plan, [str(corpus)], EvalProtocol(32, 2), run=Run(cache_dir=tmp_path / "c"))
    assert all(math.isfinite(p) for p in result.ppl.values()) and math.isfinite(result.kl)


# ------------------------------------------------------------ non-finite factors are refused, naming the layer
def poisoned(f: Factorization) -> Factorization:
    """``f`` with one NaN in the first column of its left factor (used at every rank)."""
    left = f.left.clone()
    left[0, 0] = float("nan")
    return Factorization(f.sigma, left, f.right)


def test_compress_refuses_a_non_finite_factor(setup):
    from lems_core.decompositions import NonFiniteFactorsError

    loaded = with_low_rank_layer()
    layer = compressible_layers(loaded.model)[3]
    bad = poisoned(static_factors(setup, "svd", layer.name))
    with pytest.raises(NonFiniteFactorsError, match=layer.name):
        compress_model(loaded.model, {layer.name: 4}, lambda l: bad)


def test_the_kl_sweep_refuses_a_non_finite_factor(setup):
    from lems_core.decompositions import NonFiniteFactorsError
    from lems_core.sensitivity import SweepOptions, layer_kl_sweep

    loaded, ids, layers, _ = setup
    factors = {LOW_RANK: poisoned(static_factors(setup, "svd", LOW_RANK))}
    with pytest.raises(NonFiniteFactorsError, match=LOW_RANK):
        layer_kl_sweep(loaded.model, list(layers.values()), lambda l: factors[l.name], ids, [0.5],
                       SweepOptions(only={LOW_RANK}))


def test_the_decomposer_refuses_a_non_finite_weight(setup):
    from lems_core.decompositions import NonFiniteFactorsError

    layer = setup[2][LOW_RANK]
    weight = setup[0].model.get_submodule(LOW_RANK).weight.detach().clone()
    weight[1, 2] = float("inf")
    with pytest.raises(NonFiniteFactorsError, match=f"{LOW_RANK}.*weight"):
        Decomposer("svd")(layer, weight)


def test_the_decomposer_refuses_non_finite_statistics(setup):
    from lems_core.decompositions import NonFiniteFactorsError

    loaded, _, layers, (inputs, _, _) = setup
    stats = dataclasses.replace(inputs[LOW_RANK], gram=inputs[LOW_RANK].gram.clone())
    stats.gram[0, 0] = float("nan")
    weight = loaded.model.get_submodule(LOW_RANK).weight
    with pytest.raises(NonFiniteFactorsError, match=f"{LOW_RANK}.*input Gram"):
        Decomposer("svd_llm")(layers[LOW_RANK], weight, stats)


def test_evaluate_refuses_a_non_finite_factor(setup, tmp_path, monkeypatch):
    from lems_core import pipeline
    from lems_core.decompositions import NonFiniteFactorsError
    from lems_core.plan import from_loadconfig

    loaded = with_low_rank_layer()
    layers = compressible_layers(loaded.model)
    factors = {l.name: static_factors(setup, "svd", l.name) for l in layers}
    factors[LOW_RANK] = poisoned(factors[LOW_RANK])
    monkeypatch.setattr(pipeline.models, "get_model", lambda source, device=None, offload=None: loaded)
    monkeypatch.setattr(pipeline.evaluation, "plan_factorizations", lambda *a, **k: factors)
    corpus = word_corpus(tmp_path / "corpus.txt")
    plan = from_loadconfig({l.name: 0.5 for l in layers}, layers, "tiny-llama", loaded.fingerprint, decomposition="svd")
    with pytest.raises(NonFiniteFactorsError, match=LOW_RANK):
        pipeline.evaluate_plan(plan, [str(corpus)], EvalProtocol(32, 2), run=Run(cache_dir=tmp_path / "c"),
                               with_kl=False)
