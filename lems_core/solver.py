"""Global rank allocation as a multiple-choice knapsack problem (methods.md §1.4).

Every group (a weight matrix) offers options (candidate ranks) with a cost (parameter
count) and an error (surrogate loss). Pick exactly one option per group so that the
summed error is minimal and the summed cost stays within the budget:

    min  sum_l e[l, x_l]   s.t.  sum_l c[l, x_l] <= budget.

`solve_mckp` solves this exactly with numpy only and in milliseconds (LP bound over the
lower convex hulls, reduced-cost fixing, then a bounded state DP over the few groups
left); `solve_mckp_pulp` / `run_pulp_mckp` state the same ILP for PuLP (HiGHS or CBC)
and serve as the reference. `objective` and `total_cost` score a choice.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

_EPS = np.finfo(np.float64).eps
# Relative slack of the objective below which a candidate does not count as better.
_OBJ_RTOL = 1e-12


class InfeasibleBudgetError(ValueError):
    """The budget is smaller than the cost of the cheapest option in every group."""

    def __init__(self, min_cost: float, budget: float):
        self.min_cost = float(min_cost)
        self.budget = float(budget)
        super().__init__(
            f"budget {self.budget:.10g} is infeasible: choosing the cheapest option in every "
            f"group already costs {self.min_cost:.10g} ({self.min_cost - self.budget:.4g} over)"
        )


class MCKPSearchLimitError(RuntimeError):
    """The exact search hit its size limit; carries the best solution found and a bound."""

    def __init__(self, choice: list[int], value: float, lower_bound: float, max_candidates: int):
        self.choice, self.value, self.lower_bound = choice, float(value), float(lower_bound)
        super().__init__(
            f"exact MCKP search stopped: one step needed more than {max_candidates} partial "
            f"solutions; best found {self.value:.10g}, lower bound {self.lower_bound:.10g} "
            f"(gap {self.value - self.lower_bound:.3g}); use solve_mckp_pulp with a time limit or "
            f"raise max_candidates")


# ----------------------------------------------------------------------------- inputs


@dataclass
class _Problem:
    """Validated input: float64 groups, also flattened (all groups back to back)."""

    costs: list[np.ndarray]
    errors: list[np.ndarray]
    budget: float
    flat_cost: np.ndarray
    flat_err: np.ndarray
    lengths: np.ndarray

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths) - self.lengths


def _validated(costs, errors, budget) -> _Problem:
    """Check shapes, sizes and finiteness with specific messages."""
    if len(costs) != len(errors):
        raise ValueError(f"costs has {len(costs)} groups but errors has {len(errors)}")
    if len(costs) == 0:
        raise ValueError("need at least one group")
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number, got {budget!r}") from None
    if not np.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget}")
    cost_arrays = [np.asarray(c, dtype=np.float64) for c in costs]
    error_arrays = [np.asarray(e, dtype=np.float64) for e in errors]
    for g, (c, e) in enumerate(zip(cost_arrays, error_arrays)):
        if c.ndim != 1 or e.ndim != 1:
            raise ValueError(f"group {g}: costs and errors must be 1-D arrays")
        if c.size == 0:
            raise ValueError(f"group {g} has no options")
        if c.shape != e.shape:
            raise ValueError(f"group {g}: {c.size} costs but {e.size} errors")
    flat = {}
    for name, arrays in (("costs", cost_arrays), ("errors", error_arrays)):
        flat[name] = np.concatenate(arrays)
        if not np.isfinite(flat[name]).all():
            g = next(g for g, a in enumerate(arrays) if not np.isfinite(a).all())
            raise ValueError(f"group {g}: {name} contain non-finite values")
    lengths = np.array([c.size for c in cost_arrays], dtype=np.int64)
    return _Problem(cost_arrays, error_arrays, budget, flat["costs"], flat["errors"], lengths)


def _check_choice(groups: Sequence, choice: Sequence[int]) -> None:
    if len(choice) != len(groups):
        raise ValueError(f"choice has {len(choice)} entries for {len(groups)} groups")


def objective(errors: Sequence[np.ndarray], choice: Sequence[int]) -> float:
    """Summed error of one option per group."""
    _check_choice(errors, choice)
    return float(sum(float(np.asarray(e)[j]) for e, j in zip(errors, choice)))


def total_cost(costs: Sequence[np.ndarray], choice: Sequence[int]) -> float:
    """Summed cost of one option per group."""
    _check_choice(costs, choice)
    return float(sum(float(np.asarray(c)[j]) for c, j in zip(costs, choice)))


def _minimum_cost(costs: Sequence[np.ndarray]) -> float:
    """Cost of the cheapest option in every group: the smallest feasible budget."""
    return float(sum(float(np.min(c)) for c in costs))


# ----------------------------------------------------------------- padded option table


@dataclass
class _Table:
    """Options of several groups as rows of inf-padded 2-D arrays.

    Row r is group `gid[r]`; its `n[r]` options fill columns 0..n[r]-1 (after `_pareto`:
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

    def keep(self, mask: np.ndarray) -> "_Table":
        """Only the masked entries, moved to the front of their rows; empty rows dropped."""
        counts = mask.sum(axis=1)
        if counts.all() and np.array_equal(counts, self.n):
            return self
        (cost, err, idx), n = _compact(mask, (self.cost, self.err, self.idx))
        rows = n > 0
        if rows.all():
            return _Table(self.gid, cost, err, idx, n)
        return _Table(self.gid[rows], cost[rows], err[rows], idx[rows], n[rows])

    def rows(self, selected: np.ndarray) -> "_Table":
        n = self.n[selected]
        width = int(n.max()) if n.size else 0
        return _Table(self.gid[selected], self.cost[selected, :width],
                      self.err[selected, :width], self.idx[selected, :width], n)

    def trimmed(self) -> "_Table":
        """The same table without all-padding columns at the right (views)."""
        width = int(self.n.max())
        return _Table(self.gid, self.cost[:, :width], self.err[:, :width], self.idx[:, :width], self.n)

    def at(self, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cost and error of one column per row."""
        rows = np.arange(columns.size)
        return self.cost[rows, columns], self.err[rows, columns]


def _compact(mask: np.ndarray, arrays: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
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


def _table_from_groups(problem: _Problem) -> _Table:
    lengths = problem.lengths
    valid = np.arange(int(lengths.max())) < lengths[:, None]
    cost = np.full(valid.shape, np.inf)
    err = np.full(valid.shape, np.inf)
    cost[valid] = problem.flat_cost
    err[valid] = problem.flat_err
    idx = np.where(valid, np.arange(valid.shape[1]), -1)
    return _Table(np.arange(lengths.size), cost, err, idx, lengths)


def _pareto(table: _Table) -> _Table:
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
    return _Table(table.gid, cost, err, idx, table.n).keep(keep)


def _tolerances(problem: _Problem) -> tuple[float, float]:
    """Absolute slack on the budget (float summation noise) and on the objective.

    budget: 4 * eps * n_groups * max(|budget|, sum of each group's largest |cost|);
    objective: 1e-12 * sum of each group's largest |error|.
    """
    largest_cost = np.maximum.reduceat(np.abs(problem.flat_cost), problem.starts).sum()
    largest_err = np.maximum.reduceat(np.abs(problem.flat_err), problem.starts).sum()
    cost_scale = max(abs(problem.budget), float(largest_cost))
    return 4.0 * _EPS * problem.lengths.size * cost_scale, _OBJ_RTOL * float(largest_err)


# ------------------------------------------------------------------ LP relaxation


def _non_convex_points(cost: np.ndarray, err: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Interior points on or above a chord through their predecessor: never hull vertices.

    Point j is tested against the chord to its successor and the chord to the row's
    last point, so a far outlier (the dense option) removes a whole tail in one pass.
    With step = cost increase and drop = error decrease from point j - 1 to j, j lies
    on or above the chord to b iff drop_j * (c_b - c_j) <= (e_j - e_b) * step_j.
    """
    bad = np.zeros(cost.shape, dtype=bool)
    if cost.shape[1] < 3:
        return bad
    last = n - 1
    rows = np.arange(n.size)
    with np.errstate(invalid="ignore", over="ignore"):
        step = cost[:, 1:] - cost[:, :-1]
        drop = err[:, :-1] - err[:, 1:]
        toward_next = drop[:, :-1] * step[:, 1:] <= drop[:, 1:] * step[:, :-1]
        toward_last = (drop[:, :-1] * (cost[rows, last][:, None] - cost[:, 1:-1])
                       <= (err[:, 1:-1] - err[rows, last][:, None]) * step[:, :-1])
    bad[:, 1:-1] = (toward_next | toward_last) & (np.arange(1, cost.shape[1] - 1) < last[:, None])
    return bad


def _lower_hull(table: _Table) -> _Table:
    """Lower convex hull of each row's Pareto points; its `idx` is the column in `table`.

    All points found above a chord are removed at once and the rows that changed are
    tested again, until every row is convex. A row that only lost one block of points
    right before its last point needs no second test: the point before the block was
    tested against the chord to the last point, everything else kept its neighbours.
    """
    columns = np.broadcast_to(np.arange(table.cost.shape[1]), table.cost.shape)
    hull = _Table(table.gid, table.cost, table.err, columns, table.n)
    copied = False
    work = np.flatnonzero(table.n >= 3)
    if work.size == table.n.size:
        cost, err, col, n = table.cost, table.err, columns, table.n
    else:
        cost, err, col, n = table.cost[work], table.err[work], columns[work], table.n[work]
    while work.size:
        bad = _non_convex_points(cost, err, n)
        changed = bad.any(axis=1)
        if not changed.any():
            break
        work, bad, n = work[changed], bad[changed], n[changed]
        removed = bad.sum(axis=1)
        tail_only = removed == n - 1 - np.argmax(bad, axis=1)
        alive = (np.arange(cost.shape[1]) < n[:, None]) & ~bad
        (cost, err, col), n = _compact(alive, (cost[changed], err[changed], col[changed]))
        if work.size == hull.n.size:  # every row changed: the compacted arrays are the hull
            hull, copied = _Table(hull.gid, cost, err, col, n.copy()), True
        else:
            if not copied:
                hull = _Table(hull.gid, hull.cost.copy(), hull.err.copy(), hull.idx.copy(), hull.n.copy())
                copied = True
            width = cost.shape[1]
            for full, part, fill in ((hull.cost, cost, np.inf), (hull.err, err, np.inf), (hull.idx, col, -1)):
                full[work, :width] = part
                full[work, width:] = fill
            hull.n[work] = n
        retest = ~tail_only & (n >= 3)
        if not retest.all():
            work, n = work[retest], n[retest]
            width = int(n.max()) if n.size else 0
            cost, err, col = cost[retest, :width], err[retest, :width], col[retest, :width]
    return hull.trimmed()


@dataclass
class _Segments:
    """Hull segments of all rows, row by row (row-major), with their efficiency."""

    row: np.ndarray
    step: np.ndarray  # cost increase, > 0
    drop: np.ndarray  # error decrease, > 0
    efficiency: np.ndarray  # drop / step, non-increasing along each row


def _hull_segments(hull: _Table) -> _Segments:
    with np.errstate(invalid="ignore", over="ignore"):  # a subnormal step may overflow to inf
        step = hull.cost[:, 1:] - hull.cost[:, :-1]
        drop = hull.err[:, :-1] - hull.err[:, 1:]
        real = np.arange(step.shape[1]) < (hull.n - 1)[:, None]
        efficiency = np.where(real, drop / np.where(real, step, 1.0), -np.inf)
    # Falling along a row in exact arithmetic; keep rounding from reordering a row.
    efficiency = np.minimum.accumulate(efficiency, axis=1)
    rows = np.broadcast_to(np.arange(hull.n.size)[:, None], real.shape)
    return _Segments(rows[real], step[real], drop[real], efficiency[real])


def _greedy_order(segments: _Segments, candidates: np.ndarray) -> np.ndarray:
    """Candidates by falling efficiency; ties keep row-major order, so rows stay in order."""
    return candidates[np.lexsort((candidates, -segments.efficiency[candidates]))]


def _efficiency_bracket(segments: _Segments, limit: float, samples: int = 1024) -> tuple[float, float]:
    """Efficiencies hi >= lo such that the greedy fill stops at a segment in [lo, hi].

    A sorted sample estimates where the cumulative cost crosses `limit`; the bracket is
    widened until the exact sums confirm it. Spares a full sort of all segments.
    """
    eff, step = segments.efficiency, segments.step
    stride = max(1, eff.size // samples)
    sample_eff = eff[::stride]
    order = np.argsort(-sample_eff)
    sample_eff = sample_eff[order]
    crossing = int(np.searchsorted(np.cumsum(step[::stride][order]) * stride, limit))
    margin = 16
    while True:
        hi = sample_eff[crossing - margin] if crossing - margin >= 0 else np.inf
        lo = sample_eff[crossing + margin] if crossing + margin < sample_eff.size else -np.inf
        hi_ok = hi == np.inf or step[eff > hi].sum() <= limit
        lo_ok = lo == -np.inf or step[eff >= lo].sum() > limit
        if hi_ok and lo_ok:
            return hi, lo
        margin *= 4


@dataclass
class _GreedyFill:
    """Outcome of the LP greedy: taken segments, the greedy order near the stop, the split."""

    taken: np.ndarray  # bool per segment
    tail: np.ndarray  # taken segments in greedy order, at least those near the split
    split: int  # first segment that does not fit, -1 when all fit


def _greedy_fill(segments: _Segments, limit: float, ordered: "_HullOrder | None" = None) -> _GreedyFill:
    """Take segments by falling efficiency while the cumulative cost stays within `limit`.

    With ``ordered`` (every segment already in greedy order with its cumulative cost)
    this is one binary search; otherwise only the segments near the split are sorted.
    """
    if ordered is not None:
        fit = int(np.searchsorted(ordered.filled, limit, side="right"))
        taken = np.zeros(segments.row.size, dtype=bool)
        taken[ordered.order[:fit]] = True
        split = int(ordered.order[fit]) if fit < ordered.order.size else -1
        return _GreedyFill(taken, ordered.order[:fit], split)
    eff = segments.efficiency
    hi, lo = _efficiency_bracket(segments, limit) if eff.size > 4096 else (np.inf, -np.inf)
    taken = eff > hi
    order = _greedy_order(segments, np.flatnonzero(~taken & (eff >= lo)))
    filled = float(segments.step[taken].sum()) + np.cumsum(segments.step[order])
    fit = int(np.searchsorted(filled, limit, side="right"))
    taken[order[:fit]] = True
    return _GreedyFill(taken, order[:fit], int(order[fit]) if fit < order.size else -1)


@dataclass(frozen=True)
class _HullOrder:
    """Budget-independent LP data of one shifted table: hull, segments, greedy order.

    ``filled[k]`` is the cost of the first k + 1 segments in greedy order, so the LP
    for any budget is a binary search (``_greedy_fill``).
    """

    hull: _Table
    segments: _Segments
    order: np.ndarray
    filled: np.ndarray


def _hull_order(shifted: _Table) -> _HullOrder:
    """The lower hulls of ``shifted``'s rows, their segments, and all segments in greedy order."""
    hull = _lower_hull(shifted)
    segments = _hull_segments(hull)
    order = _greedy_order(segments, np.arange(segments.row.size))
    return _HullOrder(hull, segments, order, np.cumsum(segments.step[order]))


@dataclass
class _Relaxation:
    """LP optimum of a cost-shifted table and integer solutions read off it."""

    bound: float  # LP value: a lower bound on every integer solution
    multiplier: float  # optimal Lagrange multiplier of the budget row
    roundings: list[np.ndarray]  # column per row: LP rounded down, and (if possible) up


def _lp_relaxation(shifted: _Table, slack: float, budget_tol: float,
                   ordered: _HullOrder | None = None) -> _Relaxation:
    """Greedy LP solution of the MCKP (Sinha & Zoltners 1979) on a Pareto table.

    Costs are shifted so that column 0 of every row costs 0 and `slack` is the budget
    left after paying column 0 everywhere. Filling lower-hull segments in order of
    falling efficiency solves the LP; the first segment that does not fit (the split)
    gives the optimal multiplier and the fractional part of the bound. Two integer
    solutions come with it: without the split segment, and with it while the least
    efficient taken segments of other rows are given back until the budget holds.
    ``ordered`` (``_hull_order(shifted)``, made once) skips the hull and the sort.
    """
    if ordered is None:
        hull = _lower_hull(shifted)
        segments = _hull_segments(hull)
    else:
        hull, segments = ordered.hull, ordered.segments
    limit = slack + budget_tol
    fill = _greedy_fill(segments, limit, ordered)
    down = _hull_choice(hull, segments, fill.taken)
    if fill.split < 0:
        return _Relaxation(float(shifted.at(down)[1].sum()), 0.0, [down])
    cost, err = shifted.at(down)
    fraction = min(1.0, max(0.0, slack - float(cost.sum())) / float(segments.step[fill.split]))
    bound = float(err.sum()) - fraction * float(segments.drop[fill.split])
    roundings = [down]
    up = _round_up(segments, fill, limit - float(cost.sum()))
    if up is not None:
        roundings.append(_hull_choice(hull, segments, up))
    return _Relaxation(bound, float(segments.efficiency[fill.split]), roundings)


def _hull_choice(hull: _Table, segments: _Segments, taken: np.ndarray) -> np.ndarray:
    """Column (in the table the hull was built from) reached by the taken segments of each row."""
    level = np.bincount(segments.row[taken], minlength=hull.n.size)
    return hull.idx[np.arange(level.size), level]


def _round_up(segments: _Segments, fill: _GreedyFill, room: float) -> np.ndarray | None:
    """Taken segments plus the split, minus the last taken ones of other rows as needed."""
    split_row = segments.row[fill.split]
    givable = fill.tail[::-1]
    givable = givable[segments.row[givable] != split_row]
    given = np.cumsum(segments.step[givable])
    count = int(np.searchsorted(given, segments.step[fill.split] - room, side="left")) + 1
    if count > given.size:
        return None
    taken = fill.taken.copy()
    taken[fill.split] = True
    taken[givable[:count]] = False
    return taken


def _spend_leftover(table: _Table, choice: np.ndarray, budget: float, budget_tol: float,
                    rounds: int = 4) -> np.ndarray:
    """Greedy repair: repeatedly take the one upgrade with the largest error drop that fits."""
    choice = choice.copy()
    leftover = budget - float(table.at(choice)[0].sum())
    for _ in range(rounds):
        cost, err = table.at(choice)
        extra = table.cost - cost[:, None]
        gain = err[:, None] - table.err
        fits = (extra <= leftover + budget_tol) & (gain > 0)
        if not fits.any():
            break
        r, k = np.unravel_index(np.argmax(np.where(fits, gain, -np.inf)), gain.shape)
        choice[r] = k
        leftover -= float(extra[r, k])
    return choice


def _shift_costs(table: _Table, budget: float) -> tuple[_Table, float]:
    """The table with each row's cheapest option at cost 0, and the budget left over."""
    base = table.cost[:, 0]
    shifted = _Table(table.gid, table.cost - base[:, None], table.err, table.idx, table.n)
    return shifted, budget - float(base.sum())


def _cost_grid(shifted: _Table) -> int | None:
    """gcd of all (shifted) costs when they are integers below 2**53, else None."""
    costs = shifted.cost[shifted.valid]
    if not np.all(costs < 2.0 ** 53) or not np.array_equal(costs, np.round(costs)):
        return None
    grid = int(np.gcd.reduce(costs.astype(np.int64)))
    return grid or None


def _round_down_to_cost_grid(slack: float, grid: int | None, budget_tol: float) -> float:
    """The largest reachable slack when all (shifted) costs are integers.

    Every choice then costs a multiple of g = gcd(costs) (``_cost_grid``), so slack can
    drop to a multiple of g: this closes LP gaps caused by budget that no choice can use
    (as with parameter counts, which are multiples of 8 (m + n) for ranks in steps of 8).
    """
    if slack <= 0 or grid is None:
        return slack
    return float(np.floor((slack + budget_tol) / grid) * grid)


def _reduced_costs(shifted: _Table, multiplier: float) -> np.ndarray:
    """err + multiplier * cost, inf on padding (padding holds inf cost and error)."""
    if multiplier == 0.0:
        return shifted.err
    return shifted.err + multiplier * shifted.cost


def _reduced_cost_excess(shifted: _Table, slack: float, multiplier: float) -> tuple[np.ndarray, float]:
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


class _SuffixBounds:
    """LP bounds and greedy completions of the rows after a given one (state DP).

    The greedy order of all hull segments, restricted to rows > r, is the greedy order
    of that suffix, so one sort serves every suffix. Segments of rows <= r get zero
    length instead of being removed; `evaluate` always lands on a real segment. The
    DP asks for the suffixes by rising r, so each call zeroes the segments of the rows
    passed since the last one and takes one cumulative sum (not a rows x segments table).
    """

    def __init__(self, shifted: _Table):
        ordered = _hull_order(shifted)
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


def _suffix_lagrangian_terms(shifted: _Table, multiplier: float) -> np.ndarray:
    """Entry k: sum over rows >= k of min_j (err + multiplier * cost); the last entry is 0.

    With b the budget left for those rows, entry k - multiplier * b is their
    Lagrangian lower bound.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        reduced = _reduced_costs(shifted, multiplier)
    return np.append(np.cumsum(reduced.min(axis=1)[::-1])[::-1], 0.0)


# --------------------------------------------------------------------- exact search


class _SearchLimit(Exception):
    """The state DP would expand more candidates in one step than allowed."""


class _ExactSearch:
    """Lagrangian bound, reduced-cost fixing, then a Pareto-state dynamic program.

    The incumbent (`best_value`, `best_choice`) only moves to strictly better solutions
    (by more than `obj_tol`); groups fixed for good sit in `fixed_*`; `lower_bound` is
    the best proven bound on the optimum.
    """

    PROBE = 0.25  # where the probing DP pass puts its target between the bounds

    def __init__(self, n_groups: int, budget: float, budget_tol: float, obj_tol: float,
                 max_candidates: int):
        self.budget = budget
        self.budget_tol = budget_tol
        self.obj_tol = obj_tol
        self.max_candidates = max_candidates
        self.lower_bound = -np.inf
        self.best_value = np.inf
        self.best_choice = np.full(n_groups, -1, dtype=np.int64)
        self.fixed_choice = np.full(n_groups, -1, dtype=np.int64)
        self.fixed_cost = 0.0
        self.fixed_err = 0.0
        self.cap = np.inf  # optimistic target of the probing pass (``run``)
        self.probing = False

    @property
    def target(self) -> float:
        """Objective a partial solution must be able to beat to be kept (pruning)."""
        return min(self.best_value - self.obj_tol, self.cap)

    def offer(self, table: _Table, columns: np.ndarray) -> None:
        value = self.fixed_err + float(table.at(columns)[1].sum())
        if value < self.best_value - self.obj_tol or self.best_value == np.inf:
            self.best_value = value
            self.best_choice = self.fixed_choice.copy()
            self.best_choice[table.gid] = table.idx[np.arange(columns.size), columns]

    def fix_single_option_rows(self, table: _Table) -> _Table:
        single = table.n == 1
        if single.any():
            self.fixed_choice[table.gid[single]] = table.idx[single, 0]
            self.fixed_cost += float(table.cost[single, 0].sum())
            self.fixed_err += float(table.err[single, 0].sum())
            table = table.rows(~single)
        return table

    def run(self, table: _Table, first: "_FirstRound | None" = None) -> None:
        """The search, first pruned against an optimistic target near the lower bound.

        The optimum usually lies much closer to the LP bound than the incumbents do,
        and the work of fixing and of the DP grows with target - bound. A probing pass
        prunes against cap = LB + PROBE * (UB - LB) (lowered as the bounds move): it
        finds the optimum whenever that lies below cap, since everything cut had a
        bound >= cap. If its best stays above cap, the optimum is >= cap, which becomes
        the lower bound, and a second pass from the improved incumbent finishes exactly.
        """
        self.probing = True
        try:
            self._bound_fix_dp(table, first)
        finally:
            cap, self.cap, self.probing = self.cap, np.inf, False
        if self.best_value < cap + self.obj_tol:
            return
        self.lower_bound = max(self.lower_bound, cap)
        self.fixed_choice[:] = -1
        self.fixed_cost = self.fixed_err = 0.0
        self._bound_fix_dp(table, first)

    def _bound_fix_dp(self, table: _Table, first: "_FirstRound | None") -> None:
        """Bound and fix until fixing stalls, then finish with the state DP.

        ``first`` (``_first_round(table)``, made once per table) holds what the first
        round needs that does not depend on the budget: the single-option rows, the
        shifted table, its cost grid and its LP hull in greedy order.
        """
        first_round = True
        while True:
            if first_round and first is not None:
                table, shifted, grid, ordered = self._start(first)
            else:
                table = self.fix_single_option_rows(table)
                if table.n.size:
                    shifted, _ = _shift_costs(table, 0.0)
                    grid, ordered = _cost_grid(shifted), None
            if not table.n.size:
                break
            slack = self.budget - self.fixed_cost - float(table.cost[:, 0].sum())
            if slack < -self.budget_tol:
                return  # what is left cannot beat the incumbent within the budget
            slack = _round_down_to_cost_grid(slack, grid, self.budget_tol)
            relax = _lp_relaxation(shifted, slack, self.budget_tol, ordered)
            for choice in relax.roundings:
                # Polishing scans the whole table per upgrade: wait until fixing shrank it.
                if not first_round:
                    choice = _spend_leftover(shifted, choice, slack, self.budget_tol)
                self.offer(table, choice)
            # After fixing against a target, the table holds every solution below it, not all of them.
            self.lower_bound = max(self.lower_bound, min(self.fixed_err + relax.bound, self.target))
            if self.probing:
                self.cap = min(self.cap, self.lower_bound + self.PROBE * (self.best_value - self.lower_bound))
            if self.lower_bound >= self.target:
                return  # the LP bound proves the incumbent optimal
            multiplier = relax.multiplier
            excess, lagrangian = _reduced_cost_excess(shifted, slack, multiplier)
            if not np.isfinite(lagrangian):  # overflow from a subnormal cost step: lam = 0 is safe
                multiplier = 0.0
                excess, lagrangian = _reduced_cost_excess(shifted, slack, multiplier)
            useful = excess < self.target - self.fixed_err - lagrangian
            if useful.sum() == table.n.sum():
                self._state_dp(shifted, slack, excess, multiplier)
                return
            table = table.keep(useful)
            first_round = False
        if self.fixed_cost <= self.budget + self.budget_tol and self.fixed_err < self.target:
            self.best_value = self.fixed_err
            self.best_choice = self.fixed_choice.copy()

    def _start(self, first: "_FirstRound") -> tuple[_Table, _Table, int | None, _HullOrder | None]:
        """Apply the cached single-option fixing; the first round's table, shifted table, grid, hull."""
        self.fixed_choice[first.fixed_gid] = first.fixed_idx
        self.fixed_cost, self.fixed_err = first.fixed_cost, first.fixed_err
        return first.table, first.shifted, first.grid, first.ordered

    def _state_dp(self, shifted: _Table, slack: float, excess: np.ndarray, multiplier: float) -> None:
        """Exact search over the rows left, improving the incumbent if possible.

        States are the Pareto-optimal (cost, error) pairs of partial solutions over the
        rows processed so far (a Pisinger-style state DP, valid for real costs). A state
        only spawns the options whose reduced-cost excess keeps its Lagrangian bound
        below the target; a new state must also keep its LP bound (error so far plus
        the LP of the remaining rows with the budget left) below the target. The greedy
        completion of each new state is a feasible solution that lowers the target
        while the DP runs.
        """
        order = _coarse_rows_first(shifted)
        shifted = shifted.rows(order)
        excess = excess[order, :shifted.cost.shape[1]]
        # Each row's options by rising excess: a state takes a prefix of them.
        by_excess = np.argsort(excess, axis=1, kind="stable")
        excess = np.take_along_axis(excess, by_excess, axis=1)
        option_cost = np.take_along_axis(shifted.cost, by_excess, axis=1)
        option_err = np.take_along_axis(shifted.err, by_excess, axis=1)
        suffixes = _SuffixBounds(shifted)
        lagrange_terms = self.fixed_err + _suffix_lagrangian_terms(shifted, multiplier) - multiplier * slack
        state_cost, state_err = np.zeros(1), np.zeros(1)
        history: list[tuple[np.ndarray, np.ndarray]] = []
        for r in range(shifted.n.size):
            state_bound = state_err + multiplier * state_cost + lagrange_terms[r]
            counts = np.searchsorted(excess[r], self.target - state_bound, side="left")
            if counts.sum() > self.max_candidates:
                raise _SearchLimit
            if r < shifted.n.size - 1 and counts.min() == counts.max() == 1:
                # Every state can only afford the row's best option: shift them all, no
                # new dominance or completions (the last row always takes the full path).
                state_cost, state_err = state_cost + option_cost[r, 0], state_err + option_err[r, 0]
                (alive,) = np.nonzero(slack - state_cost >= -self.budget_tol)
                state_cost, state_err = state_cost[alive], state_err[alive]
                history.append((alive, np.zeros(alive.size, dtype=np.int64)))
                if not alive.size:
                    return
                continue
            parent = np.repeat(np.arange(counts.size), counts)
            slot = np.arange(parent.size) - np.repeat(np.cumsum(counts) - counts, counts)
            cost = state_cost[parent] + option_cost[r, slot]
            err = state_err[parent] + option_err[r, slot]
            left = slack - cost
            fits = left >= -self.budget_tol
            suffix = suffixes.after(r)
            lp, greedy, prefix = suffix.evaluate(left)
            completed = np.where(fits, err + greedy, np.inf)
            best = int(np.argmin(completed)) if completed.size else -1
            if best >= 0 and self.fixed_err + completed[best] < self.best_value - self.obj_tol:
                head = np.append(_trace_back(history, int(parent[best])), slot[best])
                head = by_excess[np.arange(r + 1), head]  # sorted slots -> table columns
                tail = suffixes.greedy_columns(suffix, int(prefix[best]))[r + 1:]
                self.offer(shifted, np.concatenate([head, tail]))
            (which,) = np.nonzero(fits & (self.fixed_err + err + lp < self.target))
            if not which.size:
                return
            which = which[_pareto_order(cost[which], err[which])]
            state_cost, state_err = cost[which], err[which]
            history.append((parent[which], slot[which]))


def _coarse_rows_first(table: _Table) -> np.ndarray:
    """Row order for the state DP: widest cost gap between neighbouring options first.

    Rows with fine cost steps are left for the end, where the greedy completions and
    LP bounds of the remaining (fine) rows are nearly exact, so pruning bites early.
    """
    with np.errstate(invalid="ignore"):
        gaps = np.where(table.valid[:, 1:], np.diff(table.cost, axis=1), 0.0)
    return np.argsort(-gaps.max(axis=1, initial=0.0), kind="stable")


def _pareto_order(cost: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Indices of the (cost, err) pairs not dominated by another, by rising cost.

    Among equal costs only the last survivor of the running-minimum filter (the lowest
    error) is kept.
    """
    order = np.argsort(cost, kind="stable")
    err_sorted = err[order]
    keep = np.ones(order.size, dtype=bool)
    keep[1:] = err_sorted[1:] < np.minimum.accumulate(err_sorted)[:-1]
    order = order[keep]
    cost_sorted = cost[order]
    last_of_cost = np.ones(order.size, dtype=bool)
    last_of_cost[:-1] = cost_sorted[:-1] != cost_sorted[1:]
    return order[last_of_cost]


def _trace_back(history: list[tuple[np.ndarray, np.ndarray]], state: int) -> np.ndarray:
    """Columns of the rows behind DP state `state` of the last history entry."""
    columns = np.empty(len(history), dtype=np.int64)
    for r in range(len(history) - 1, -1, -1):
        parents, options = history[r]
        columns[r] = options[state]
        state = int(parents[state])
    return columns


@dataclass(frozen=True)
class _FirstRound:
    """What the first bound-and-fix round on a Pareto table needs, whatever the budget."""

    fixed_gid: np.ndarray  # groups with a single option, fixed for every budget
    fixed_idx: np.ndarray
    fixed_cost: float
    fixed_err: float
    table: _Table  # the other rows
    shifted: _Table  # ... with each row's cheapest option at cost 0
    grid: int | None  # gcd of the shifted costs (``_cost_grid``)
    ordered: _HullOrder | None  # their LP hull in greedy order (None: no rows left)


def _first_round(table: _Table) -> _FirstRound:
    """``_FirstRound`` of a Pareto table: its single-option rows fixed, the rest shifted, gridded and hulled."""
    single = table.n == 1
    fixed_idx = table.idx[single, 0]
    fixed_cost, fixed_err = float(table.cost[single, 0].sum()), float(table.err[single, 0].sum())
    rest = table.rows(~single) if single.any() else table
    if not rest.n.size:
        return _FirstRound(table.gid[single], fixed_idx, fixed_cost, fixed_err, rest, rest, None, None)
    shifted, _ = _shift_costs(rest, 0.0)
    return _FirstRound(table.gid[single], fixed_idx, fixed_cost, fixed_err, rest, shifted, _cost_grid(shifted),
                       _hull_order(shifted))


@dataclass(frozen=True)
class PreparedMCKP:
    """The budget-independent part of ``solve_mckp``: validated options reduced to their
    Pareto front, and the first round's LP hull in greedy order. Reusable for any budget
    (the Allocate page's slider re-solves one table), so a solve starts at the binary
    search for the LP split instead of rebuilding the hull of every group."""

    raw: _Table
    table: _Table
    n_groups: int
    largest_cost: float  # sum of each group's largest |cost| (budget tolerance)
    obj_tol: float
    first: _FirstRound


def prepare_mckp(costs: Sequence[np.ndarray], errors: Sequence[np.ndarray]) -> PreparedMCKP:
    """Validate and reduce an MCKP once (step 1 of ``solve_mckp`` and the first LP hull); pass it as ``prepared=``."""
    problem = _validated(costs, errors, 0.0)
    raw = _table_from_groups(problem)
    largest_cost = float(np.maximum.reduceat(np.abs(problem.flat_cost), problem.starts).sum())
    _, obj_tol = _tolerances(problem)
    table = _pareto(raw)
    return PreparedMCKP(raw, table, int(problem.lengths.size), largest_cost, obj_tol, _first_round(table))


def solve_mckp(costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], budget: float, *,
               max_candidates: int = 1_000_000, prepared: PreparedMCKP | None = None) -> list[int]:
    """Exact multiple-choice knapsack: one option per group, minimal error, cost <= budget.

    Algorithm (vectorised over groups):
      1. drop dominated options (more cost without strictly less error);
      2. LP relaxation by the greedy fill of lower-convex-hull segments (Sinha & Zoltners
         1979): the LP bound LB, the optimal multiplier lam and integer solutions (the LP
         rounded down, and rounded up with repair, plus a greedy spend of the leftover
         budget) giving UB; with integer costs the budget first drops to a multiple of
         their gcd, the most any choice can use;
      3. reduced-cost variable fixing from the Lagrangian relaxation of the budget row:
         an option whose reduced cost err + lam*cost exceeds its group's minimum by
         more than UB - LB cannot be in a better solution and is removed; 2-3 repeat on
         the smaller problem until nothing more goes;
      4. the groups that keep several options are solved exactly by a dynamic program
         over Pareto-optimal (cost, error) states with Lagrangian and LP-bound pruning,
         in the spirit of Pisinger's core algorithms for the MCKP (1995); groups with
         coarse cost steps go first, and greedy completions of the states keep lowering
         the target while it runs.
    Steps 2-4 first run against an optimistic target a quarter of the way from the LP
    bound to the incumbent; the optimum usually lies there, and pruning and fixing then
    cut far more. When nothing that good exists, that target becomes the lower bound
    and steps 2-4 run again against the incumbent.

    Returns the option index per group (ties: some optimal choice). The objective is
    optimal up to 1e-12 of the summed per-group error magnitudes; the budget holds up
    to float summation noise (4 * eps * n_groups relative). Raises InfeasibleBudgetError
    when even the cheapest option of every group exceeds the budget, ValueError on bad
    input, and MCKPSearchLimitError (with the best solution found and a lower bound)
    when one DP step would expand more than `max_candidates` partial solutions; that
    only happens on subset-sum-like instances (e.g. errors exactly linear in real-valued
    costs), which are hard for ILP solvers as well.

    ``prepared`` (``prepare_mckp(costs, errors)``, made once) skips validating and
    reducing the same options again and holds the first round's LP hull in greedy order;
    it must come from these ``costs`` and ``errors``.
    """
    if prepared is None:
        prepared = prepare_mckp(costs, errors)
    budget = _validated([[0.0]], [[0.0]], budget).budget
    raw, table, obj_tol = prepared.raw, prepared.table, prepared.obj_tol
    budget_tol = 4.0 * _EPS * prepared.n_groups * max(abs(budget), prepared.largest_cost)  # as _tolerances
    min_cost = float(table.cost[:, 0].sum())
    if min_cost > budget + budget_tol:
        raise InfeasibleBudgetError(min_cost, budget)
    search = _ExactSearch(prepared.n_groups, budget, budget_tol, obj_tol, max_candidates)
    try:
        search.run(table, prepared.first)
    except _SearchLimit:
        raise MCKPSearchLimitError([int(j) for j in search.best_choice], search.best_value,
                                   search.lower_bound, max_candidates) from None
    choice = [int(j) for j in search.best_choice]
    if float(raw.cost[np.arange(len(choice)), choice].sum()) > budget + budget_tol:  # pragma: no cover
        raise RuntimeError("internal error: solve_mckp produced a solution over budget")
    return choice


# ------------------------------------------------------------------------ PuLP path


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

    problem = _validated(costs, errors, budget)
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
        raise InfeasibleBudgetError(_minimum_cost(costs), budget)
    if not result.proven_optimal or result.choice is None:
        raise RuntimeError(f"{result.solver} stopped without a proven optimum (status {result.status})")
    return result.choice
