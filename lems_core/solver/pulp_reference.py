"""The MCKP as a PuLP ILP (HiGHS or CBC): the reference for the exact numpy solver."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .problem import InfeasibleBudgetError, minimum_cost, validated


@dataclass
class PulpRun:
    """Outcome of one PuLP solve: the choice (None without a solution) and its status."""

    choice: list[int] | None
    status: str  # pulp.LpStatus text: "Optimal", "Infeasible", "Not Solved", ...
    proven_optimal: bool  # False when e.g. the time limit stopped the search first
    solver: str  # the PuLP solver class actually used
    seconds: float  # model building plus solving


def _pulp_solver(pulp, solver: str, time_limit: float, gap_rel: float, gap_abs: float, msg: bool):
    if solver == "highs":
        options = dict(msg=msg, timeLimit=time_limit, gapRel=gap_rel, gapAbs=gap_abs)
        api = pulp.HiGHS(**options)
        if api.available():
            return api
        cmd = pulp.HiGHS_CMD(**options)
        if cmd.available():
            return cmd
        raise RuntimeError("neither highspy (pulp.HiGHS) nor a highs executable is available")
    if solver == "cbc":
        cbc = pulp.PULP_CBC_CMD(msg=msg, timeLimit=time_limit, gapRel=gap_rel, gapAbs=gap_abs)
        if not cbc.available():
            raise RuntimeError("PULP_CBC_CMD is not available (PuLP >= 4 no longer bundles CBC)")
        return cbc
    raise ValueError(f"solver must be 'highs' or 'cbc', got {solver!r}")


def run_pulp_mckp(costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], budget: float,
                  solver: str = "highs", time_limit: float = 60.0, gap_rel: float = 0.0,
                  gap_abs: float = 0.0, msg: bool = False) -> PulpRun:
    """Solve the MCKP as a PuLP ILP and report status and time instead of raising."""
    import pulp

    problem = validated(costs, errors, budget)
    cost_arrays, error_arrays, budget = problem.costs, problem.errors, problem.budget
    start = time.perf_counter()
    backend = _pulp_solver(pulp, solver, time_limit, gap_rel, gap_abs, msg)
    prob = pulp.LpProblem("mckp", pulp.LpMinimize)
    x = [[pulp.LpVariable(f"x_{g}_{j}", cat=pulp.LpBinary) for j in range(c.size)]
         for g, c in enumerate(cost_arrays)]
    pairs_err = [(v, float(e)) for xs, es in zip(x, error_arrays) for v, e in zip(xs, es)]
    pairs_cost = [(v, float(c)) for xs, cs in zip(x, cost_arrays) for v, c in zip(xs, cs)]
    prob += pulp.LpAffineExpression(pairs_err)
    prob += pulp.LpAffineExpression(pairs_cost) <= budget, "budget"
    for g, xs in enumerate(x):
        prob += pulp.lpSum(xs) == 1, f"one_option_{g}"
    prob.solve(backend)
    seconds = time.perf_counter() - start
    status = pulp.LpStatus[prob.status]
    has_solution = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    choice = None
    if has_solution:
        choice = [int(np.argmax([v.varValue or 0.0 for v in xs])) for xs in x]
    proven = prob.status == pulp.LpStatusOptimal and prob.sol_status == pulp.LpSolutionOptimal
    return PulpRun(choice, status, proven, type(backend).__name__, seconds)


def solve_mckp_pulp(costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], budget: float,
                    solver: str = "highs", time_limit: float = 60.0, gap_rel: float = 0.0,
                    msg: bool = False) -> list[int]:
    """The same MCKP solved by PuLP: "highs" (in-process highspy, else HiGHS_CMD) or "cbc".

    Binary x[l, j], sum_j x[l, j] = 1 per group, sum c x <= budget, min sum e x. With the
    default gap 0 the solver must prove optimality (mip_abs_gap is set to 0 as well).
    Raises InfeasibleBudgetError when the solver reports infeasibility and RuntimeError
    when it stops without a proven optimum (time limit, numerical trouble).
    """
    result = run_pulp_mckp(costs, errors, budget, solver=solver, time_limit=time_limit,
                           gap_rel=gap_rel, gap_abs=0.0 if gap_rel == 0 else 1e-6 * gap_rel, msg=msg)
    if result.status == "Infeasible":
        raise InfeasibleBudgetError(minimum_cost(costs), budget)
    if not result.proven_optimal or result.choice is None:
        raise RuntimeError(f"{result.solver} stopped without a proven optimum (status {result.status})")
    return result.choice
