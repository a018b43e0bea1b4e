"""ASVD's sensitivity-based truncation-rank search, STRS (docs/reference/methods.md §4.2).

The reference ranks the (layer, ratio) triples by single-layer search-set *perplexity*
([CODE] ``search/asvd.py`` with ``sensitivity_loss="ce"``; docs/reference/methods.md §9): the default
here, read from ``Profile.measured_nll`` (PPL = exp(mean NLL)). ``rank_by="kl"``
(registered as ``asvd_kl``) ranks by the single-layer KL of ``Profile.measured``
instead. A profile without the NLL table (built before it was recorded) falls back to
KL with an ``AsvdScoreWarning``; ``Allocation.info["rank_by"]`` says which was used.
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np

from ..budget import BUDGET_TOL, check_ratio, layer_param_cost, rank_at_ratio
from ..profile import Profile
from .base import Allocation, BudgetBelowMinimumError, finish

ASVD_POINTS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # docs/reference/methods.md §4.2, "asvd_default"
RANK_BY = ("ppl", "kl")  # single-layer search perplexity (reference) or KL to the dense model


class AsvdScoreWarning(UserWarning):
    """ASVD was asked to rank by perplexity but the profile has no NLL table: KL is used."""


def _points_of(source: dict, n_layers: int, where: str) -> tuple[dict[float, np.ndarray], list[float]]:
    """({ASVD point: per-layer values} found in ``source``, the points it lacks)."""
    table, missing = {}, []
    for point in ASVD_POINTS:
        match = [k for k in source if math.isclose(float(k), point, abs_tol=1e-9)]
        if not match:
            missing.append(point)
            continue
        values = np.asarray(source[match[0]], dtype=np.float64)
        if values.shape != (n_layers,):
            raise ValueError(f"asvd: sensitivity at ratio {point} in {where} must have one value per layer ({n_layers})")
        table[point] = values
    return table, missing


def _missing_error(where: str, missing: list[float], also: str = "") -> ValueError:
    return ValueError(
        f"asvd needs per-layer sensitivities measured at ratios {list(ASVD_POINTS)}; {where} lacks "
        f"{missing}{also}. Measure them (KL or PPL with only that layer compressed) or pass `sensitivity`."
    )


def _asvd_table(profile: Profile, sensitivity: dict[float, np.ndarray] | None,
                rank_by: str) -> tuple[dict[float, np.ndarray], str, str | None]:
    """(table {ratio: per-layer score, higher = more harmful}, the score used, why it fell back or None).

    ``sensitivity`` is used as given. Otherwise "ppl" reads exp(``profile.measured_nll``)
    and falls back to "kl" (``profile.measured``) with a warning when a point is missing;
    a clear error names the points neither table has.
    """
    n = len(profile.layers)
    if sensitivity is not None:
        table, missing = _points_of(sensitivity, n, "the given sensitivity table")
        if missing:
            raise _missing_error("the given sensitivity table", missing)
        return table, "given", None
    fallback, nll_missing = None, []
    if rank_by == "ppl":
        nll, nll_missing = _points_of(profile.measured_nll, n, "profile.measured_nll")
        if not nll_missing:
            return {c: np.exp(v) for c, v in nll.items()}, "ppl", None
        fallback = (f"the profile has no single-layer search NLL at {nll_missing} (profile.measured_nll; "
                    f"rebuild it with the ASVD points to rank by perplexity, as the reference); ranked by KL")
    table, missing = _points_of(profile.measured, n, "profile.measured")
    if missing:
        also = f", and profile.measured_nll (PPL) lacks {nll_missing}" if fallback else ""
        raise _missing_error("profile.measured (KL)", missing, also)
    if fallback:
        warnings.warn(f"asvd: {fallback}", AsvdScoreWarning, stacklevel=3)
    return table, "kl", fallback


def allocate_asvd(
    profile: Profile,
    ratio: float,
    sensitivity: dict[float, np.ndarray] | None = None,
    cost_model: str = "params",
    rank_by: str = "ppl",
) -> Allocation:
    """ASVD's sensitivity-based truncation-rank search (STRS, docs/reference/methods.md §4.2).

    All (layer, c, score) triples are sorted by score, most harmful first; a cut index
    is binary-searched so that every triple after it is allowed, each layer takes its
    smallest allowed c (dense if none), and the budget just holds. The largest such cut
    is kept, as in the LEMS re-implementation. ``cost_model="params"`` checks the budget
    with real costs int(c*eq)(m+n); "reference" uses the reference's c*m*n.

    ``rank_by``: "ppl" (reference) scores a triple by the single-layer search perplexity
    exp(NLL) of ``profile.measured_nll``, falling back to KL with an ``AsvdScoreWarning``
    when the profile has none; "kl" by the single-layer KL of ``profile.measured``
    (the allocation is then named ``asvd_kl``). ``sensitivity`` overrides both.
    ``info["rank_by"]`` records the score used ("ppl", "kl" or "given").
    """
    ratio = check_ratio(ratio)
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    method = "asvd" if rank_by == "ppl" else "asvd_kl"
    table, used, fallback = _asvd_table(profile, sensitivity, rank_by)
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
        raise BudgetBelowMinimumError(method, ratio, cost_ratio(0)[0], profile.total_params,
                                      f"every layer at ratio {ASVD_POINTS[0]}")
    _, chosen = cost_ratio(best)
    ranks = {l.name: (rank_at_ratio(l, chosen[i]) if i in chosen else None) for i, l in enumerate(profile.layers)}
    objective = float(sum(table[c][i] for i, c in chosen.items()))
    info = {"cut_index": best, "num_triples": len(triples), "layer_ratios": {profile.layers[i].name: c for i, c in chosen.items()},
            "cost_model": cost_model, "rank_by": used, "rank_by_requested": rank_by,
            **({"rank_by_fallback": fallback} if fallback else {})}
    alloc = Allocation(method, ratio, ranks, objective=objective, solve_seconds=time.perf_counter() - start, info=info)
    return finish(profile, alloc)


def allocate_asvd_kl(profile: Profile, ratio: float, sensitivity: dict[float, np.ndarray] | None = None,
                     cost_model: str = "params") -> Allocation:
    """``asvd_kl``: STRS ranked by single-layer KL (``rank_by="kl"``), the behaviour here
    before the reference's perplexity ranking became the default."""
    return allocate_asvd(profile, ratio, sensitivity, cost_model, rank_by="kl")


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
