"""ASVD's sensitivity-based truncation-rank search, STRS (methods.md §4.2)."""
from __future__ import annotations

import math
import time

import numpy as np

from ..budget import BUDGET_TOL, check_ratio, layer_param_cost, rank_at_ratio
from ..profile import Profile
from .base import Allocation, BudgetBelowMinimumError, finish

ASVD_POINTS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # methods.md §4.2, "asvd_default"


def _asvd_table(profile: Profile, sensitivity: dict[float, np.ndarray] | None) -> dict[float, np.ndarray]:
    """The sensitivity table {ratio: per-layer score} at the ASVD points, from
    ``sensitivity`` or else ``profile.measured``; a clear error names missing points."""
    source = sensitivity if sensitivity is not None else profile.measured
    where = "the given sensitivity table" if sensitivity is not None else "profile.measured"
    table, missing = {}, []
    for point in ASVD_POINTS:
        match = [k for k in source if math.isclose(float(k), point, abs_tol=1e-9)]
        if not match:
            missing.append(point)
            continue
        values = np.asarray(source[match[0]], dtype=np.float64)
        if values.shape != (len(profile.layers),):
            raise ValueError(f"asvd: sensitivity at ratio {point} must have one value per layer ({len(profile.layers)})")
        table[point] = values
    if missing:
        raise ValueError(
            f"asvd needs per-layer sensitivities measured at ratios {list(ASVD_POINTS)}; {where} lacks "
            f"{missing}. Measure them (KL or PPL with only that layer compressed) or pass `sensitivity`."
        )
    return table


def allocate_asvd(
    profile: Profile,
    ratio: float,
    sensitivity: dict[float, np.ndarray] | None = None,
    cost_model: str = "params",
) -> Allocation:
    """ASVD's sensitivity-based truncation-rank search (STRS, methods.md §4.2).

    All (layer, c, score) triples are sorted by score, most harmful first; a cut index
    is binary-searched so that every triple after it is allowed, each layer takes its
    smallest allowed c (dense if none), and the budget just holds. The largest such cut
    is kept, as in the LEMS re-implementation. ``cost_model="params"`` checks the budget
    with real costs int(c*eq)(m+n); "reference" uses the reference's c*m*n.
    """
    ratio = check_ratio(ratio)
    table = _asvd_table(profile, sensitivity)
    triples = [(i, c, float(table[c][i])) for i in range(len(profile.layers)) for c in ASVD_POINTS]
    triples.sort(key=lambda x: -x[2])  # stable: ties keep layer order
    start = time.perf_counter()

    def cost_ratio(cut: int) -> tuple[float, dict[int, float]]:
        chosen: dict[int, float] = {}
        for i, c, _ in triples[cut:]:
            chosen[i] = min(chosen.get(i, 1.0), c)
        return _asvd_cost(profile, chosen, cost_model), chosen

    low, high, best = 0, len(triples) - 1, None
    while low <= high:
        mid = (low + high) // 2
        if cost_ratio(mid)[0] <= ratio * (1 + BUDGET_TOL):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    if best is None:
        raise BudgetBelowMinimumError("asvd", ratio, cost_ratio(0)[0], profile.total_params,
                                      f"every layer at ratio {ASVD_POINTS[0]}")
    _, chosen = cost_ratio(best)
    ranks = {l.name: (rank_at_ratio(l, chosen[i]) if i in chosen else None) for i, l in enumerate(profile.layers)}
    objective = float(sum(table[c][i] for i, c in chosen.items()))
    info = {"cut_index": best, "num_triples": len(triples), "layer_ratios": {profile.layers[i].name: c for i, c in chosen.items()},
            "cost_model": cost_model}
    alloc = Allocation("asvd", ratio, ranks, objective=objective, solve_seconds=time.perf_counter() - start, info=info)
    return finish(profile, alloc)


def _asvd_cost(profile: Profile, chosen: dict[int, float], cost_model: str) -> float:
    total = 0.0
    for i, l in enumerate(profile.layers):
        if i not in chosen:
            total += l.params
        elif cost_model == "reference":
            total += chosen[i] * l.params
        elif cost_model == "params":
            total += layer_param_cost(l.out_features, l.in_features, rank_at_ratio(l, chosen[i]))
        else:
            raise ValueError(f"cost_model must be 'params' or 'reference', got {cost_model!r}")
    return total / profile.total_params

