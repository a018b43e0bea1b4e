"""Exact MCKP solver (lems_core.solver) against independent references.

References: brute-force enumeration (tiny instances), a dynamic program over integer
budgets (medium instances, written here independently of the solver), and the PuLP
ILP solved by HiGHS and CBC to proven optimality.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lems_core.solver import (InfeasibleBudgetError, MCKPSearchLimitError, PulpRun, objective, run_pulp_mckp,
                                  solve_mckp, solve_mckp_pulp, total_cost)
import lems_core.solver.pulp_reference as pulp_reference
from lems_core.solver.search import ExactSearch

REL = 1e-9


# ------------------------------------------------------------------ references


def budget_slack(costs, budget):
    """The float-noise slack solve_mckp documents: 4 eps n_groups max(|budget|, sum max |c|)."""
    scale = max(abs(budget), sum(float(np.abs(c).max()) for c in costs))
    return 4 * np.finfo(float).eps * len(costs) * scale


def brute_force(costs, errors, budget):
    """Optimal objective by enumeration, or None when no choice fits the budget."""
    best = None
    slack = budget_slack(costs, budget)
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        if total_cost(costs, choice) <= budget + slack:
            value = objective(errors, choice)
            best = value if best is None else min(best, value)
    return best


def integer_budget_dp(costs, errors, budget):
    """Optimal objective for non-negative integer costs: DP over every budget 0..budget."""
    capacity = int(np.floor(budget + 1e-9))
    best = np.zeros(capacity + 1)  # best[b]: min error of the groups so far with cost <= b
    for c, e in zip(costs, errors):
        nxt = np.full(capacity + 1, np.inf)
        for cost, err in zip(c.astype(int), e):
            if cost <= capacity:
                nxt[cost:] = np.minimum(nxt[cost:], best[:capacity + 1 - cost] + err)
        best = nxt
    return None if np.isinf(best[-1]) else float(best[-1])


def assert_optimal(costs, errors, budget, reference):
    choice = solve_mckp(costs, errors, budget)
    assert len(choice) == len(costs)
    assert all(0 <= j < len(c) for j, c in zip(choice, costs))
    assert total_cost(costs, choice) <= budget + budget_slack(costs, budget)
    assert objective(errors, choice) == pytest.approx(reference, rel=REL, abs=1e-12)
    return choice


# ------------------------------------------------------------------ instances


def llm_like_group(rng, curve: str, dense: bool = True):
    """Costs rank * (m + n) and a residual-energy-like error curve for one matrix."""
    m, n = (int(x) for x in rng.choice([64, 128, 192, 256, 384], size=2))
    eq = m * n / (m + n)
    ranks = np.unique(rng.integers(1, max(3, int(0.95 * eq)), size=int(rng.integers(4, 25))))
    x = ranks / eq
    if curve == "convex":
        err = np.exp(-x * rng.uniform(2, 6)) * (1 + 0.03 * rng.standard_normal(x.size))
    else:  # non-convex: plateaus and bumps
        err = (1 - x) ** 2 + 0.15 * np.abs(np.sin(9 * x + rng.uniform(0, 3)))
    costs = ranks * float(m + n)
    errors = err * rng.lognormal(-2, 1)
    if dense:
        costs, errors = np.append(costs, float(m * n)), np.append(errors, 0.0)
    return costs, errors


def llm_like_instance(rng, groups: int, curve: str, ratio: float):
    pairs = [llm_like_group(rng, curve) for _ in range(groups)]
    costs, errors = [c for c, _ in pairs], [e for _, e in pairs]
    dense_total = sum(float(c.max()) for c in costs)
    return costs, errors, ratio * dense_total


def random_instance(rng, groups: int, options: tuple[int, int], integer: bool):
    costs, errors = [], []
    for _ in range(groups):
        k = int(rng.integers(*options))
        if integer:
            costs.append(rng.integers(0, 40, k).astype(float))
            errors.append(rng.integers(0, 12, k).astype(float))
        else:
            costs.append(rng.uniform(1, 100, k))
            errors.append(rng.exponential(1.0, k))
    low, high = sum(c.min() for c in costs), sum(c.max() for c in costs)
    return costs, errors, low + rng.uniform(0.1, 0.8) * (high - low)


# ------------------------------------------------------------------ (a) brute force


def tiny_groups(values):
    group = st.integers(1, 5).flatmap(
        lambda k: st.tuples(st.lists(values, min_size=k, max_size=k), st.lists(values, min_size=k, max_size=k)))
    return st.lists(group, min_size=2, max_size=5)


def assert_matches_brute_force(costs, errors, budget):
    """The solver raises InfeasibleBudgetError exactly when brute force finds nothing, else is optimal."""
    reference = brute_force(costs, errors, budget)
    if reference is None:
        with pytest.raises(InfeasibleBudgetError):
            solve_mckp(costs, errors, budget)
    else:
        assert_optimal(costs, errors, budget, reference)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups=tiny_groups(st.integers(0, 6)), budget=st.integers(-2, 30))
def test_tiny_integer_instances_match_brute_force(groups, budget):
    """Small integers: many equal costs, equal errors and zero errors; some budgets infeasible."""
    costs = [np.array(c, dtype=float) for c, _ in groups]
    errors = [np.array(e, dtype=float) for _, e in groups]
    assert_matches_brute_force(costs, errors, budget)


@settings(max_examples=200, deadline=None)
@given(groups=tiny_groups(st.floats(0, 1e3, allow_nan=False, allow_infinity=False)),
       fraction=st.floats(0, 1))
def test_tiny_float_instances_match_brute_force(groups, fraction):
    costs = [np.array(c) for c, _ in groups]
    errors = [np.array(e) for _, e in groups]
    low, high = sum(c.min() for c in costs), sum(c.max() for c in costs)
    budget = low + fraction * (high - low)
    assert_optimal(costs, errors, budget, brute_force(costs, errors, budget))


def test_seeded_tiny_instances_with_negative_values_match_brute_force():
    """Negative costs and errors are legal numbers too (shifts must not break)."""
    rng = np.random.default_rng(7)
    for _ in range(150):
        groups = int(rng.integers(2, 6))
        costs = [rng.integers(-5, 8, int(rng.integers(1, 6))).astype(float) for _ in range(groups)]
        errors = [rng.normal(0, 3, c.size).round(1) for c in costs]
        budget = float(rng.integers(-10, 25))
        assert_matches_brute_force(costs, errors, budget)


def test_subnormal_cost_steps_are_handled():
    """Cost steps of 5e-324 make efficiencies overflow; the result must stay exact."""
    tiny = 5e-324
    costs = [np.array([0.0, tiny, 1.0]), np.array([0.0, 2 * tiny, 3.0]), np.array([0.5, 1.0])]
    errors = [np.array([3.0, 1.0, 0.0]), np.array([2.0, 1.5, 0.0]), np.array([1.0, 0.0])]
    for budget in (0.5, 0.5 + 4 * tiny, 1.0, 1.5, 2.5, 4.5):
        assert_optimal(costs, errors, budget, brute_force(costs, errors, budget))


def test_infeasible_budget_reports_minimum_cost():
    costs = [np.array([3.0, 5.0]), np.array([2.0, 9.0])]
    errors = [np.array([1.0, 0.0]), np.array([1.0, 0.0])]
    with pytest.raises(InfeasibleBudgetError, match=r"budget 4 is infeasible.*costs 5\b") as info:
        solve_mckp(costs, errors, 4.0)
    assert info.value.min_cost == 5.0 and info.value.budget == 4.0
    assert isinstance(info.value, ValueError)
    assert solve_mckp(costs, errors, 5.0) == [0, 0]  # exactly the minimum is feasible


# ------------------------------------------------------------------ medium: DP and PuLP


@pytest.mark.parametrize("seed", range(6))
def test_medium_integer_instances_match_budget_dp(seed):
    rng = np.random.default_rng(100 + seed)
    costs, errors, budget = random_instance(rng, groups=int(rng.integers(20, 41)), options=(5, 31), integer=True)
    assert_optimal(costs, errors, budget, integer_budget_dp(costs, errors, budget))


@pytest.mark.parametrize("seed", range(5))
def test_medium_float_instances_match_highs(seed):
    rng = np.random.default_rng(200 + seed)
    costs, errors, budget = random_instance(rng, groups=int(rng.integers(20, 41)), options=(5, 31),
                                            integer=seed % 2 == 0)
    reference = solve_mckp_pulp(costs, errors, budget, solver="highs", time_limit=30)
    choice = assert_optimal(costs, errors, budget, objective(errors, reference))
    assert total_cost(costs, reference) <= budget * (1 + 1e-9)
    assert choice is not None


@pytest.mark.parametrize("seed", range(2))
def test_medium_instances_match_cbc(seed):
    rng = np.random.default_rng(300 + seed)
    costs, errors, budget = random_instance(rng, groups=20, options=(5, 15), integer=seed == 0)
    reference = solve_mckp_pulp(costs, errors, budget, solver="cbc", time_limit=30)
    assert_optimal(costs, errors, budget, objective(errors, reference))


# ------------------------------------------------------------------ (c) LLM-like shapes


@pytest.mark.parametrize("curve", ["convex", "nonconvex"])
@pytest.mark.parametrize("ratio", [0.35, 0.6, 0.85])
def test_llm_like_instances_match_highs(curve, ratio):
    rng = np.random.default_rng(int(ratio * 100) + (curve == "convex"))
    costs, errors, budget = llm_like_instance(rng, groups=30, curve=curve, ratio=ratio)
    reference = solve_mckp_pulp(costs, errors, budget, solver="highs", time_limit=30)
    assert_optimal(costs, errors, budget, objective(errors, reference))


def test_llm_like_integer_costs_match_budget_dp():
    """Convex noisy curves with a zero-error dense option, against the budget DP."""
    rng = np.random.default_rng(11)
    for _ in range(3):
        costs, errors, budget = llm_like_instance(rng, groups=12, curve="convex", ratio=0.7)
        scale = 64.0  # keep the DP capacity small; costs stay integers
        costs = [np.round(c / scale) for c in costs]
        budget = np.floor(budget / scale)
        assert_optimal(costs, errors, budget, integer_budget_dp(costs, errors, budget))


def test_large_parameter_counts_use_budget_exactly():
    """Costs ~1e7, budget ~1e9: a plan that uses the budget to the last parameter is allowed."""
    rng = np.random.default_rng(5)
    costs = [np.sort(rng.integers(1, 4000, 40)).astype(float) * 8192 for _ in range(60)]
    errors = [np.sort(rng.exponential(1.0, 40))[::-1] for _ in range(60)]
    planted = rng.integers(0, 40, 60)
    budget = total_cost(costs, planted)  # exactly reachable
    choice = solve_mckp(costs, errors, budget)
    assert total_cost(costs, choice) <= budget
    assert objective(errors, choice) <= objective(errors, planted) + 1e-12
    reference = solve_mckp_pulp(costs, errors, budget, solver="highs", time_limit=30)
    assert objective(errors, choice) == pytest.approx(objective(errors, reference), rel=REL)


def test_generous_budget_takes_the_best_option_everywhere():
    rng = np.random.default_rng(3)
    costs, errors, _ = llm_like_instance(rng, groups=25, curve="nonconvex", ratio=1.0)
    choice = solve_mckp(costs, errors, budget=sum(c.max() for c in costs) * 2)
    assert objective(errors, choice) == pytest.approx(sum(e.min() for e in errors), abs=1e-15)


def test_objective_never_rises_with_the_budget():
    rng = np.random.default_rng(9)
    costs, errors, full = llm_like_instance(rng, groups=40, curve="convex", ratio=1.0)
    values = [objective(errors, solve_mckp(costs, errors, r * full)) for r in np.linspace(0.45, 1.0, 12)]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(values, values[1:]))
    assert values[-1] == 0.0  # everything dense


def test_option_order_and_duplicates_do_not_change_the_optimum():
    rng = np.random.default_rng(21)
    costs, errors, budget = llm_like_instance(rng, groups=30, curve="nonconvex", ratio=0.6)
    base = objective(errors, solve_mckp(costs, errors, budget))
    shuffled_costs, shuffled_errors = [], []
    for c, e in zip(costs, errors):
        order = rng.permutation(np.concatenate([np.arange(c.size), rng.integers(0, c.size, 3)]))
        shuffled_costs.append(c[order])
        shuffled_errors.append(e[order])
    choice = solve_mckp(shuffled_costs, shuffled_errors, budget)
    assert objective(shuffled_errors, choice) == pytest.approx(base, rel=REL)
    assert total_cost(shuffled_costs, choice) <= budget * (1 + REL)


@pytest.mark.parametrize("unit", [1.0, 0.7])  # 0.7: no integer cost grid to round the budget to
def test_tied_groups_where_lp_bound_is_never_integral(unit):
    """Identical groups with half a unit of slack: the LP bound stays below the optimum."""
    groups = 40
    costs = [np.array([0.0, unit])] * groups
    errors = [np.array([1.0, 0.0])] * groups
    choice = solve_mckp(costs, errors, unit * (groups / 2 + 0.5))
    assert objective(errors, choice) == groups / 2
    assert total_cost(costs, choice) == pytest.approx(unit * groups / 2)


def test_an_optimum_above_the_probing_target_is_still_found():
    """The probing pass prunes against LB + PROBE * (UB - LB); here the optimum (2) lies above it
    (LB 1, first UB 3), so the probe finds nothing and the second pass must."""
    costs, errors = [np.array([0.0]), np.array([0.0, 3, 2, 3, 2])], [np.array([0.0]), np.array([3.0, 0, 2, 0, 2])]
    assert objective(errors, solve_mckp(costs, errors, 2.0)) == 2.0


@pytest.mark.parametrize("probe", [0.0, 0.25, 1.0])  # 0: every probe fails unless LB is optimal; 1: no probe
def test_every_probing_target_gives_the_exact_optimum(probe, monkeypatch):
    monkeypatch.setattr(ExactSearch, "PROBE", probe)
    rng = np.random.default_rng(7)
    for _ in range(12):
        costs, errors = zip(*(llm_like_group(rng, str(rng.choice(["convex", "nonconvex"]))) for _ in range(10)))
        costs = [np.round(c / 64.0) for c in costs]  # small integer costs for the budget DP
        budget = float(np.floor(rng.uniform(0.3, 0.9) * sum(c.max() for c in costs)))
        assert_optimal(list(costs), list(errors), budget, integer_budget_dp(costs, errors, budget))


def test_single_option_groups_only():
    """Every group fixed by the prepared first round: nothing left for the bound, the DP or the probe."""
    costs, errors = [np.array([2.0]), np.array([3.0])], [np.array([1.5]), np.array([0.5])]
    assert solve_mckp(costs, errors, 5.0) == [0, 0]
    with pytest.raises(InfeasibleBudgetError):
        solve_mckp(costs, errors, 4.0)


def test_subset_sum_like_instance_stops_at_the_search_limit_with_a_bound():
    """Errors exactly linear in real costs: the optimum is a subset-sum; the limit must hold."""
    rng = np.random.default_rng(0)
    costs = [np.sort(rng.uniform(0, 10, 10)) for _ in range(30)]
    errors = [10 - c for c in costs]
    budget = sum(c.mean() for c in costs)
    with pytest.raises(MCKPSearchLimitError, match="more than 20000 partial solutions") as info:
        solve_mckp(costs, errors, budget, max_candidates=20_000)
    found = info.value
    assert total_cost(costs, found.choice) <= budget
    assert objective(errors, found.choice) == pytest.approx(found.value)
    assert found.lower_bound <= found.value < found.lower_bound + 1e-3
    assert found.lower_bound == pytest.approx(300 - budget)  # LP: the whole budget converts at slope 1


# ------------------------------------------------------------------ (d) bad inputs


@pytest.mark.parametrize("costs, errors, budget, message", [
    ([np.ones(2)], [np.ones(2), np.ones(2)], 1.0, "costs has 1 groups but errors has 2"),
    ([], [], 1.0, "at least one group"),
    ([np.ones(2), np.ones(0)], [np.ones(2), np.ones(0)], 1.0, "group 1 has no options"),
    ([np.ones(3)], [np.ones(2)], 1.0, "group 0: 3 costs but 2 errors"),
    ([np.ones((2, 2))], [np.ones((2, 2))], 1.0, "1-D"),
    ([np.array([1.0, np.nan])], [np.ones(2)], 1.0, "group 0: costs contain non-finite"),
    ([np.ones(2), np.ones(2)], [np.ones(2), np.array([0.0, np.inf])], 1.0, "group 1: errors contain non-finite"),
    ([np.ones(2)], [np.ones(2)], float("nan"), "budget must be finite"),
    ([np.ones(2)], [np.ones(2)], "lots", "budget must be a number"),
])
def test_bad_inputs_raise_specific_errors(costs, errors, budget, message):
    with pytest.raises(ValueError, match=message):
        solve_mckp(costs, errors, budget)
    with pytest.raises(ValueError, match=message):
        solve_mckp_pulp(costs, errors, budget)


def test_helpers_check_the_choice_length():
    costs, errors = [np.array([1.0, 2.0]), np.array([3.0])], [np.array([0.5, 0.25]), np.array([1.0])]
    assert total_cost(costs, [1, 0]) == 5.0
    assert objective(errors, [1, 0]) == 1.25
    with pytest.raises(ValueError, match="choice has 1 entries for 2 groups"):
        objective(errors, [0])


# ------------------------------------------------------------------ PuLP wrapper


@pytest.mark.parametrize("solver", ["highs", "cbc"])
def test_pulp_reports_infeasible_budget(solver):
    costs, errors = [np.array([3.0, 5.0])] * 3, [np.array([1.0, 0.0])] * 3
    with pytest.raises(InfeasibleBudgetError, match="costs 9"):
        solve_mckp_pulp(costs, errors, 8.0, solver=solver)


def test_pulp_rejects_unknown_solver():
    with pytest.raises(ValueError, match="solver must be 'highs' or 'cbc'"):
        solve_mckp_pulp([np.ones(2)], [np.ones(2)], 5.0, solver="gurobi")


def test_pulp_without_proven_optimum_raises(monkeypatch):
    stopped = PulpRun(choice=[0], status="Optimal", proven_optimal=False, solver="HiGHS", seconds=1.0)
    monkeypatch.setattr(pulp_reference, "run_pulp_mckp", lambda *a, **k: stopped)
    with pytest.raises(RuntimeError, match="HiGHS stopped without a proven optimum"):
        solve_mckp_pulp([np.ones(2)], [np.ones(2)], 5.0)


def test_run_pulp_reports_status_and_solver():
    costs, errors = [np.array([1.0, 2.0, 4.0])] * 4, [np.array([4.0, 1.0, 0.0])] * 4
    run = run_pulp_mckp(costs, errors, 9.0, solver="highs")
    assert run.proven_optimal and run.status == "Optimal" and run.solver == "HiGHS"
    assert objective(errors, run.choice) == objective(errors, solve_mckp(costs, errors, 9.0)) == 4.0  # all at cost 2
