"""MRCS: greedy rank reduction under an exponential parameter schedule (docs/reference/methods.md §4.4).

Every layer starts at rank eq. The reference ([CODE] ``search/memvit.py``) counts a
layer the search never touches at eq(m+n) and factorises it at rank eq (docs/reference/methods.md §9;
27 of 210 demo layers at 0.8); that is the default here, through the plan format's
break-even exception (``budget.ForcedFactorisedRank``). ``untouched="dense"``
(registered as ``mrcs_dense``) keeps those layers dense and counts them at m*n instead.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..budget import BUDGET_TOL, budget_of, check_ratio, dense_if_break_even, force_factorised
from ..derived import derived
from ..error_model import ErrorModelParams, block_biases
from ..profile import Profile
from .base import Allocation, BudgetBelowMinimumError, finish, require_budget


class _SpectralLoss:
    """Fraction of singular-value mass removed at rank r, for all layers at once (energy1/2)."""

    def __init__(self, profile: Profile, power: int):
        cums = [np.concatenate([[0.0], np.cumsum(np.asarray(profile.spectra[l.name], np.float64) ** power)])
                for l in profile.layers]
        self.offsets = np.cumsum([0] + [len(c) for c in cums[:-1]])
        self.lengths = np.array([len(c) - 1 for c in cums])
        self.flat = np.concatenate(cums)
        self.totals = np.array([c[-1] if c[-1] > 0 else 1.0 for c in cums])

    def __call__(self, idx: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        ranks = np.clip(ranks, 0, self.lengths[idx])
        return 1.0 - self.flat[self.offsets[idx] + ranks] / self.totals[idx]


UNTOUCHED = ("eq", "dense")  # what a layer the search never touches becomes: rank eq (reference) or dense


def _mrcs_lower_bounds(profile: Profile, lower_bound: float, multiple: int | None) -> np.ndarray:
    """floor(lb*eq) rounded up to the rank multiple, at most eq, at least 1 (reference rule)."""
    bounds = []
    for l in profile.layers:
        raw = int(math.floor(l.eq_rank * lower_bound))
        if multiple and multiple > 1:
            raw = min(int(math.ceil(raw / multiple) * multiple), l.eq_rank)
        bounds.append(max(1, raw))
    return np.array(bounds, dtype=np.int64)


def _project_down(ranks: np.ndarray, multiple: int | None) -> np.ndarray:
    if multiple and multiple > 1:
        ranks = (ranks // multiple) * multiple
    return np.maximum(ranks, 1)


def allocate_mrcs(
    profile: Profile,
    ratio: float,
    loss: str = "energy1",
    multiple: int | None = 8,
    lower_bound: float = 0.3,
    schedule_gamma: float = 80.0,
    max_iter: int = 500,
    params: ErrorModelParams | None = None,
    clamp_to_lower_bound: bool = False,
    untouched: str = "eq",
) -> Allocation:
    """MRCS greedy rank reduction with an exponential schedule (docs/reference/methods.md §4.4).

    Phase 1 (reference): at step t the schedule N_t = P* + (P_0 - P*) e^{-t/gamma_s} asks
    for Delta = N_{t-1} - N_t fewer parameters; every layer above its lower bound proposes
    r' = floor(r - Delta/(m+n)) rounded down to the multiple (skipped if below the bound),
    and the proposal with the smallest loss is applied. ``params`` adds the depth bias
    (score = loss x beta_b, the reference's memvit_plus ablation). With
    ``clamp_to_lower_bound`` a proposal below the bound is clamped to it instead of
    skipped, which keeps the schedule working when Delta is large against every layer
    (small models at low ratios, where the reference halts at step 1).

    Phase 2 (ours): the reference may stop above the budget (schedule saturated, max_iter,
    or every proposal skipped because Delta is large). Then the same greedy continues
    one rank-multiple step at a time (clamped at the lower bound) until the budget holds.

    ``untouched``: what the layers the search never touches become. "eq" (the reference,
    docs/reference/methods.md §9): factorised at rank eq, counted at eq(m+n) once the first step is
    taken (the schedule starts from the dense total, as in [CODE]). "dense": left dense
    and counted at m*n, which costs more for the same ranks (eq(m+n) <= mn) but keeps
    those layers exact; the allocation is then named ``mrcs_dense``.
    """
    ratio = check_ratio(ratio)
    if loss not in ("energy1", "energy2"):
        raise ValueError("loss must be 'energy1' or 'energy2'")
    if untouched not in UNTOUCHED:
        raise ValueError(f"untouched must be one of {UNTOUCHED}, got {untouched!r}")
    method = "mrcs" if untouched == "eq" else "mrcs_dense"
    layers = profile.layers
    lb = _mrcs_lower_bounds(profile, lower_bound, multiple)
    require_budget(profile, {l.name: int(b) for l, b in zip(layers, lb)}, ratio, method,
                    f"every layer at its lower bound {lower_bound:g}*eq")
    width = np.array([l.out_features + l.in_features for l in layers], dtype=np.float64)
    dense_cost = np.array([l.params for l in layers], dtype=np.float64)
    eq = np.array([l.eq_rank for l in layers], dtype=np.int64)
    bias = block_biases(profile, params) if params is not None else np.ones(len(layers))
    power = 1 if loss == "energy1" else 2
    spectral = derived(profile, ("mrcs_spectral_loss", power, id(profile.spectra)), lambda: _SpectralLoss(profile, power))
    idx_all = np.arange(len(layers))

    ranks = eq.copy()  # the reference starts at eq
    touched = np.zeros(len(layers), dtype=bool)
    untouched_cost = eq * width if untouched == "eq" else dense_cost
    target = budget_of(profile, ratio)
    p_total = float(dense_cost.sum())  # the schedule's P_0 in both modes ([CODE]: the dense total)

    def current() -> float:
        return float(np.where(touched, ranks * width, untouched_cost).sum())

    def apply(i: int, new_rank: int) -> None:
        ranks[i], touched[i] = new_rank, True

    start = time.perf_counter()
    steps, t, p = 0, 1, p_total
    while p > target and t <= max_iter:
        delta = _schedule(p_total, target, t - 1, schedule_gamma) - _schedule(p_total, target, t, schedule_gamma)
        if delta <= 0:
            break
        proposal = _project_down(np.floor(ranks - delta / width).astype(np.int64), multiple)
        if clamp_to_lower_bound:
            proposal = np.maximum(proposal, lb)
        valid = (ranks > lb) & (proposal < ranks) & (proposal >= lb)
        if not valid.any():
            break
        scores = np.where(valid, spectral(idx_all, proposal) * bias, np.inf)
        i = int(np.argmin(scores))
        apply(i, int(proposal[i]))
        p, t, steps = current(), t + 1, steps + 1
    phase1 = steps
    p = current()  # the real cost, also when no step was taken (the loop starts from the dense total)

    if p > target * (1 + BUDGET_TOL):  # phase 2: finish the budget one step at a time
        taken = completion_steps(ranks, touched, lb, width, untouched_cost, bias, spectral, multiple, p,
                                  target * (1 + BUDGET_TOL))
        if taken is None:  # cannot happen after the feasibility check above
            raise BudgetBelowMinimumError(method, ratio, p / p_total, profile.total_params, "lower bounds reached")
        layers_stepped, new_ranks = taken
        np.minimum.at(ranks, layers_stepped, new_ranks)  # a layer's steps only go down: its last one wins
        touched[layers_stepped] = True
        p, steps = current(), steps + len(layers_stepped)
    seconds = time.perf_counter() - start

    final = {l.name: _final_rank(l, int(ranks[i]), bool(touched[i]), untouched) for i, l in enumerate(layers)}
    info = {"loss": loss, "multiple": multiple, "lower_bound": lower_bound, "clamp_to_lower_bound": clamp_to_lower_bound,
            "untouched": untouched, "untouched_layers": int((~touched).sum()), "schedule_steps": phase1,
            "completion_steps": steps - phase1, "schedule_gamma": schedule_gamma, "max_iter": max_iter,
            "error_model": params.to_dict() if params is not None else None}
    return finish(profile, Allocation(method, ratio, final, solve_seconds=seconds, info=info))


def allocate_mrcs_dense(profile: Profile, ratio: float, multiple: int | None = 8,
                        params: ErrorModelParams | None = None, **options) -> Allocation:
    """``mrcs_dense``: MRCS with the layers its search never touches left dense
    (``untouched="dense"``), the behaviour here before the reference's rank-eq
    factorisation became the default. ``multiple`` and ``params`` are named so that
    ``allocate`` passes them (constraints' rank multiple, the depth bias)."""
    return allocate_mrcs(profile, ratio, multiple=multiple, params=params, untouched="dense", **options)


def _final_rank(layer, rank: int, touched: bool, untouched: str) -> int | None:
    """A touched layer's rank (always below eq); an untouched one at eq, forced factorised
    (the reference) or dense."""
    if touched:
        return dense_if_break_even(layer, rank)
    return force_factorised(rank) if untouched == "eq" and rank >= 1 else None


def completion_steps(ranks: np.ndarray, touched: np.ndarray, lb: np.ndarray, width: np.ndarray,
                      untouched_cost: np.ndarray, bias: np.ndarray, spectral: _SpectralLoss, multiple: int | None,
                      current: float, limit: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Phase 2 of MRCS, all at once: the (layer, new rank) steps until the cost is <= ``limit``.

    The one-at-a-time greedy applies, at every step, the proposal (next multiple below,
    clamped at the lower bound) with the smallest loss x bias, the first layer on ties.
    A layer's proposal changes only when it is stepped, and its loss never falls as its
    rank falls, so that greedy takes the steps of all layers merged in order of
    (score, layer): every layer's chain of steps is listed, sorted stably by that key,
    and the shortest prefix that meets the budget is returned as (layers, new ranks) in
    step order (None when even all steps do not). Same result as stepping, without a
    Python loop per step.
    """
    layer_ids, new_ranks, savings = _step_chains(ranks, touched, lb, width, untouched_cost, multiple)
    if not layer_ids.size:
        return None if current > limit else (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    scores = spectral(layer_ids, new_ranks) * bias[layer_ids]
    order = np.lexsort((layer_ids, scores))  # by score, then layer; each layer's chain keeps its order
    remaining = current - np.cumsum(savings[order])
    enough = np.nonzero(remaining <= limit)[0]
    if not enough.size:
        return None
    chosen = order[: int(enough[0]) + 1]
    return layer_ids[chosen], new_ranks[chosen]


def _step_chains(ranks: np.ndarray, touched: np.ndarray, lb: np.ndarray, width: np.ndarray,
                 untouched_cost: np.ndarray, multiple: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every layer's chain of phase-2 steps, back to back: (layer, new rank, params saved).

    A layer above its lower bound steps to the multiple below its rank, then one multiple
    lower at a time, the last step clamped at the bound (first, first - step, ..., > lb,
    then lb); the first step of an untouched layer saves from its untouched cost. Built
    for all layers at once (np.repeat), not one small array per layer.
    """
    step = multiple if multiple and multiple > 1 else 1
    active = np.flatnonzero(ranks > lb)
    rank, low = ranks[active].astype(np.int64), lb[active].astype(np.int64)
    first = np.maximum(((rank - 1) // step) * step, low)
    middle = -(-(first - low) // step)  # len(np.arange(first, low, -step)): the steps above the bound
    lengths = middle + 1
    layer_ids = np.repeat(active, lengths).astype(np.int64)
    pos = np.arange(layer_ids.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    new_ranks = np.where(pos == np.repeat(middle, lengths), np.repeat(low, lengths), np.repeat(first, lengths) - pos * step)
    before = np.where(pos == 0, np.repeat(rank, lengths), np.roll(new_ranks, 1)) * width[layer_ids]
    untouched_first = (pos == 0) & ~touched[layer_ids]
    before[untouched_first] = untouched_cost[layer_ids[untouched_first]]
    return layer_ids, new_ranks, before - new_ranks * width[layer_ids]


def next_multiple_below(ranks: np.ndarray, multiple: int | None) -> np.ndarray:
    """The largest multiple of ``multiple`` strictly below each rank (rank - 1 without one)."""
    step = multiple if multiple and multiple > 1 else 1
    return ((ranks - 1) // step) * step


def _schedule(p0: float, target: float, t: int, gamma: float) -> float:
    """N_t = P* + (P_0 - P*) exp(-t/gamma) (MRCS Eq. 9)."""
    return target + (p0 - target) * math.exp(-t / gamma)

