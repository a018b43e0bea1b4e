"""LP relaxation of the MCKP over the lower convex hulls of the rows (Sinha & Zoltners 1979).

``hull_order`` builds the budget-independent part (hulls, their segments in greedy
order); ``lp_relaxation`` reads the LP bound, the optimal multiplier and rounded integer
solutions off it for one budget; ``spend_leftover`` polishes an integer solution.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .table import Table, compact


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


def _lower_hull(table: Table) -> Table:
    """Lower convex hull of each row's Pareto points; its `idx` is the column in `table`.

    All points found above a chord are removed at once and the rows that changed are
    tested again, until every row is convex. A row that only lost one block of points
    right before its last point needs no second test: the point before the block was
    tested against the chord to the last point, everything else kept its neighbours.
    """
    columns = np.broadcast_to(np.arange(table.cost.shape[1]), table.cost.shape)
    hull = Table(table.gid, table.cost, table.err, columns, table.n)
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
        (cost, err, col), n = compact(alive, (cost[changed], err[changed], col[changed]))
        if work.size == hull.n.size:  # every row changed: the compacted arrays are the hull
            hull, copied = Table(hull.gid, cost, err, col, n.copy()), True
        else:
            if not copied:
                hull = Table(hull.gid, hull.cost.copy(), hull.err.copy(), hull.idx.copy(), hull.n.copy())
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


def _hull_segments(hull: Table) -> _Segments:
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


def _greedy_fill(segments: _Segments, limit: float, ordered: "HullOrder | None" = None) -> _GreedyFill:
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
class HullOrder:
    """Budget-independent LP data of one shifted table: hull, segments, greedy order.

    ``filled[k]`` is the cost of the first k + 1 segments in greedy order, so the LP
    for any budget is a binary search (``_greedy_fill``).
    """

    hull: Table
    segments: _Segments
    order: np.ndarray
    filled: np.ndarray


def hull_order(shifted: Table) -> HullOrder:
    """The lower hulls of ``shifted``'s rows, their segments, and all segments in greedy order."""
    hull = _lower_hull(shifted)
    segments = _hull_segments(hull)
    order = _greedy_order(segments, np.arange(segments.row.size))
    return HullOrder(hull, segments, order, np.cumsum(segments.step[order]))


@dataclass
class _Relaxation:
    """LP optimum of a cost-shifted table and integer solutions read off it."""

    bound: float  # LP value: a lower bound on every integer solution
    multiplier: float  # optimal Lagrange multiplier of the budget row
    roundings: list[np.ndarray]  # column per row: LP rounded down, and (if possible) up


def lp_relaxation(shifted: Table, slack: float, budget_tol: float,
                  ordered: HullOrder | None = None) -> _Relaxation:
    """Greedy LP solution of the MCKP (Sinha & Zoltners 1979) on a Pareto table.

    Costs are shifted so that column 0 of every row costs 0 and `slack` is the budget
    left after paying column 0 everywhere. Filling lower-hull segments in order of
    falling efficiency solves the LP; the first segment that does not fit (the split)
    gives the optimal multiplier and the fractional part of the bound. Two integer
    solutions come with it: without the split segment, and with it while the least
    efficient taken segments of other rows are given back until the budget holds.
    ``ordered`` (``hull_order(shifted)``, made once) skips the hull and the sort.
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


def _hull_choice(hull: Table, segments: _Segments, taken: np.ndarray) -> np.ndarray:
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


def spend_leftover(table: Table, choice: np.ndarray, budget: float, budget_tol: float,
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
