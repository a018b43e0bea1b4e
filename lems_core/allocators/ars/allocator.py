"""ARS entry points: train a profile's plan (``train_ars_on``) and serve trained plans
(``allocate_ars``, the ``ars`` allocator, which never trains)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ...decompositions import Factorization
from ...model import LoadedModel
from ...profile import Profile
from ...run import DEFAULT_RUN, Run
from ..base import Allocation
from .config import PRESETS, RULES, ARSConfig
from .losses import budget_target
from .plans import allocation_from_plan, allocation_to_plan, cached_ars_plan, store_plan
from .ranks import allocation_from_masks
from .training import train_masks


def spectrum_mismatch(profile: Profile, factors: dict[str, Factorization]) -> float:
    """Largest relative difference between the profile's spectra and the factors' (should be ~0)."""
    worst = 0.0
    for l in profile.layers:
        a, b = np.asarray(profile.spectra[l.name]), np.asarray(factors[l.name].sigma)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30)))
    return worst


def train_ars_on(
    loaded: LoadedModel,
    profile: Profile,
    ratio: float,
    windows: torch.Tensor,
    factors: dict[str, Factorization],
    config: ARSConfig | None = None,
    *,
    factor_seconds: float = 0.0,
    run: Run = DEFAULT_RUN,
) -> Allocation:
    """Train ARS for ``profile`` at kept fraction ``ratio`` on ``windows`` with the full ``factors``.

    Runs on the model's device and stores the plan in the cache. ``factors`` must be the
    profile's own full factorisations and ``windows`` its calibration windows (they are
    not part of the cache key); ``pipeline.train_ars`` finds both for a profile and
    returns a cached result without training.
    """
    config = config or PRESETS["reference"]
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio is the kept fraction and must lie in (0, 1], got {ratio}")
    if loaded.fingerprint != profile.fingerprint:
        raise ValueError(f"profile is for model {profile.fingerprint}, loaded model is {loaded.fingerprint}")
    started = time.perf_counter()
    budget = budget_target(loaded.model, profile.layers, ratio)
    masks, curve = train_masks(loaded.model, profile.layers, factors, windows, ratio, config, budget, run=run)
    seconds = time.perf_counter() - started + factor_seconds
    info = {"loss_curve": curve, "seconds": round(seconds, 2), "factor_seconds": round(factor_seconds, 2),
            "train_seconds": round(seconds - factor_seconds, 2), "device": str(loaded.device),
            "steps_run": len(curve), "stopped_early": len(curve) < config.steps,
            "spectrum_mismatch": spectrum_mismatch(profile, factors)}
    alloc = allocation_from_masks(profile, ratio, masks, config, info, budget)
    alloc.solve_seconds = seconds
    store_plan(profile, ratio, config, allocation_to_plan(profile, alloc), run.cache_dir)
    return alloc


def allocate_ars(profile: Profile, ratio: float, config: ARSConfig | None = None,
                 cache_dir: Path | None = None, rule: str = "reference") -> Allocation:
    """The ``ars`` allocator: the ranks of a trained (cached or committed) plan; never trains.

    Without ``config``, only plans trained under ``rule`` (default: the reference's) are
    served; ``rule="legacy"`` serves plans of the earlier rule (e.g. cpu-small-legacy).
    """
    plan = cached_ars_plan(profile, ratio, config, cache_dir, rule)
    if plan is None:
        hint = _other_rule_hint(profile, ratio, config, cache_dir, rule)
        raise ValueError(f"no ARS plan trained for ratio {ratio:g}: run `python -m lems_core ars --profile <profile "
                         f"folder> --ratio {ratio:g}` or launch training in the app{hint}")
    return allocation_from_plan(plan, ratio)


def _other_rule_hint(profile: Profile, ratio: float, config: ARSConfig | None, cache_dir: Path | None,
                     rule: str) -> str:
    """A note naming another rule that does have a plan (so a stale plan is findable, not served)."""
    if config is not None:
        return ""
    others = [r for r in RULES if r != rule and cached_ars_plan(profile, ratio, None, cache_dir, r) is not None]
    return f" (a plan trained under the {others[0]} rule exists: rule={others[0]!r} serves it)" if others else ""
