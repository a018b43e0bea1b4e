"""ARS masks -> ranks: mask sums rounded to multiples (docs/reference/methods.md §4.6 step 6), then deterministically
repaired to the budget and, optionally, the budget left unused spent again."""
from __future__ import annotations

import heapq

import numpy as np

from ...budget import layer_param_cost, params_of, realised_ratio
from ...model import LayerInfo
from ...profile import Profile
from ..base import Allocation, BudgetBelowMinimumError
from .config import METHOD, ARSConfig
from .losses import BudgetTarget, penalty_ratio


def round_rank(layer: LayerInfo, kept: int, multiple: int) -> int | None:
    """Mask sum -> rank: nearest multiple, at least one multiple (or 1), dense at break-even."""
    upper = min(layer.out_features, layer.in_features)
    step = multiple if multiple and multiple <= upper else 1
    rank = min(max(step * int(round(kept / step)), step), upper)
    return None if rank >= layer.eq_rank else rank


def _energy_cumsums(profile: Profile) -> list[np.ndarray]:
    """Per layer: [0, cumulative s_i^2 / sum s^2] (kept energy fraction by rank)."""
    out = []
    for l in profile.layers:
        e = np.asarray(profile.spectra[l.name], np.float64) ** 2
        out.append(np.concatenate([[0.0], np.cumsum(e) / max(e.sum(), 1e-300)]))
    return out


