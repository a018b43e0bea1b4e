"""What the live Allocate page reuses across budget moves gives the same answers as recomputing:
the prepared MCKP, the memoised LEMS table and energy sums, the fast predicted errors."""
import numpy as np
import pytest

from lems_core.allocators import allocate
from lems_core.allocators.lems import lems_min_budget
from lems_core.budget import dense_if_break_even
from lems_core.derived import derived
from lems_core.error_model import ErrorModelParams, block_biases, kl_scales, layer_errors, predicted_errors
from lems_core.profile import synthetic_profile
from lems_core.solver import InfeasibleBudgetError, objective, prepare_mckp, solve_mckp


def test_prepared_mckp_solves_every_budget_like_a_fresh_solve():
    rng = np.random.default_rng(0)
    costs = [np.sort(rng.integers(1, 50, size=rng.integers(2, 9))).astype(float) for _ in range(40)]
    errors = [np.sort(rng.random(len(c)))[::-1].copy() for c in costs]
    prepared = prepare_mckp(costs, errors)
    low = sum(c.min() for c in costs)
    for budget in np.linspace(low, sum(c.max() for c in costs), 9):
        assert objective(errors, solve_mckp(costs, errors, budget, prepared=prepared)) == pytest.approx(
            objective(errors, solve_mckp(costs, errors, budget)), abs=1e-12)
    with pytest.raises(InfeasibleBudgetError):
        solve_mckp(costs, errors, low - 1, prepared=prepared)
    with pytest.raises(ValueError, match="budget must be finite"):
        solve_mckp(costs, errors, float("inf"), prepared=prepared)


def test_lems_reuses_its_table_across_budgets_but_not_across_settings():
    profile = synthetic_profile(num_blocks=6)
    fresh = synthetic_profile(num_blocks=6)
    for ratio in (0.8, 0.7, 0.6, 0.55, 0.4):
        assert allocate(profile, "lems", ratio, params=ErrorModelParams()).ranks == \
            allocate(synthetic_profile(num_blocks=6), "lems", ratio, params=ErrorModelParams()).ranks
    other = allocate(profile, "lems", 0.6, params=ErrorModelParams(gamma=1.0))
    assert other.ranks == allocate(fresh, "lems", 0.6, params=ErrorModelParams(gamma=1.0)).ranks
    memo = profile.__dict__["_derived_memo"]
    tables = [k for k in memo if k[0] == "lems_table"]
    assert len(tables) == 3  # (gamma 5, lb 0.3), (gamma 5, lb 0.1), (gamma 1, lb 0.3)


def test_derived_computes_once_per_key():
    class Box:
        pass

    box, calls = Box(), []
    assert derived(box, "a", lambda: calls.append(1) or 1) == 1
    assert derived(box, "a", lambda: calls.append(1) or 2) == 1 and len(calls) == 1
    assert derived(box, "b", lambda: 3) == 3


@pytest.mark.parametrize("params", [ErrorModelParams(), ErrorModelParams(energy_power=1, use_scale=False,
                                                                         ref_ratio=0.3, alpha=1.2, gamma=2.0)])
def test_fast_predicted_errors_equal_layer_errors(params):
    profile = synthetic_profile(num_blocks=6, seed=2)
    ranks = allocate(profile, "uniform", 0.6).ranks
    biases, scales = block_biases(profile, params), kl_scales(profile, params)
    expected = {}
    for i, l in enumerate(profile.layers):
        r = dense_if_break_even(l, ranks[l.name])
        expected[l.name] = 0.0 if r is None else float(layer_errors(
            profile.spectra[l.name], np.array([r]), l.eq_rank, float(biases[i]),
            None if scales is None else float(scales[i]), params)[0])
    assert predicted_errors(profile, ranks, params) == expected


def test_lems_min_budget_is_the_first_feasible_step():
    profile = synthetic_profile(num_blocks=6)
    low = lems_min_budget(profile)
    allocate(profile, "lems", low, params=ErrorModelParams())
    with pytest.raises(InfeasibleBudgetError):
        allocate(profile, "lems", round(low - 0.01, 6), params=ErrorModelParams())


def test_prepared_lems_tables_follow_the_error_model():
    """One prepared knapsack (hull, first round) per error model: switching back and forth gives fresh answers."""
    profile = synthetic_profile(num_blocks=6, seed=4)
    models = [ErrorModelParams(), ErrorModelParams(gamma=0.5, alpha=1.0), ErrorModelParams(energy_power=1)]
    for params in models + models[::-1]:
        fresh = allocate(synthetic_profile(num_blocks=6, seed=4), "lems", 0.6, params=params)
        assert allocate(profile, "lems", 0.6, params=params).ranks == fresh.ranks
    prepared = [v for k, v in profile.__dict__["_derived_memo"].items() if k[0] == "mckp_prepared"]
    assert len(prepared) == len(models) and len({id(p.first) for p in prepared}) == len(models)


def test_flat_energies_are_kept_per_energy_power():
    """predicted_errors memoises the flattened energies per power: power 1 after power 2 is not power 2 again."""
    profile = synthetic_profile(num_blocks=4, seed=5)
    ranks = allocate(profile, "uniform", 0.5).ranks
    for power in (2, 1, 2):
        params = ErrorModelParams(energy_power=power, use_scale=False)
        fresh = predicted_errors(synthetic_profile(num_blocks=4, seed=5), ranks, params)
        assert predicted_errors(profile, ranks, params) == fresh
    assert predicted_errors(profile, ranks, ErrorModelParams(energy_power=1, use_scale=False)) != \
        predicted_errors(profile, ranks, ErrorModelParams(energy_power=2, use_scale=False))


