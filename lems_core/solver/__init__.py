"""Global rank allocation as a multiple-choice knapsack problem (docs/reference/methods.md §1.4).

Every group (a weight matrix) offers options (candidate ranks) with a cost (parameter
count) and an error (surrogate loss). Pick exactly one option per group so that the
summed error is minimal and the summed cost stays within the budget:

    min  sum_l e[l, x_l]   s.t.  sum_l c[l, x_l] <= budget.

`solve_mckp` solves this exactly with numpy only and in milliseconds (LP bound over the
lower convex hulls, reduced-cost fixing, then a bounded state DP over the few groups
left); `solve_mckp_pulp` / `run_pulp_mckp` state the same ILP for PuLP (HiGHS or CBC)
and serve as the reference. `objective` and `total_cost` score a choice.

Modules, in data-flow order: ``problem`` (input checks, scoring, errors), ``table``
(padded option tables, Pareto fronts), ``hull`` (LP relaxation over lower convex
hulls), ``bounds`` (Lagrangian and suffix LP bounds), ``prepared`` (the
budget-independent first round), ``search`` (the exact search and ``solve_mckp``),
``pulp_reference`` (the PuLP ILP).
"""
from .prepared import PreparedMCKP, prepare_mckp
from .problem import InfeasibleBudgetError, MCKPSearchLimitError, objective, total_cost
from .pulp_reference import PulpRun, run_pulp_mckp, solve_mckp_pulp
from .search import solve_mckp

__all__ = [
    "InfeasibleBudgetError", "MCKPSearchLimitError", "PreparedMCKP", "PulpRun", "objective", "prepare_mckp",
    "run_pulp_mckp", "solve_mckp", "solve_mckp_pulp", "total_cost",
]