def _next_cut(layer: LayerInfo, rank: int | None, cum: np.ndarray, multiple: int) -> tuple[float, int] | None:
    """(energy lost per parameter saved, new rank) of the next cut of one layer, or None at the minimum.

    A dense layer goes to the largest multiple below its break-even rank; a factorised
    one loses ``multiple`` ranks.
    """
    upper = min(layer.out_features, layer.in_features)
    step = multiple if multiple and multiple <= upper else 1
    if rank is None:
        new = ((layer.eq_rank - 1) // step) * step
    else:
        new = rank - step
    if new < step:
        return None
    saved = layer_param_cost(layer.out_features, layer.in_features, rank) - layer.rank_params(new)
    kept_now = 1.0 if rank is None else cum[rank]
    lost = kept_now - cum[new]
    return lost / max(saved, 1), new


def repair_to_budget(profile: Profile, ranks: dict, ratio: float, multiple: int) -> tuple[dict, int]:
    """Cut ranks until params_of <= ratio * total; returns (ranks, number of cuts).

    Deterministic greedy: always cut the layer whose next cut (``multiple`` ranks, or
    dense -> factorised) loses the least normalised spectral energy (sum s_i^2 / sum s^2
    of the profile's spectrum) per parameter saved; ties go to the earlier layer.
    Raises BudgetBelowMinimumError when every layer is at its minimum rank.
    """
    ranks = dict(ranks)
    budget = ratio * profile.total_params
    excess = params_of(profile, ranks) - budget
    cums = _energy_cumsums(profile)
    heap = []
    for i, l in enumerate(profile.layers):
        cut = _next_cut(l, ranks[l.name], cums[i], multiple)
        if cut:
            heapq.heappush(heap, (cut[0], i, cut[1]))
    cuts = 0
    while excess > budget * 1e-12:
        if not heap:
            raise BudgetBelowMinimumError(METHOD, ratio, realised_ratio(profile, ranks), profile.total_params,
                                          "every layer is at its minimum rank")
        _, i, new = heapq.heappop(heap)
        l = profile.layers[i]
        excess -= layer_param_cost(l.out_features, l.in_features, ranks[l.name]) - l.rank_params(new)
        ranks[l.name] = new
        cuts += 1
        cut = _next_cut(l, new, cums[i], multiple)
        if cut:
            heapq.heappush(heap, (cut[0], i, cut[1]))
    return ranks, cuts


def _next_add(layer: LayerInfo, rank: int | None, cum: np.ndarray, multiple: int) -> tuple[float, int | None, int] | None:
    """(energy gained per parameter, new rank or None = dense, extra params) of the next
    ``multiple`` ranks for a layer, or None when it is already dense."""
    if rank is None:
        return None
    upper = min(layer.out_features, layer.in_features)
    step = multiple if multiple and multiple <= upper else 1
    new = rank + step
    new = None if new >= layer.eq_rank else new
    extra = layer_param_cost(layer.out_features, layer.in_features, new) - layer.rank_params(rank)
    gained = (1.0 if new is None else cum[new]) - cum[rank]
    return gained / max(extra, 1), new, extra


def fill_to_budget(profile: Profile, ranks: dict, ratio: float, multiple: int) -> tuple[dict, int]:
    """Spend budget left over: add ``multiple`` ranks (or go dense) where the most normalised
    energy is gained per parameter, as long as the budget still holds; returns (ranks, adds).

    ARS's budget penalty is one-sided (docs/reference/methods.md §4.6 step 4), so a run can end under its budget;
    plans compared at one budget should use it. Deterministic (ties: earlier layer); the
    mirror image of ``repair_to_budget``.
    """
    ranks = dict(ranks)
    room = ratio * profile.total_params - params_of(profile, ranks)
    cums = _energy_cumsums(profile)
    heap = []
    for i, l in enumerate(profile.layers):
        add = _next_add(l, ranks[l.name], cums[i], multiple)
        if add:
            heapq.heappush(heap, (-add[0], i, add[1], add[2]))
    adds = 0
    while heap:
        _, i, new, extra = heapq.heappop(heap)
        if extra > room:
            continue  # does not fit; a smaller step elsewhere may
        l = profile.layers[i]
        ranks[l.name], room, adds = new, room - extra, adds + 1
        add = _next_add(l, new, cums[i], multiple)
        if add:
            heapq.heappush(heap, (-add[0], i, add[1], add[2]))
    return ranks, adds


def allocation_from_masks(profile: Profile, ratio: float, masks: list[np.ndarray], config: ARSConfig,
                          info: dict | None = None, budget: BudgetTarget | None = None) -> Allocation:
    """Ranks = mask sums rounded to multiples (docs/reference/methods.md §4.6 step 6), repaired to the budget
    (and, with ``config.fill_budget``, the slack spent); the raw learned ranks and
    ratio stay in ``info`` so the effect of rounding and repair is visible. With the
    run's ``budget``, info also has both accountings: the compressible budget and
    the whole-model target the training used, and the realised whole-model fraction."""
    learned = {l.name: int(m.sum()) for l, m in zip(profile.layers, masks)}
    rounded = {l.name: round_rank(l, learned[l.name], config.rank_multiple) for l in profile.layers}
    ranks, cuts = repair_to_budget(profile, rounded, ratio, config.rank_multiple)
    adds = 0
    if config.fill_budget:
        ranks, adds = fill_to_budget(profile, ranks, ratio, config.rank_multiple)
    info = dict(info or {})
    info.update({
        "learned_ranks": learned,
        "learned_ratio": _ratio_of_sums(profile, learned),
        "rounded_ratio": realised_ratio(profile, rounded),
        "repair_cuts": cuts,
        "fill_adds": adds,
        "params_kept": params_of(profile, ranks),
        "params_total": profile.total_params,
        "realised_ratio": realised_ratio(profile, ranks),
        "dense_layers": sum(r is None for r in ranks.values()),
        "rule": config.rule_name,
        "penalty_p": penalty_ratio(config, ratio),
        "config": config.to_dict(),
    })
    if budget is not None:
        info.update(budget.to_info())
        info["realised_model_ratio"] = budget.model_ratio(params_of(profile, ranks))
    return Allocation(METHOD, ratio, ranks, info=info)


def _ratio_of_sums(profile: Profile, kept: dict[str, int]) -> float:
    """Kept fraction of the raw mask sums (capped at dense), before rounding and repair."""
    total = sum(min(l.rank_params(kept[l.name]), l.params) for l in profile.layers)
    return total / profile.total_params
