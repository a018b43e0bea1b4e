"""Lagrangian and LP bounds that prune the exact search.

Reduced costs give the Lagrangian bound and the excess used for reduced-cost fixing;
``SuffixBounds`` gives the LP bound and greedy completion of the rows a DP state has
not reached yet.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .hull import hull_order
from .table import Table


def _reduced_costs(shifted: Table, multiplier: float) -> np.ndarray:
    """err + multiplier * cost, inf on padding (padding holds inf cost and error)."""
    if multiplier == 0.0:
        return shifted.err
    return shifted.err + multiplier * shifted.cost


def reduced_cost_excess(shifted: Table, slack: float, multiplier: float) -> tuple[np.ndarray, float]:
    """Excess of each option's reduced cost over its row minimum, and the Lagrangian bound.

    For lam >= 0 and every feasible x:  err(x) >= L(lam) + sum_l excess[l, x_l]  with
    reduced cost rc = err + lam * cost, excess = rc - min_j rc and the Lagrangian
    bound L(lam) = sum_l min_j rc[l, j] - lam * slack. Padding gets excess inf.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # the caller checks the bound is finite
        reduced = _reduced_costs(shifted, multiplier)
        row_min = reduced.min(axis=1)
        return reduced - row_min[:, None], float(row_min.sum()) - multiplier * slack


@dataclass
class _Suffix:
    """LP of the rows after some row r as a piecewise-linear function of their budget."""

    after_row: int  # the rows after this one are covered
    breakpoints: np.ndarray  # budget at which each segment starts, plus the total
    values: np.ndarray  # LP value (= greedy integer value) at each breakpoint
    steps: np.ndarray  # cost of each segment, then inf
    drops: np.ndarray  # error drop of each segment, then 0

    def evaluate(self, left: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """LP value, greedy integer value and greedy prefix length for budgets `left`."""
        k = np.maximum(np.searchsorted(self.breakpoints, left, side="right") - 1, 0)
        greedy = self.values[k]
        with np.errstate(over="ignore"):  # subnormal step: the fraction clips to 1
            fraction = np.clip((left - self.breakpoints[k]) / self.steps[k], 0.0, 1.0)
        return greedy - fraction * self.drops[k], greedy, k


class SuffixBounds:
    """LP bounds and greedy completions of the rows after a given one (state DP).

    The greedy order of all hull segments, restricted to rows > r, is the greedy order
    of that suffix, so one sort serves every suffix. Segments of rows <= r get zero
    length instead of being removed; `evaluate` always lands on a real segment. The
    DP asks for the suffixes by rising r, so each call zeroes the segments of the rows
    passed since the last one and takes one cumulative sum (not a rows x segments table).
    """

    def __init__(self, shifted: Table):
        ordered = hull_order(shifted)
        self.hull, segments, order = ordered.hull, ordered.segments, ordered.order
        self.row, self.step, self.drop = segments.row[order], segments.step[order], segments.drop[order]
        self.steps, self.drops = np.append(self.step, np.inf), np.append(self.drop, 0.0)
        self.suffix_err = np.append(np.cumsum(shifted.err[::-1, 0])[::-1], 0.0)
        self._by_row = np.argsort(self.row, kind="stable")
        self._row_start = np.searchsorted(self.row[self._by_row], np.arange(shifted.n.size + 1))
        self._masked = np.vstack([self.step, self.drop])  # segments of rows <= _done zeroed
        self._done = -1

    def after(self, r: int) -> _Suffix:
        if r < self._done:  # not the DP's order: start again from every row
            self._masked, self._done = np.vstack([self.step, self.drop]), -1
        passed = self._by_row[self._row_start[self._done + 1]:self._row_start[r + 1]]
        self._masked[:, passed] = 0.0
        self._done = r
        sums = np.zeros((2, self.row.size + 1))
        np.cumsum(self._masked, axis=1, out=sums[:, 1:])
        return _Suffix(r, sums[0], self.suffix_err[r + 1] - sums[1], self.steps, self.drops)

    def greedy_columns(self, suffix: _Suffix, prefix: int) -> np.ndarray:
        """Column per row of the greedy completion that takes the first `prefix` segments."""
        rows = self.row[:prefix]
        level = np.bincount(rows[rows > suffix.after_row], minlength=self.hull.n.size)
        return self.hull.idx[np.arange(level.size), level]


def suffix_lagrangian_terms(shifted: Table, multiplier: float) -> np.ndarray:
    """Entry k: sum over rows >= k of min_j (err + multiplier * cost); the last entry is 0.

    With b the budget left for those rows, entry k - multiplier * b is their
    Lagrangian lower bound.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        reduced = _reduced_costs(shifted, multiplier)
    return np.append(np.cumsum(reduced.min(axis=1)[::-1])[::-1], 0.0)
