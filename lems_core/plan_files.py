"""Plan files and lists: safe file names for saved plans, budget lists typed by a user, and
de-duplicated plan choices. Small helpers the app and the CLI share around `plan.RankPlan`."""
from __future__ import annotations

import re
from typing import Mapping

from .budget import MAX_RATIO_CHARS


def plan_file_name(method: str, ratio: float, fingerprint: str, content: str = "") -> str:
    """A readable, filesystem-safe name such as ``lems_r0.800_ab12cd34_0f1e2d3c.json``.

    ``content`` (``RankPlan.content_hash``) makes plans that share method, budget and
    model but differ in their ranks land in different files, so saving never
    overwrites another plan; saving the same plan twice rewrites the same file.
    """
    stem = f"{method}_r{ratio:.3f}_{fingerprint[:8]}" + (f"_{content}" if content else "")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem)
    return f"{safe}.json"


def parse_budgets(text: str) -> list[float]:
    """"0.6, 0.7 0.8" -> [0.6, 0.7, 0.8] (kept fractions in (0, 1], sorted, unique); ValueError names a bad entry."""
    budgets = set()
    for token in re.split(r"[,\s;]+", text.strip()):
        if not token:
            continue
        if len(token) > MAX_RATIO_CHARS:  # a float would round 0. and 400 nines to 1 without a word
            raise ValueError(f"budget {token[:20]!r}… ({len(token)} characters) is too long to be a number")
        try:
            value = float(token)
        except ValueError:
            raise ValueError(f"{token!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise ValueError(f"budget {token} is not a kept fraction in (0, 1]")
        budgets.add(round(value, 6))
    return sorted(budgets)


def unique_plans(plans: Mapping[str, object]) -> dict[str, object]:
    """Drop plans that repeat an earlier one (same method, decomposition and ranks); keeps the first label.

    Items that are not plans yet (``pipeline.PlanRequest``: solved later, on the model)
    have no ranks to compare: equal requests are kept once.
    """
    seen, kept = set(), {}
    for label, plan in plans.items():
        if not hasattr(plan, "ranks"):
            identity = plan
        else:
            identity = (plan.method, plan.decomposition, tuple(sorted(plan.ranks().items(), key=lambda kv: kv[0])))
        if identity not in seen:
            seen.add(identity)
            kept[label] = plan
    return kept
