"""Allocators: shared budget accounting, LEMS optimality, baselines' defining properties."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lems_core import allocators as A
from lems_core.budget import force_factorised, is_force_factorised
from lems_core.solver import InfeasibleBudgetError
from lems_core.error_model import ErrorModelParams
from lems_core.model import LayerInfo
from lems_core.plan import RankPlan
from lems_core.profile import Profile, synthetic_profile

RATIOS = (0.9, 0.8, 0.6, 0.4)
SHAPES = {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64), "gate": (160, 64), "up": (160, 64), "down": (64, 160)}


def make_profile(num_blocks=4, spectrum=None, kl=0.1, shapes=SHAPES, measured=None) -> Profile:
    """A hand-made profile; ``spectrum(block, kind, k)`` gives a layer's singular values."""
    spectrum = spectrum or (lambda b, kind, k: np.exp(-3.0 * np.linspace(0, 1, k)))
    layers, spectra = [], {}
    for b in range(num_blocks):
        for kind, (m, n) in shapes.items():
            name = f"model.layers.{b}.{'self_attn' if kind in ('q', 'k', 'v', 'o') else 'mlp'}.{kind}_proj"
            layers.append(LayerInfo(name, b, kind, m, n))
            spectra[name] = np.sort(np.asarray(spectrum(b, kind, min(m, n)), dtype=np.float64))[::-1].copy()
    kl_ref = None if kl is None else np.full(len(layers), kl) if np.isscalar(kl) else np.asarray(kl)
    return Profile("hand", "hand0", "svd_llm", {}, layers, spectra, kl_ref=kl_ref, measured=measured or {})


def asvd_measurements(profile, seed=0):
    """Per-layer sensitivities at the ASVD points: decreasing in kept ratio, layer-specific weight."""
    weights = np.random.default_rng(seed).lognormal(size=len(profile.layers))
    return {c: weights * (1.0 - c) ** 2 for c in A.ASVD_POINTS}, weights


def asvd_nll(weights, dense_nll=2.5):
    """Single-layer search NLL at the ASVD points: the dense NLL plus a layer-specific rise."""
    return {c: dense_nll + weights * (1.0 - c) ** 2 for c in A.ASVD_POINTS}


def ratio_score(profile):
    """A deterministic stand-in for search-set PPL: prefers rank in early blocks."""
    def score(ranks):
        return sum((1.0 if ranks[l.name] is None else ranks[l.name] / l.eq_rank) * -(profile.num_blocks - l.block)
                   for l in profile.layers)
    return score


@pytest.fixture(scope="module")
def profile():
    p = synthetic_profile()
    p.measured.update(asvd_measurements(p)[0])
    p.measured_nll.update(asvd_nll(asvd_measurements(p, seed=1)[1]))
    return p


METHODS = ["uniform", "lems", "svdllm_v2", "mrcs", "mrcs_dense", "atp", "asvd", "asvd_kl"]


# ----------------------------------------------------------------- shared budget
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("method", METHODS)
def test_every_allocator_meets_the_budget(profile, method, ratio):
    alloc = A.allocate(profile, method, ratio, score_fn=ratio_score(profile))
    assert alloc.method == method and alloc.ratio == ratio
    assert set(alloc.ranks) == {l.name for l in profile.layers}
    for l in profile.layers:
        r = alloc.ranks[l.name]
        forced_eq = method == "mrcs" and is_force_factorised(r) and r == l.eq_rank  # the reference's untouched layers
        assert r is None or forced_eq or (isinstance(r, int) and not is_force_factorised(r) and 1 <= r < l.eq_rank)
    assert A.realised_ratio(profile, alloc.ranks) <= ratio + 1e-12
    assert alloc.info["realised_ratio"] == pytest.approx(A.realised_ratio(profile, alloc.ranks))
    assert A.realised_ratio(profile, alloc.ranks) > ratio - 0.2  # and actually uses it


def test_params_of_counts_factorised_and_dense():
    p = make_profile(num_blocks=1)
    q, k = p.layers[0], p.layers[1]
    ranks = {l.name: None for l in p.layers}
    ranks[q.name], ranks[k.name] = 5, k.eq_rank  # k at break-even counts as dense
    expected = p.total_params - q.params + 5 * (64 + 64)
    assert A.params_of(p, ranks) == expected
    assert A.realised_ratio(p, ranks) == pytest.approx(expected / p.total_params)
    with pytest.raises(ValueError, match="lack"):
        A.params_of(p, {q.name: 5})
    with pytest.raises(ValueError, match="outside"):
        A.params_of(p, {**ranks, q.name: 65})
    assert k.eq_rank == 21  # 32 x 64
    forced = {**ranks, k.name: force_factorised(21)}  # the break-even exception costs r(m+n), above mn at r = 32
    assert A.params_of(p, forced) == expected - k.params + 21 * (32 + 64)
    assert A.params_of(p, {**ranks, k.name: force_factorised(32)}) == expected - k.params + 32 * (32 + 64)
    with pytest.raises(ValueError, match="outside"):
        A.params_of(p, {**ranks, k.name: force_factorised(33)})


