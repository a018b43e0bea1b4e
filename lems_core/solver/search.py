"""The exact MCKP search: bound, reduced-cost fixing, Pareto-state DP; and ``solve_mckp``."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .bounds import SuffixBounds, reduced_cost_excess, suffix_lagrangian_terms
from .hull import HullOrder, lp_relaxation, spend_leftover
from .prepared import FirstRound, PreparedMCKP, prepare_mckp
from .problem import EPS, InfeasibleBudgetError, MCKPSearchLimitError, validated
from .table import Table, cost_grid, round_down_to_cost_grid, shift_costs


class _SearchLimit(Exception):
    """The state DP would expand more candidates in one step than allowed."""


class ExactSearch:
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

    def offer(self, table: Table, columns: np.ndarray) -> None:
        value = self.fixed_err + float(table.at(columns)[1].sum())
        if value < self.best_value - self.obj_tol or self.best_value == np.inf:
            self.best_value = value
            self.best_choice = self.fixed_choice.copy()
            self.best_choice[table.gid] = table.idx[np.arange(columns.size), columns]

    def fix_single_option_rows(self, table: Table) -> Table:
        single = table.n == 1
        if single.any():
            self.fixed_choice[table.gid[single]] = table.idx[single, 0]
            self.fixed_cost += float(table.cost[single, 0].sum())
            self.fixed_err += float(table.err[single, 0].sum())
            table = table.rows(~single)
        return table

    def run(self, table: Table, first: "FirstRound | None" = None) -> None:
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

    def _bound_fix_dp(self, table: Table, first: "FirstRound | None") -> None:
        """Bound and fix until fixing stalls, then finish with the state DP.

        ``first`` (``first_round(table)``, made once per table) holds what the first
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
                    shifted, _ = shift_costs(table, 0.0)
                    grid, ordered = cost_grid(shifted), None
            if not table.n.size:
                break
            slack = self.budget - self.fixed_cost - float(table.cost[:, 0].sum())
            if slack < -self.budget_tol:
                return  # what is left cannot beat the incumbent within the budget
            slack = round_down_to_cost_grid(slack, grid, self.budget_tol)
            relax = lp_relaxation(shifted, slack, self.budget_tol, ordered)
            for choice in relax.roundings:
                # Polishing scans the whole table per upgrade: wait until fixing shrank it.
                if not first_round:
                    choice = spend_leftover(shifted, choice, slack, self.budget_tol)
                self.offer(table, choice)
            # After fixing against a target, the table holds every solution below it, not all of them.
            self.lower_bound = max(self.lower_bound, min(self.fixed_err + relax.bound, self.target))
            if self.probing:
                self.cap = min(self.cap, self.lower_bound + self.PROBE * (self.best_value - self.lower_bound))
            if self.lower_bound >= self.target:
                return  # the LP bound proves the incumbent optimal
            multiplier = relax.multiplier
            excess, lagrangian = reduced_cost_excess(shifted, slack, multiplier)
            if not np.isfinite(lagrangian):  # overflow from a subnormal cost step: lam = 0 is safe
                multiplier = 0.0
                excess, lagrangian = reduced_cost_excess(shifted, slack, multiplier)
            useful = excess < self.target - self.fixed_err - lagrangian
            if useful.sum() == table.n.sum():
                self._state_dp(shifted, slack, excess, multiplier)
                return
            table = table.keep(useful)
            first_round = False
        if self.fixed_cost <= self.budget + self.budget_tol and self.fixed_err < self.target:
            self.best_value = self.fixed_err
            self.best_choice = self.fixed_choice.copy()

    def _start(self, first: "FirstRound") -> tuple[Table, Table, int | None, HullOrder | None]:
        """Apply the cached single-option fixing; the first round's table, shifted table, grid, hull."""
        self.fixed_choice[first.fixed_gid] = first.fixed_idx
        self.fixed_cost, self.fixed_err = first.fixed_cost, first.fixed_err
        return first.table, first.shifted, first.grid, first.ordered

    def _state_dp(self, shifted: Table, slack: float, excess: np.ndarray, multiplier: float) -> None:
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
        suffixes = SuffixBounds(shifted)
        lagrange_terms = self.fixed_err + suffix_lagrangian_terms(shifted, multiplier) - multiplier * slack
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


def _coarse_rows_first(table: Table) -> np.ndarray:
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
    budget = validated([[0.0]], [[0.0]], budget).budget
    raw, table, obj_tol = prepared.raw, prepared.table, prepared.obj_tol
    budget_tol = 4.0 * EPS * prepared.n_groups * max(abs(budget), prepared.largest_cost)  # as tolerances
    min_cost = float(table.cost[:, 0].sum())
    if min_cost > budget + budget_tol:
        raise InfeasibleBudgetError(min_cost, budget)
    search = ExactSearch(prepared.n_groups, budget, budget_tol, obj_tol, max_candidates)
    try:
        search.run(table, prepared.first)
    except _SearchLimit:
        raise MCKPSearchLimitError([int(j) for j in search.best_choice], search.best_value,
                                   search.lower_bound, max_candidates) from None
    choice = [int(j) for j in search.best_choice]
    if float(raw.cost[np.arange(len(choice)), choice].sum()) > budget + budget_tol:  # pragma: no cover
        raise RuntimeError("internal error: solve_mckp produced a solution over budget")
    return choice
