"""The budget-independent part of an MCKP solve, made once and reused for any budget."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .hull import HullOrder, hull_order
from .problem import tolerances, validated
from .table import Table, cost_grid, pareto, shift_costs, table_from_groups


@dataclass(frozen=True)
class FirstRound:
    """What the first bound-and-fix round on a Pareto table needs, whatever the budget."""

    fixed_gid: np.ndarray  # groups with a single option, fixed for every budget
    fixed_idx: np.ndarray
    fixed_cost: float
    fixed_err: float
    table: Table  # the other rows
    shifted: Table  # ... with each row's cheapest option at cost 0
    grid: int | None  # gcd of the shifted costs (``cost_grid``)
    ordered: HullOrder | None  # their LP hull in greedy order (None: no rows left)


def first_round(table: Table) -> FirstRound:
    """``FirstRound`` of a Pareto table: its single-option rows fixed, the rest shifted, gridded and hulled."""
    single = table.n == 1
    fixed_idx = table.idx[single, 0]
    fixed_cost, fixed_err = float(table.cost[single, 0].sum()), float(table.err[single, 0].sum())
    rest = table.rows(~single) if single.any() else table
    if not rest.n.size:
        return FirstRound(table.gid[single], fixed_idx, fixed_cost, fixed_err, rest, rest, None, None)
    shifted, _ = shift_costs(rest, 0.0)
    return FirstRound(table.gid[single], fixed_idx, fixed_cost, fixed_err, rest, shifted, cost_grid(shifted),
                      hull_order(shifted))


@dataclass(frozen=True)
class PreparedMCKP:
    """The budget-independent part of ``solve_mckp``: validated options reduced to their
    Pareto front, and the first round's LP hull in greedy order. Reusable for any budget
    (the Allocate page's slider re-solves one table), so a solve starts at the binary
    search for the LP split instead of rebuilding the hull of every group."""

    raw: Table
    table: Table
    n_groups: int
    largest_cost: float  # sum of each group's largest |cost| (budget tolerance)
    obj_tol: float
    first: FirstRound


def prepare_mckp(costs: Sequence[np.ndarray], errors: Sequence[np.ndarray]) -> PreparedMCKP:
    """Validate and reduce an MCKP once (step 1 of ``solve_mckp`` and the first LP hull); pass it as ``prepared=``."""
    problem = validated(costs, errors, 0.0)
    raw = table_from_groups(problem)
    largest_cost = float(np.maximum.reduceat(np.abs(problem.flat_cost), problem.starts).sum())
    _, obj_tol = tolerances(problem)
    table = pareto(raw)
    return PreparedMCKP(raw, table, int(problem.lengths.size), largest_cost, obj_tol, first_round(table))