@pytest.mark.parametrize("method", METHODS)
def test_infeasible_budget_raises(profile, method):
    with pytest.raises(InfeasibleBudgetError, match=f"{method}: budget ratio 0.01 is below the method's minimum") as err:
        A.allocate(profile, method, 0.01, score_fn=ratio_score(profile))
    assert err.value.min_ratio > 0.01 and err.value.budget == pytest.approx(0.01 * profile.total_params)


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.2, float("nan")])
def test_ratio_must_be_a_kept_fraction(profile, ratio):
    with pytest.raises(ValueError, match="kept fraction"):
        A.allocate_uniform(profile, ratio)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ratio=st.floats(0.3, 1.0), seed=st.integers(0, 10_000), blocks=st.integers(1, 5))
def test_budget_holds_on_random_profiles(ratio, seed, blocks):
    p = synthetic_profile(num_blocks=blocks, seed=seed)
    p.measured.update(asvd_measurements(p, seed)[0])
    p.measured_nll.update(asvd_nll(asvd_measurements(p, seed + 1)[1]))
    for method in METHODS:
        try:
            alloc = A.allocate(p, method, ratio, score_fn=ratio_score(p))
        except InfeasibleBudgetError:
            continue  # some methods' minimum lies above 0.3
        assert A.realised_ratio(p, alloc.ranks) <= ratio * (1 + 1e-9), method


# ----------------------------------------------------------------- LEMS
def test_candidate_ranks_follow_section_1_4():
    layer = LayerInfo("model.layers.0.mlp.up_proj", 0, "up", 1000, 400)  # eq = 285
    eq = layer.eq_rank
    high = A.candidate_ranks(layer, 0.8)
    assert list(high) == [r for r in range(int(0.1 * eq), int(0.95 * eq)) if r % 8 == 0 and r / eq >= 0.3]
    low = A.candidate_ranks(layer, 0.4)  # lb 0.1 below ratio 0.5
    assert low.min() == 32 and low.max() == 264 and high.min() == 88
    assert list(A.candidate_ranks(layer, 0.8, multiple=1)) == list(range(86, 270))


def test_error_table_matches_hand_computation():
    p = synthetic_profile(num_blocks=3)
    params = ErrorModelParams()  # energy2, ref 0.1, harmonic alpha 0 gamma 5
    costs, errors, options = A.lems_error_table(p, params, 0.8)
    i = 11  # block 1, kind "o"
    layer, sigma = p.layers[i], p.spectra[p.layers[i].name]
    m, n, eq = layer.out_features, layer.in_features, layer.eq_rank
    energy = [s * s for s in sigma]
    total = sum(energy)
    residual = lambda r: 1 - sum(energy[:r]) / total
    beta = 1 + 5.0 * (3 - 1 - layer.block) / (3 - 1)
    ranks = [r for r in range(int(0.1 * eq), int(0.95 * eq)) if r % 8 == 0 and r / eq >= 0.3]
    expected = [beta * p.kl_ref[i] * residual(r) / residual(int(0.1 * eq)) for r in ranks]
    assert options[i] == [None] + ranks
    assert costs[i][0] == m * n and errors[i][0] == 0.0
    np.testing.assert_allclose(costs[i][1:], [r * (m + n) for r in ranks])
    np.testing.assert_allclose(errors[i][1:], expected, rtol=1e-12)


def test_reference_cost_model_is_c_times_mn():
    p = synthetic_profile(num_blocks=2)
    costs, _, options = A.lems_error_table(p, ErrorModelParams(), 0.8, cost_model="reference")
    l = p.layers[4]
    np.testing.assert_allclose(costs[4][1:], [r / l.eq_rank * l.params for r in options[4][1:]])
    assert np.all(costs[4][1:] >= np.array(options[4][1:]) * (l.out_features + l.in_features))
    alloc = A.allocate_lems(p, 0.7, cost_model="reference")
    assert A.realised_ratio(p, alloc.ranks) <= 0.7


