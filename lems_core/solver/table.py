"""Padded option table: the options of many groups as rows of inf-padded 2-D arrays.

Every step of the exact solver works on whole tables at once (vectorised over groups):
``pareto`` drops dominated options, ``shift_costs`` puts each row's cheapest option at
cost 0, ``cost_grid`` finds the gcd that integer costs share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .problem import Problem


@dataclass
class Table:
    """Options of several groups as rows of inf-padded 2-D arrays.

    Row r is group `gid[r]`; its `n[r]` options fill columns 0..n[r]-1 (after `pareto`:
    cost strictly rising, error strictly falling); `idx` maps an entry back to the
    caller's option index (-1 for padding).
    """

    gid: np.ndarray
    cost: np.ndarray
    err: np.ndarray
    idx: np.ndarray
    n: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        return np.arange(self.cost.shape[1]) < self.n[:, None]

    def keep(self, mask: np.ndarray) -> "Table":
        """Only the masked entries, moved to the front of their rows; empty rows dropped."""
        counts = mask.sum(axis=1)
        if counts.all() and np.array_equal(counts, self.n):
            return self
        (cost, err, idx), n = compact(mask, (self.cost, self.err, self.idx))
        rows = n > 0
        if rows.all():
            return Table(self.gid, cost, err, idx, n)
        return Table(self.gid[rows], cost[rows], err[rows], idx[rows], n[rows])

    def rows(self, selected: np.ndarray) -> "Table":
        n = self.n[selected]
        width = int(n.max()) if n.size else 0
        return Table(self.gid[selected], self.cost[selected, :width],
                     self.err[selected, :width], self.idx[selected, :width], n)

    def trimmed(self) -> "Table":
        """The same table without all-padding columns at the right (views)."""
        width = int(self.n.max())
        return Table(self.gid, self.cost[:, :width], self.err[:, :width], self.idx[:, :width], self.n)

    def at(self, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cost and error of one column per row."""
        rows = np.arange(columns.size)
        return self.cost[rows, columns], self.err[rows, columns]


def compact(mask: np.ndarray, arrays: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """Move the masked entries of each row to its front (order kept) and pad the rest.

    Gathers only the masked entries (the masks here are mostly sparse), not whole rows.
    """
    rows, cols = np.nonzero(mask)
    counts = np.bincount(rows, minlength=mask.shape[0])
    width = int(counts.max()) if counts.size else 0
    slot = np.arange(rows.size) - (np.cumsum(counts) - counts)[rows]
    out = []
    for a in arrays:
        packed = np.full((mask.shape[0], width), np.inf if a.dtype.kind == "f" else -1, dtype=a.dtype)
        packed[rows, slot] = a[rows, cols]
        out.append(packed)
    return out, counts


def table_from_groups(problem: Problem) -> Table:
    lengths = problem.lengths
    valid = np.arange(int(lengths.max())) < lengths[:, None]
    cost = np.full(valid.shape, np.inf)
    err = np.full(valid.shape, np.inf)
    cost[valid] = problem.flat_cost
    err[valid] = problem.flat_err
    idx = np.where(valid, np.arange(valid.shape[1]), -1)
    return Table(np.arange(lengths.size), cost, err, idx, lengths)


def pareto(table: Table) -> Table:
    """Drop dominated options: along rising cost the error must strictly fall.

    Rows are ordered by (cost, error, index); an option survives only if its error is
    below that of every option before it, which also drops equal-cost duplicates.
    """
    cost, err, idx = table.cost, table.err, table.idx
    step_up = cost[:, 1:] > cost[:, :-1]
    tie_ok = (cost[:, 1:] == cost[:, :-1]) & (err[:, 1:] >= err[:, :-1])
    if not (step_up | tie_ok).all():
        order = np.lexsort((idx, err, cost), axis=-1)
        cost, err, idx = (np.take_along_axis(a, order, axis=1) for a in (cost, err, idx))
    best_before = np.minimum.accumulate(err, axis=1)
    keep = np.ones(err.shape, dtype=bool)
    keep[:, 1:] = err[:, 1:] < best_before[:, :-1]
    keep &= idx >= 0
    return Table(table.gid, cost, err, idx, table.n).keep(keep)


def shift_costs(table: Table, budget: float) -> tuple[Table, float]:
    """The table with each row's cheapest option at cost 0, and the budget left over."""
    base = table.cost[:, 0]
    shifted = Table(table.gid, table.cost - base[:, None], table.err, table.idx, table.n)
    return shifted, budget - float(base.sum())


def cost_grid(shifted: Table) -> int | None:
    """gcd of all (shifted) costs when they are integers below 2**53, else None."""
    costs = shifted.cost[shifted.valid]
    if not np.all(costs < 2.0 ** 53) or not np.array_equal(costs, np.round(costs)):
        return None
    grid = int(np.gcd.reduce(costs.astype(np.int64)))
    return grid or None


def round_down_to_cost_grid(slack: float, grid: int | None, budget_tol: float) -> float:
    """The largest reachable slack when all (shifted) costs are integers.

    Every choice then costs a multiple of g = gcd(costs) (``cost_grid``), so slack can
    drop to a multiple of g: this closes LP gaps caused by budget that no choice can use
    (as with parameter counts, which are multiples of 8 (m + n) for ranks in steps of 8).
    """
    if slack <= 0 or grid is None:
        return slack
    return float(np.floor((slack + budget_tol) / grid) * grid)