def test_the_index_handle_is_reused_until_its_database_changes(tmp_path):
    """cache.index keeps one open handle per folder; a replaced or rewritten database is opened (and checked) again."""
    from lems_core.cache import CacheIndexError, index

    store = index(tmp_path)
    store["a"] = 1
    assert index(tmp_path) is store or index(tmp_path).get("a") == 1
    again = index(tmp_path)
    assert index(tmp_path) is again  # nothing written in between: the same handle
    with index(tmp_path) as closed:  # closing it is harmless
        closed["b"] = 2
    assert index(tmp_path).get("b") == 2
    database = tmp_path / "index" / "cache.db"
    for f in database.parent.iterdir():
        f.unlink()
    database.write_bytes(b"garbage" * 100)
    with pytest.raises(CacheIndexError):
        index(tmp_path)


def test_a_plan_decomposes_only_its_factorised_layers_and_each_once(tmp_path, monkeypatch):
    """plan_factorizations (static methods): factors only for the layers a plan factorises (from their own
    statistics on the first plan), equal to the whole-model file's; a second plan decomposes only the layers
    the first did not, from the whole model's statistics; the whole-model file is used as it is when it exists."""
    import torch

    from lems_core import pipeline
    from lems_core.calibration import CalibrationConfig
    from lems_core.decompositions import Decomposer
    from lems_core.model import compressible_layers
    from lems_core.run import Run

    from helpers import tiny_loaded, word_corpus

    loaded = tiny_loaded(8)
    cfg = CalibrationConfig(dataset=str(word_corpus(tmp_path / "corpus.txt")), split="train", n_samples=3, seq_len=48,
                            seed=1, n_search=2)
    names = [l.name for l in compressible_layers(loaded.model)]
    first = {n: (4 if i % 3 == 0 else None) for i, n in enumerate(names)}
    second = {n: (4 if i % 2 == 0 else None) for i, n in enumerate(names)}
    calls = []
    real_call = Decomposer.__call__
    monkeypatch.setattr(Decomposer, "__call__", lambda self, layer, *a, **k: calls.append(layer.name) or
                        real_call(self, layer, *a, **k))
    cache = tmp_path / "cache"
    statistics = lambda: sorted(p.parent.name for p in (cache / "tensors").glob("*/*.safetensors"))  # noqa: E731
    got = pipeline.plan_factorizations(loaded, cfg, "kfac", first, run=Run(cache_dir=cache))
    assert set(got) == {n for n, r in first.items() if r is not None} == set(calls)
    assert "grads" not in statistics() and "inputs" not in statistics()  # the plan's Grams only, not cached
    calls.clear()
    again = pipeline.plan_factorizations(loaded, cfg, "kfac", second, run=Run(cache_dir=cache))
    assert set(calls) == {n for n, r in second.items() if r is not None} - set(got)  # only the new layers
    assert {"grads", "inputs"} <= set(statistics())  # the second plan computed (and cached) the whole model's
    whole = pipeline.factorizations_for(loaded, cfg, "kfac", run=Run(cache_dir=tmp_path / "other"))
    for name, f in {**got, **again}.items():
        assert torch.equal(f.left, whole[name].left) and torch.equal(f.right, whole[name].right)
        assert np.array_equal(f.sigma, whole[name].sigma)
    calls.clear()
    full = pipeline.plan_factorizations(loaded, cfg, "kfac", second, run=Run(cache_dir=tmp_path / "other"))
    assert not calls and set(full) == set(names)  # the cached whole-model file, as before


def test_a_shipped_dense_perplexity_is_used_only_for_its_model_and_protocol(tmp_path, monkeypatch):
    """dense_perplexity: the value in cache/demo/dense_ppl.json for (fingerprint, dataset, split, window, cap) on a
    CPU in float32 instead of a dense pass, and stored in the index; any other protocol is measured."""
    import json

    from lems_core import cache, pipeline
    from lems_core.evaluation import EvalProtocol, PerplexityResult
    from lems_core.run import Run

    from helpers import tiny_loaded, word_corpus

    loaded = tiny_loaded(8)
    corpus = str(word_corpus(tmp_path / "corpus.txt"))
    entry = dict(zip(pipeline.DENSE_PPL_FIELDS, (loaded.fingerprint, corpus, "test", 32, 4)), ppl=12.5)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / pipeline.SHIPPED_DENSE_PPL).write_text(json.dumps({"entries": [entry]}))
    monkeypatch.setattr(cache, "DEMO_DIR", tmp_path / "demo")
    runs = []
    monkeypatch.setattr(pipeline.evaluation, "perplexity",
                        lambda *a, **k: runs.append(1) or PerplexityResult(7.0, 2.0, 1, 1, 0))
    run = Run(cache_dir=tmp_path / "c")
    assert pipeline.dense_perplexity(loaded, corpus, EvalProtocol(32, 4), split="test", run=run) == 12.5 and not runs
    assert cache.index(tmp_path / "c").get(f"dense-ppl:{cache.key_of(loaded.fingerprint, corpus, 'test', 32, 4)}") \
        == 12.5
    assert pipeline.dense_perplexity(loaded, corpus, EvalProtocol(32, 8), split="test", run=run) == 7.0 and runs  # other cap
    loaded.model.half()
    assert pipeline.shipped_dense_perplexity(loaded, corpus, "test", 32, 4) is None  # not float32