@pytest.mark.parametrize("ratio", RATIOS)
def test_lems_is_optimal_under_its_error_model(profile, ratio):
    params = ErrorModelParams()
    lems = A.allocate_lems(profile, ratio, params, multiple=1)
    uniform = A.allocate_uniform(profile, ratio)  # a feasible point of the multiple=1 knapsack
    uniform_objective = sum(A.predicted_errors(profile, uniform.ranks, params).values())
    assert lems.objective <= uniform_objective + 1e-12
    assert lems.objective == pytest.approx(sum(A.predicted_errors(profile, lems.ranks, params).values()))
    assert lems.objective == pytest.approx(sum(lems.predicted_error.values()))
    # with the reference's multiple-of-8 grid, uniform rounded down to multiples of 8 is feasible
    lems8 = A.allocate_lems(profile, ratio, params)
    rounded = {l.name: (r if r is None else max(8, r // 8 * 8)) for l in profile.layers for r in [uniform.ranks[l.name]]}
    if A.realised_ratio(profile, rounded) <= ratio:
        assert lems8.objective <= sum(A.predicted_errors(profile, rounded, params).values()) + 1e-12


def test_lems_beats_uniform_on_heterogeneous_layers(profile):
    params = ErrorModelParams()
    for ratio in RATIOS:
        lems = A.allocate_lems(profile, ratio, params)
        uniform = A.allocate_uniform(profile, ratio)
        assert lems.objective < sum(A.predicted_errors(profile, uniform.ranks, params).values())


def test_depth_bias_gives_early_blocks_more_rank():
    p = make_profile(num_blocks=6)  # every layer of a kind identical, same KL
    alloc = A.allocate_lems(p, 0.6, ErrorModelParams(gamma=5.0))
    rank_or_inf = lambda r: math.inf if r is None else r
    for kind in SHAPES:
        per_block = [rank_or_inf(alloc.ranks[l.name]) for l in p.layers if l.kind == kind]
        assert per_block == sorted(per_block, reverse=True), kind
    first = [l for l in p.layers if l.block == 0]
    last = [l for l in p.layers if l.block == 5]
    cost = lambda ls: sum(l.params if alloc.ranks[l.name] is None else alloc.ranks[l.name] * (l.out_features + l.in_features) for l in ls)
    assert cost(first) > cost(last)


def test_lems_needs_kl_when_scale_is_used():
    p = make_profile(num_blocks=2, kl=None)
    with pytest.raises(ValueError, match="no kl_ref"):
        A.allocate_lems(p, 0.8)
    assert A.allocate_lems(p, 0.8, ErrorModelParams(use_scale=False)).objective >= 0


def test_lems_refuses_mismatched_reference_point():
    p = make_profile(num_blocks=2)
    with pytest.raises(ValueError, match="ref_ratio"):
        A.allocate_lems(p, 0.8, ErrorModelParams(ref_ratio=0.3))


def test_lems_pulp_solver_agrees_with_exact():
    pytest.importorskip("pulp")
    p = synthetic_profile(num_blocks=3)
    exact = A.allocate_lems(p, 0.7)
    highs = A.allocate_lems(p, 0.7, solver="highs")
    assert highs.objective == pytest.approx(exact.objective, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="solver"):
        A.allocate_lems(p, 0.7, solver="gurobi")


def test_lems_table_is_fast_on_the_demo_shape():
    import time
    p = synthetic_profile(num_blocks=30, hidden=576, inter=1536, kv=192)  # SmolLM2-135M: 210 layers
    start = time.perf_counter()
    A.lems_error_table(p, ErrorModelParams(), 0.8)
    assert time.perf_counter() - start < 1.0


# ----------------------------------------------------------------- fit_bias
def test_fit_bias_is_reproducible_and_picks_the_best_trial(profile):
    score = ratio_score(profile)
    first = A.fit_bias(profile, 0.7, score, n_trials=6, seed=7)
    again = A.fit_bias(profile, 0.7, score, n_trials=6, seed=7)
    assert first.trials == again.trials and first.params == again.params
    assert first.allocation.ranks == again.allocation.ranks
    scores = [t["score"] for t in first.trials]
    best = int(np.argmin(scores))
    assert (first.params.alpha, first.params.gamma) == (first.trials[best]["alpha"], first.trials[best]["gamma"])
    assert score(first.allocation.ranks) == min(scores)
    assert A.fit_bias(profile, 0.7, score, n_trials=6, seed=8).trials != first.trials


def test_fit_bias_draws_like_optuna_startup_trials(profile):
    """Optuna's TPESampler(seed) startup trials are RandomState(seed).uniform, alpha then gamma."""
    fit = A.fit_bias(profile, 0.8, ratio_score(profile), n_trials=4, seed=42, gamma_range=(0.0, 7.0))
    rng = np.random.RandomState(42)
    for trial in fit.trials:
        assert trial["alpha"] == rng.uniform(0, 3) and trial["gamma"] == rng.uniform(0, 7)
        assert 0 <= trial["alpha"] <= 3 and 0 <= trial["gamma"] <= 7


# ----------------------------------------------------------------- uniform
def test_uniform_rank_is_int_ratio_times_eq(profile):
    alloc = A.allocate_uniform(profile, 0.6)
    assert all(alloc.ranks[l.name] == int(0.6 * l.eq_rank) for l in profile.layers)
    assert all(r is None for r in A.allocate_uniform(profile, 1.0).ranks.values())


# ----------------------------------------------------------------- SVD-LLM V2
@pytest.mark.parametrize("ratio", RATIOS)
def test_svdllm_v2_group_average_equals_target(profile, ratio):
    keep, handling = A.svdllm_v2_keep_ratios(profile, ratio)
    for kind in SHAPES:
        group = [keep[l.name] for l in profile.layers if l.kind == kind]
        assert np.mean(group) == pytest.approx(ratio, abs=1e-12)
        assert np.std(group) > 0  # heterogeneous, not uniform
    assert set(handling.values()) == {"as_paper"}


def test_svdllm_v2_scores_are_inverse_log_losses(profile):
    ratio = 0.8
    keep, _ = A.svdllm_v2_keep_ratios(profile, ratio)
    group = [l for l in profile.layers if l.kind == "gate"]
    losses = np.array([profile.spectra[l.name][int(ratio * l.eq_rank):].sum() for l in group])
    scores = 1 / np.log(losses)
    expected = 1 - len(group) * (1 - ratio) * scores / scores.sum()
    np.testing.assert_allclose([keep[l.name] for l in group], expected)
    # lower loss -> more compression
    order = np.argsort(losses)
    assert list(np.argsort([keep[group[i].name] for i in range(len(group))])) == list(order)


def test_svdllm_v2_paper_power_two(profile):
    keep, _ = A.svdllm_v2_keep_ratios(profile, 0.8, power=2)
    group = [l for l in profile.layers if l.kind == "q"]
    losses = np.array([np.sqrt((profile.spectra[l.name][int(0.8 * l.eq_rank):] ** 2).sum()) for l in group])
    if np.all(losses > 1):
        scores = 1 / np.log(losses)
        np.testing.assert_allclose([keep[l.name] for l in group], 1 - len(group) * 0.2 * scores / scores.sum())
    else:
        assert np.mean([keep[l.name] for l in group]) == pytest.approx(0.8)


def test_svdllm_v2_guards_the_log_sign_flip():
    tiny = make_profile(num_blocks=4, spectrum=lambda b, kind, k: 1e-3 * (b + 1) * np.exp(-np.linspace(0, 3, k)))
    keep, handling = A.svdllm_v2_keep_ratios(tiny, 0.7)  # every loss < 1
    assert set(handling.values()) == {"rescaled"}
    for kind in SHAPES:
        group = [keep[l.name] for l in tiny.layers if l.kind == kind]
        assert np.mean(group) == pytest.approx(0.7) and np.std(group) > 0
        assert min(group) > 0 and max(group) < 1
    q_layers = [l for l in tiny.layers if l.kind == "q"]  # documented rescale: min loss -> e, score 1
    losses = np.array([tiny.spectra[l.name][int(0.7 * l.eq_rank):].sum() for l in q_layers])
    scores = 1 / np.log(losses * math.e / losses.min())
    np.testing.assert_allclose([keep[l.name] for l in q_layers], 1 - len(q_layers) * 0.3 * scores / scores.sum())
    uniform_keep, handling = A.svdllm_v2_keep_ratios(tiny, 0.7, guard="uniform")
    assert set(uniform_keep.values()) == {0.7} and set(handling.values()) == {"uniform_fallback"}
    ref_keep, handling = A.svdllm_v2_keep_ratios(tiny, 0.7, guard="reference")  # all log < 0: sum <= 0
    assert set(ref_keep.values()) == {0.7}
    with pytest.raises(ValueError, match="guard"):
        A.svdllm_v2_keep_ratios(tiny, 0.7, guard="nope")


def test_svdllm_v2_clips_and_repairs_the_budget():
    # 8 q layers (eq 32, uniform rank 25); block 0's tail loss is 1.01, barely above 1, so its
    # 1/log score dominates: remove = 8 * 0.2 * ~0.99 > 1, i.e. a negative keep ratio (rank 1)
    def spectrum(b, kind, k):
        s = np.full(k, 5.0)
        if b == 0:
            s[25:] = 1.01 / (k - 25)
        return s
    p = make_profile(num_blocks=8, spectrum=spectrum, shapes={"q": (64, 64)})
    keep, handling = A.svdllm_v2_keep_ratios(p, 0.8, guard="reference")
    assert keep[p.layers[0].name] < 0 and handling["q"] == "reference"
    alloc = A.allocate_svdllm_v2(p, 0.8, guard="reference")
    assert alloc.ranks[p.layers[0].name] == 1
    assert alloc.info["repair_steps"] > 0
    assert A.realised_ratio(p, alloc.ranks) <= 0.8
    again = A.allocate_svdllm_v2(p, 0.8, guard="reference")
    assert again.ranks == alloc.ranks  # deterministic repair


# ----------------------------------------------------------------- MRCS
def test_mrcs_compresses_flat_spectra_less():
    steep = lambda b, kind, k: np.exp(-8 * np.linspace(0, 1, k)) if b % 2 else np.linspace(1.0, 0.9, k)
    p = make_profile(num_blocks=4, spectrum=steep)
    alloc = A.allocate_mrcs(p, 0.7)
    keep = lambda blocks: np.mean([(l.eq_rank if alloc.ranks[l.name] is None else alloc.ranks[l.name]) / l.eq_rank
                                   for l in p.layers if l.block in blocks])
    assert keep((1, 3)) < keep((0, 2))  # low-energy tails (steep spectra) are cut first


@pytest.mark.parametrize("untouched", ["eq", "dense"])
def test_mrcs_respects_lower_bound_and_multiples(profile, untouched):
    alloc = A.allocate_mrcs(profile, 0.5, untouched=untouched)
    for l in profile.layers:
        r = alloc.ranks[l.name]
        if r is not None and not is_force_factorised(r):
            lb = max(1, min(math.ceil(math.floor(0.3 * l.eq_rank) / 8) * 8, l.eq_rank))
            assert r >= lb and (r % 8 == 0 or r == lb)
        assert r is None or not is_force_factorised(r) or (untouched == "eq" and r == l.eq_rank)  # untouched: eq


def test_mrcs_finishes_the_budget_when_the_schedule_stalls():
    p = synthetic_profile(num_blocks=30, hidden=576, inter=1536, kv=192)
    ref = A.allocate_mrcs(p, 0.4)  # every first-step proposal falls below the bound
    assert ref.info["schedule_steps"] == 0 and ref.info["completion_steps"] > 0
    clamped = A.allocate_mrcs(p, 0.4, clamp_to_lower_bound=True)
    assert clamped.info["schedule_steps"] > 0
    for alloc in (ref, clamped):
        assert A.realised_ratio(p, alloc.ranks) <= 0.4


def test_mrcs_depth_bias_favours_early_blocks():
    p = make_profile(num_blocks=6)
    plain = A.allocate_mrcs(p, 0.6)
    biased = A.allocate_mrcs(p, 0.6, params=ErrorModelParams(gamma=5.0))
    first = lambda a: A.params_of(p, {l.name: (a.ranks[l.name] if l.block == 0 else None) for l in p.layers})
    assert first(biased) > first(plain)


def reference_memvit(profile, ratio, multiple=8, lower_bound=0.3, gamma=80.0, max_iter=500):
    """[CODE] ``search/memvit.py::single_search`` restated (energy1, params target): every layer
    starts at eq, the cost after a step is sum r(m+n) over all layers. Returns (ranks, cost)."""
    layers = [l for l in profile.layers]
    ranks = {l.name: l.eq_rank for l in layers}
    lbs = {l.name: max(1, min(math.ceil(math.floor(l.eq_rank * lower_bound) / multiple) * multiple, l.eq_rank))
           for l in layers}
    total = sum(l.params for l in layers)
    target, cost, t = total * ratio, total, 1
    schedule = lambda t: target + (total - target) * math.exp(-t / gamma)
    while cost > target and t <= max_iter:
        delta = schedule(t - 1) - schedule(t)
        candidates = {}
        for l in layers:
            r = ranks[l.name]
            if r <= lbs[l.name]:
                continue
            new = max(1, (math.floor(r - delta / (l.out_features + l.in_features)) // multiple) * multiple)
            if new >= r or new < lbs[l.name]:
                continue
            s = np.asarray(profile.spectra[l.name])
            candidates[l.name] = (s[new:].sum() / s.sum(), new)
        if not candidates:
            break
        best = min(candidates, key=lambda n: candidates[n][0])
        ranks[best] = candidates[best][1]
        cost = sum(ranks[l.name] * (l.out_features + l.in_features) for l in layers)
        t += 1
    return ranks, cost


@pytest.mark.parametrize("blocks,ratio", [(4, 0.7), (4, 0.8), (6, 0.65), (6, 0.9)])
def test_mrcs_default_is_the_reference_search_with_untouched_layers_at_eq(blocks, ratio):
    p = synthetic_profile(num_blocks=blocks, hidden=128, inter=320, kv=64, seed=blocks)
    ranks, cost = reference_memvit(p, ratio)
    assert cost <= ratio * p.total_params  # the reference's schedule meets this budget by itself
    alloc = A.allocate(p, "mrcs", ratio)
    assert alloc.info["completion_steps"] == 0 and alloc.info["untouched"] == "eq"
    untouched = [l for l in p.layers if ranks[l.name] == l.eq_rank]
    assert untouched and alloc.info["untouched_layers"] == len(untouched)
    assert alloc.ranks == ranks  # touched layers at the reference's ranks, untouched ones at eq ...
    assert all(is_force_factorised(alloc.ranks[l.name]) for l in untouched)  # ... factorised, not dense
    assert alloc.info["params_kept"] == cost  # counted r(m+n) everywhere, as the reference
    plan = alloc.to_plan(p)
    assert plan.summary["force_factorised_layers"] == len(untouched) and plan.summary["dense_layers"] == 0
    assert plan.summary["params_kept"] == cost


def test_mrcs_dense_option_keeps_untouched_layers_dense():
    p = synthetic_profile(num_blocks=4, hidden=128, inter=320, kv=64, seed=4)
    default = A.allocate(p, "mrcs", 0.8)
    dense = A.allocate(p, "mrcs_dense", 0.8)
    assert dense.method == "mrcs_dense" and dense.info["untouched"] == "dense"
    assert dense.ranks == A.allocate_mrcs(p, 0.8, untouched="dense").ranks
    assert not any(is_force_factorised(r) for r in dense.ranks.values())
    assert dense.info["dense_layers"] == dense.info["untouched_layers"] > 0
    assert all(r is None or r < l.eq_rank for l, r in zip(p.layers, dense.ranks.values()))
    forced = {n for n, r in default.ranks.items() if is_force_factorised(r)}
    assert forced and default.info["dense_layers"] == 0
    assert {n for n, r in dense.ranks.items() if r is None} != set() and dense.ranks != default.ranks
    assert A.realised_ratio(p, dense.ranks) <= 0.8 and A.realised_ratio(p, default.ranks) <= 0.8
    with pytest.raises(ValueError, match="untouched must be one of"):
        A.allocate_mrcs(p, 0.8, untouched="nothing")


def test_mrcs_dense_is_the_former_behaviour():
    """Before the reference default, untouched layers cost m*n: the greedy pays for them in full."""
    p = synthetic_profile(num_blocks=4, hidden=128, inter=320, kv=64, seed=2)
    dense = A.allocate(p, "mrcs_dense", 0.7, multiple=None)
    untouched = [l for l in p.layers if dense.ranks[l.name] is None]
    assert len(untouched) == dense.info["untouched_layers"] > 0
    assert dense.info["params_kept"] == sum(
        l.params if dense.ranks[l.name] is None else dense.ranks[l.name] * (l.out_features + l.in_features)
        for l in p.layers)


# ----------------------------------------------------------------- ATP
def test_atp_grid_and_block_ratios():
    assert A.atp_grid(0.8) == pytest.approx([0.04 * i for i in range(11)])
    k = A.atp_block_ratios(5, 0.8, 0.4)
    assert k[0] == pytest.approx(1.0) and k[-1] == pytest.approx(0.6) and k.mean() == pytest.approx(0.8)
    assert np.all(np.diff(k) < 0)


def test_atp_picks_the_spread_the_score_prefers(profile):
    prefer_spread = A.allocate_atp(profile, 0.6, ratio_score(profile))
    assert prefer_spread.info["beta_total"] > 0
    assert len(prefer_spread.info["trials"]) == 11
    prefer_flat = A.allocate_atp(profile, 0.6, lambda ranks: -A.realised_ratio(profile, ranks))
    assert prefer_flat.objective == min(t["score"] for t in prefer_flat.info["trials"] if t["feasible"])
    best = prefer_spread.info["beta_total"]
    k = A.atp_block_ratios(profile.num_blocks, 0.6, best)
    assert all(prefer_spread.ranks[l.name] == A.rank_at_ratio(l, float(k[l.block])) for l in profile.layers)


# ----------------------------------------------------------------- ASVD
def test_asvd_needs_measured_points():
    p = make_profile(num_blocks=2, measured={0.5: np.ones(14), 0.9: np.ones(14)})
    with pytest.raises(ValueError, match=r"lacks \[0.4, 0.6, 0.7, 0.8\]"):
        A.allocate_asvd(p, 0.8)
    with pytest.raises(ValueError, match="given sensitivity table lacks"):
        A.allocate_asvd(p, 0.8, sensitivity={0.4: np.ones(14)})


@pytest.mark.parametrize("ratio", [0.45, 0.55, 0.63, 0.7, 0.77, 0.85, 0.93])
def test_asvd_strs_takes_the_largest_feasible_cut(profile, ratio):
    table, weights = asvd_measurements(profile)
    alloc = A.allocate_asvd(profile, ratio, sensitivity=table)
    # independent re-implementation of the cut rule (methods.md §4.2)
    triples = sorted(((i, c, table[c][i]) for i in range(len(profile.layers)) for c in A.ASVD_POINTS), key=lambda x: -x[2])

    def ranks_at(cut):
        chosen = {}
        for i, c, _ in triples[cut:]:
            chosen[i] = min(chosen.get(i, 1.0), c)
        return {l.name: (int(chosen[i] * l.eq_rank) if i in chosen else None) for i, l in enumerate(profile.layers)}

    cut = alloc.info["cut_index"]
    assert alloc.ranks == ranks_at(cut)
    assert A.realised_ratio(profile, ranks_at(cut)) <= ratio
    assert A.realised_ratio(profile, ranks_at(cut + 1)) > ratio  # a larger cut allows less: too dense
    kept = [1.0 if alloc.ranks[l.name] is None else alloc.ranks[l.name] / l.eq_rank for l in profile.layers]
    order = np.argsort(weights)
    assert np.mean([kept[i] for i in order[-5:]]) > np.mean([kept[i] for i in order[:5]])  # sensitive layers kept denser


def test_asvd_ranks_by_single_layer_perplexity_by_default():
    """The reference ranks triples by single-layer search PPL; KL is the named option (asvd_kl)."""
    p = synthetic_profile(num_blocks=4)
    kl, kl_weights = asvd_measurements(p, seed=3)
    nll_weights = 1.0 / kl_weights  # the layers KL calls sensitive, perplexity calls robust
    p.measured.update(kl)
    p.measured_nll.update(asvd_nll(nll_weights))
    by_ppl, by_kl = A.allocate(p, "asvd", 0.7), A.allocate(p, "asvd_kl", 0.7)
    assert (by_ppl.method, by_ppl.info["rank_by"], by_kl.method, by_kl.info["rank_by"]) == ("asvd", "ppl", "asvd_kl", "kl")
    assert by_ppl.ranks != by_kl.ranks
    ppl_table = {c: np.exp(v) for c, v in p.measured_nll.items()}
    assert by_ppl.ranks == A.allocate_asvd(p, 0.7, sensitivity=ppl_table).ranks  # STRS over exp(NLL)
    assert by_kl.ranks == A.allocate_asvd(p, 0.7, sensitivity=kl).ranks
    assert A.allocate_asvd(p, 0.7, rank_by="kl").ranks == by_kl.ranks
    kept = lambda a: np.array([1.0 if a.ranks[l.name] is None else a.ranks[l.name] / l.eq_rank for l in p.layers])
    order = np.argsort(nll_weights)  # PPL-sensitive layers last
    assert kept(by_ppl)[order[-5:]].mean() > kept(by_ppl)[order[:5]].mean()
    assert kept(by_kl)[order[-5:]].mean() < kept(by_kl)[order[:5]].mean()
    with pytest.raises(ValueError, match="rank_by must be one of"):
        A.allocate_asvd(p, 0.7, rank_by="mse")


@pytest.mark.parametrize("nll_points", [(), (0.4, 0.5, 0.6)])
def test_asvd_without_an_nll_table_falls_back_to_kl_with_a_warning(nll_points):
    p = synthetic_profile(num_blocks=3)
    kl, weights = asvd_measurements(p)
    p.measured.update(kl)
    p.measured_nll.update({c: v for c, v in asvd_nll(1.0 / weights).items() if c in nll_points})
    with pytest.warns(A.AsvdScoreWarning, match="ranked by KL"):
        alloc = A.allocate(p, "asvd", 0.7)
    assert alloc.method == "asvd" and alloc.info["rank_by"] == "kl" and alloc.info["rank_by_requested"] == "ppl"
    assert "measured_nll" in alloc.info["rank_by_fallback"]
    assert alloc.ranks == A.allocate(p, "asvd_kl", 0.7).ranks


# ----------------------------------------------------------------- dispatcher and plans
def test_dispatcher_errors_and_registry(profile):
    with pytest.raises(ValueError, match="unknown allocation method 'magic'.*lems"):
        A.allocate(profile, "magic", 0.8)
    with pytest.raises(ValueError, match="needs score_fn"):
        A.allocate(profile, "atp", 0.8)
    assert A.allocate(profile, "SVDLLM-V2", 0.8).method == "svdllm_v2"

    def half_dense(profile, ratio, params=None):
        return A.Allocation("half", ratio, A.allocate_uniform(profile, ratio).ranks, info={"params": params})

    def all_dense(profile, ratio):
        return A.Allocation("dense", ratio, {l.name: None for l in profile.layers})

    A.register_allocator("half", half_dense)
    A.register_allocator("all-dense", all_dense)
    try:
        params = ErrorModelParams(gamma=1.0)
        assert A.allocate(profile, "half", 0.8, params=params).info["params"] is params
        with pytest.raises(RuntimeError, match="'dense' exceeded its budget"):
            A.allocate(profile, "all_dense", 0.8)
    finally:
        del A.ALLOCATORS["half"], A.ALLOCATORS["all_dense"]
    assert A.allocate(profile, "lems", 0.8, params=ErrorModelParams(gamma=0.0)).info["error_model"]["gamma"] == 0.0


def test_allocation_to_plan_round_trip(profile):
    alloc = A.allocate_lems(profile, 0.7)
    plan = alloc.to_plan(profile)
    back = RankPlan.from_json(plan.to_json(), layers=profile.layers, fingerprint=profile.fingerprint)
    assert back.ranks() == alloc.ranks and back.method == "lems" and back.budget == 0.7
    assert back.error_model == ErrorModelParams().to_dict()
    assert back.summary["realised_ratio"] == pytest.approx(alloc.info["realised_ratio"])
    assert [l.predicted_error for l in back.layers] == pytest.approx([alloc.predicted_error[l.name] for l in profile.layers])


def test_plans_of_baselines_carry_errors_under_the_given_model(profile):
    params = ErrorModelParams()
    uniform = A.allocate_uniform(profile, 0.7)
    assert uniform.to_plan(profile).error_model is None
    plan = uniform.to_plan(profile, params=params, meta={"calibration": {"n": 1}})
    assert plan.error_model == params.to_dict() and plan.meta["calibration"] == {"n": 1}
    expected = A.predicted_errors(profile, uniform.ranks, params)
    assert [l.predicted_error for l in plan.layers] == pytest.approx([expected[l.name] for l in profile.layers])
    no_kl = make_profile(num_blocks=2, kl=None)
    plan = A.allocate_uniform(no_kl, 0.7).to_plan(no_kl, params=params)
    assert all(l.predicted_error is None for l in plan.layers) and "kl_ref" in plan.meta["predicted_error_note"]


def test_non_finite_scores_rank_last(profile):
    calls = []

    def flaky(ranks):  # the first evaluation diverges
        calls.append(1)
        return float("nan") if len(calls) == 1 else ratio_score(profile)(ranks)

    fit = A.fit_bias(profile, 0.7, flaky, n_trials=3)
    assert fit.trials[0]["score"] == math.inf and fit.allocation.ranks != {}
    assert (fit.params.alpha, fit.params.gamma) != (fit.trials[0]["alpha"], fit.trials[0]["gamma"])
    calls.clear()
    atp = A.allocate_atp(profile, 0.7, flaky)
    assert atp.info["beta_total"] != 0.0 and atp.info["trials"][0]["score"] == math.inf


def test_allocate_finds_ars_and_seed_allocators_without_importing_them():
    """A fresh interpreter that imports only allocators still knows 'ars', 'erc_plc', 'lcsvd_search'."""
    import subprocess
    import sys

    code = ("from lems_core.allocators import allocate, allocator_names\n"
            "from lems_core.profile import synthetic_profile\n"
            "names = allocator_names()\n"
            "assert {'ars', 'erc_plc', 'lcsvd_search', 'lems', 'uniform'} <= set(names), names\n"
            "try:\n"
            "    allocate(synthetic_profile(), 'ars', 0.123)\n"
            "except ValueError as exc:\n"
            "    assert 'no ARS plan trained' in str(exc), exc\n"
            "else:\n"
            "    raise AssertionError('ars at 0.123 cannot have a plan')\n")
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
