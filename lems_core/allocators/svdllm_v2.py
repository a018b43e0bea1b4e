"""SVD-LLM V2's heterogeneous allocation by matrix type (docs/reference/methods.md §4.3)."""
from __future__ import annotations

import math

import numpy as np

from ..budget import check_ratio, rank_at_ratio, repair_budget
from ..model import LayerInfo
from ..profile import Profile
from .base import Allocation, finish, require_budget


def _tail_loss(sigma: np.ndarray, rank: int, power: int) -> float:
    """(sum_{i>r} sigma_i^p)^(1/p): p=1 is the reference's loss, p=2 the paper's ||C - C'||_F."""
    tail = np.asarray(sigma[rank:], dtype=np.float64)
    return float(np.sum(tail ** power) ** (1.0 / power))


def _svdllm_scores(losses: np.ndarray, guard: str) -> tuple[np.ndarray | None, str]:
    """1/log(L) scores of one group, with the handling of L <= 1 (where log(L) <= 0).

    1/log is only a sensible importance for L > 1 (decreasing in L); at L < 1 it flips
    sign and at L = 1 it diverges. The loss scale is arbitrary (whitening units), so:
    - "rescale" (default): if some L <= 1, multiply the group's losses by e/min(L) so the
      smallest maps to e; the order of scores is preserved and all are positive.
    - "uniform": the group falls back to the uniform ratio.
    - "reference": the reference's rule, 1/log(L + 1e-12), uniform only when the score sum
      is non-finite or <= 0 (mixed signs then give keep ratios outside [0, 1]).
    Returns (scores or None for "use uniform", what was done).
    """
    losses = np.asarray(losses, dtype=np.float64)
    if guard == "reference":
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = 1.0 / np.log(losses + 1e-12)
        total = scores.sum()
        return (scores, "reference") if np.isfinite(total) and total > 0 else (None, "uniform_fallback")
    if guard not in ("rescale", "uniform"):
        raise ValueError(f"guard must be 'rescale', 'uniform' or 'reference', got {guard!r}")
    if np.all(losses > 1.0):
        return 1.0 / np.log(losses), "as_paper"
    if guard == "uniform" or not np.all(losses > 0):
        return None, "uniform_fallback"
    return 1.0 / np.log(losses * (math.e / losses.min())), "rescaled"


def svdllm_v2_keep_ratios(profile: Profile, ratio: float, power: int = 1, guard: str = "rescale") -> tuple[dict[str, float], dict[str, str]]:
    """Per-layer keep ratios of SVD-LLM V2 before rounding (docs/reference/methods.md §4.3).

    Per matrix type G: L_i = loss at the uniform rank int(ratio*eq), score_i = 1/log L_i,
    remove_i = |G| (1 - ratio) score_i / sum_G score, keep_i = 1 - remove_i.
    The group mean of keep_i is exactly ``ratio``. Returns (keep ratios, per-group handling).
    """
    groups: dict[str, list[LayerInfo]] = {}
    for l in profile.layers:
        groups.setdefault(l.kind, []).append(l)
    keep, handling = {}, {}
    for kind, members in groups.items():
        losses = np.array([_tail_loss(profile.spectra[l.name], int(ratio * l.eq_rank), power) for l in members])
        scores, handling[kind] = _svdllm_scores(losses, guard)
        if scores is None:
            keep.update({l.name: ratio for l in members})
            continue
        remove = len(members) * (1.0 - ratio) * scores / scores.sum()
        keep.update({l.name: float(1.0 - r) for l, r in zip(members, remove)})
    return keep, handling


def allocate_svdllm_v2(profile: Profile, ratio: float, power: int = 1, guard: str = "rescale") -> Allocation:
    """SVD-LLM V2 heterogeneous allocation by matrix type (docs/reference/methods.md §4.3).

    ``power=1`` is the reference's sum of singular values beyond the uniform rank;
    ``power=2`` the paper's Frobenius loss. Ranks are int(keep*eq) clipped to
    [1, min(m, n)] (keep >= 1 or rank >= eq: dense); if the clipping at rank 1 makes
    the total overshoot the budget, ``repair_budget`` trims ranks deterministically.
    """
    ratio = check_ratio(ratio)
    if power not in (1, 2):
        raise ValueError("power must be 1 (reference) or 2 (paper)")
    keep, handling = svdllm_v2_keep_ratios(profile, ratio, power, guard)
    ranks = {l.name: rank_at_ratio(l, keep[l.name]) for l in profile.layers}
    require_budget(profile, {l.name: 1 for l in profile.layers}, ratio, "svdllm_v2", "rank 1 everywhere")
    ranks, trimmed = repair_budget(profile, ranks, ratio)
    info = {"keep_ratios": keep, "group_handling": handling, "power": power, "guard": guard, "repair_steps": trimmed}
    return finish(profile, Allocation("svdllm_v2", ratio, ranks, info=info))

