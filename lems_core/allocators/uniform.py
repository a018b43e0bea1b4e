"""Uniform: every layer keeps the same fraction of its break-even rank (docs/reference/methods.md §4.1)."""
from __future__ import annotations

from ..budget import check_ratio, rank_at_ratio
from ..profile import Profile
from .base import Allocation, finish, require_budget


def allocate_uniform(profile: Profile, ratio: float) -> Allocation:
    """Every layer keeps c = ratio: rank = int(ratio * eq) (docs/reference/methods.md §4.1).

    int(ratio*eq)(m+n) <= ratio*eq(m+n) <= ratio*mn, so the budget always holds,
    except when int(ratio*eq) = 0 for some layer and the rank-1 floor overshoots.
    """
    ratio = check_ratio(ratio)
    ranks = {l.name: rank_at_ratio(l, ratio) for l in profile.layers}
    require_budget(profile, ranks, ratio, "uniform", "rank int(ratio*eq) floored at 1")
    return finish(profile, Allocation("uniform", ratio, ranks))

