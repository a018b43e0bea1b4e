"""ARS plans: trained allocations as plans, stored in and read from the diskcache index
and the committed demo plans under cache/demo/ars/."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from ...cache import DEMO_DIR, index, key_of
from ...plan import PlanError, RankPlan
from ...profile import Profile
from ..base import Allocation
from .config import METHOD, RULES, ARSConfig

log = logging.getLogger(__name__)

COMMITTED_DIR = DEMO_DIR / "ars"
CURVE_POINTS = 200  # loss-curve points kept in a plan's meta (the Allocation keeps every step)


def _ratio_key(ratio: float) -> float:
    return round(float(ratio), 4)


def cache_key(profile: Profile, ratio: float, config: ARSConfig) -> str:
    """Index key of one trained result: profile identity, decomposition, ratio, config."""
    return "ars:" + key_of(profile.key, profile.decomposition, _ratio_key(ratio), config.to_dict())


def latest_key(profile: Profile, ratio: float, rule: str = "reference") -> str:
    """Index key of the most recent result for (profile, ratio) under a budget rule (``RULES``),
    whatever its other settings. The legacy rule keeps the key of the runs made before rules
    existed; a plan read from it is still checked for its rule (``_plan_rule``)."""
    parts = (profile.key, profile.decomposition, _ratio_key(ratio))
    return "ars-latest:" + key_of(*parts) if rule == "legacy" else f"ars-latest-{rule}:" + key_of(*parts)


def committed_plan_path(profile: Profile, ratio: float) -> Path:
    """cache/demo/ars/<fingerprint>-<decomposition>-<ratio>.json (written by studies/ars_demo.py)."""
    return COMMITTED_DIR / f"{profile.fingerprint}-{profile.decomposition}-{_ratio_key(ratio):g}.json"


def allocation_to_plan(profile: Profile, alloc: Allocation) -> RankPlan:
    """The plan of a trained allocation; meta carries the calibration (for evaluation) and ARS info."""
    info = dict(alloc.info)
    curve = info.pop("loss_curve", [])
    info["loss_curve"] = _thin(curve, CURVE_POINTS)
    info["profile_key"] = profile.key
    meta = {"calibration": profile.calibration, "ars": info}
    return alloc.to_plan(profile, meta=meta)


def _thin(curve: list[dict], points: int) -> list[dict]:
    """At most ``points`` evenly spaced records (first and last kept), values rounded."""
    if len(curve) > points:
        idx = np.unique(np.linspace(0, len(curve) - 1, points).round().astype(int))
        curve = [dict(curve[i], step=int(i)) for i in idx]
    return [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in curve]


def allocation_from_plan(plan: RankPlan, ratio: float) -> Allocation:
    info = dict(plan.meta.get("ars") or {})
    info["plan_created"] = plan.created
    return Allocation(METHOD, ratio, plan.ranks(), solve_seconds=float(plan.meta.get("solve_seconds") or 0.0),
                      info=info)


def store_plan(profile: Profile, ratio: float, config: ARSConfig, plan: RankPlan, cache_dir: Path | None) -> None:
    """Index ``plan`` under its exact config key and as the latest plan of its budget rule."""
    store = index(cache_dir)
    doc = plan.to_dict()
    store[cache_key(profile, ratio, config)] = doc
    store[latest_key(profile, ratio, config.rule_name)] = doc


def _plan_from_doc(doc: dict, profile: Profile) -> RankPlan:
    return RankPlan.from_json(json.dumps(doc), layers=profile.layers, fingerprint=profile.fingerprint)


def _plan_rule(plan: RankPlan) -> str:
    """The budget rule a plan was trained under (a plan without config: legacy)."""
    return ARSConfig.from_dict((plan.meta.get("ars") or {}).get("config") or {}).rule_name


def _matches(plan: RankPlan, profile: Profile, ratio: float, config: ARSConfig | None, rule: str) -> bool:
    """Whether ``plan`` is this profile's ARS plan at ``ratio``, trained with ``config``
    (or, without one, under ``rule``)."""
    ars = plan.meta.get("ars") or {}
    return (plan.method == METHOD and plan.decomposition == profile.decomposition
            and math.isclose(plan.budget, _ratio_key(ratio), abs_tol=1e-6)
            and ars.get("profile_key") == profile.key
            and (ars.get("config") == config.to_dict() if config else _plan_rule(plan) == rule))


def _indexed_plan(profile: Profile, ratio: float, config: ARSConfig | None, rule: str,
                  cache_dir: Path | None) -> RankPlan | None:
    """The index's plan for ``config`` (exact key) or the latest one under ``rule``; None if absent or invalid."""
    doc = index(cache_dir).get(cache_key(profile, ratio, config) if config else latest_key(profile, ratio, rule))
    if doc is None:
        return None
    try:
        plan = _plan_from_doc(doc, profile)
    except PlanError as exc:
        log.warning("ignoring a cached ARS plan that does not validate: %s", exc)
        return None
    return plan if config or _plan_rule(plan) == rule else None


def cached_ars_plan(profile: Profile, ratio: float, config: ARSConfig | None = None,
                    cache_dir: Path | None = None, rule: str = "reference") -> RankPlan | None:
    """A trained ARS plan for (profile, ratio): from the index, else the committed demo plan, else None.

    With ``config`` only a plan trained with exactly that config is returned; without,
    the most recent one trained under budget rule ``rule`` ("reference" or "legacy",
    see ``RULES``), so plans of the earlier rule are never served as the default.
    Plans are validated against the profile's layers and model.
    """
    if rule not in RULES:
        raise ValueError(f"unknown ARS rule {rule!r}: choose from {sorted(RULES)}")
    plan = _indexed_plan(profile, ratio, config, rule, cache_dir)
    if plan is not None:
        return plan
    path = committed_plan_path(profile, ratio)
    if path.is_file():
        try:
            plan = RankPlan.load(path, layers=profile.layers, fingerprint=profile.fingerprint)
        except PlanError as exc:
            log.warning("ignoring committed ARS plan %s: %s", path, exc)
            return None
        if _matches(plan, profile, ratio, config, rule):
            return plan
    return None
