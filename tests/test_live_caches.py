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
