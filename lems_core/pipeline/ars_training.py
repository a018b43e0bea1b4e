"""ARS training for a profile (``allocators/ars/``): its windows and full factors, the cached result, the job.

The ``ars`` allocator only serves trained plans; training needs the model, the
profile's calibration windows and every component of every layer, which this module
finds for a profile before it calls ``ars.train_ars_on``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import fields
from pathlib import Path

import torch

from ..allocators import Allocation, ars
from ..calibration import CalibrationConfig
from ..decompositions import BASE_DECOMPOSITION, DecompositionOptions, Decomposer, Factorization
from ..model import LoadedModel
from ..profile import Profile
from ..run import DEFAULT_RUN, Progress, Run
from .artefacts import calibration_windows, statistics_for
from .jobs import job_run
from . import models
from .models import hold_model


def _profile_options(profile: Profile) -> DecompositionOptions:
    """The decomposition options a profile was built with (stored as strings), or the defaults."""
    stored = (profile.meta.get("settings") or {}).get("options") or {}
    values = {}
    for f in fields(DecompositionOptions):
        if f.name not in stored:
            continue
        raw = stored[f.name]
        if f.name == "dtype":
            values[f.name] = getattr(torch, str(raw).rsplit(".", 1)[-1])
        elif isinstance(getattr(DecompositionOptions, f.name), float):
            values[f.name] = float(raw)
        else:
            values[f.name] = str(raw)
    return DecompositionOptions(**values)


def calibration_ids(loaded: LoadedModel, profile: Profile) -> torch.Tensor:
    """The profile's calibration windows (the same ones its statistics came from)."""
    calib, _ = calibration_windows(loaded, CalibrationConfig.from_dict(profile.calibration))
    return calib


def full_factorizations(loaded: LoadedModel, profile: Profile, calib_ids: torch.Tensor, *,
                        run: Run = DEFAULT_RUN) -> dict[str, Factorization]:
    """All min(m, n) components of every layer under the profile's decomposition.

    The statistics come from the cache (computed there if missing); the factors
    themselves are not cached: they are ~2x the model's Linear weights, and a trained
    ARS result is cached instead. Rank-dependent methods use their base whitening, as
    their profiles do.
    """
    method = BASE_DECOMPOSITION.get(profile.decomposition, profile.decomposition)
    cfg = CalibrationConfig.from_dict(profile.calibration)
    stats = statistics_for(loaded, calib_ids, cfg, method, run=run.stage(0, 0.5))
    decomposer = Decomposer(method, _profile_options(profile))
    out = {}
    for i, l in enumerate(profile.layers):
        weight = loaded.model.get_submodule(l.name).weight
        out[l.name] = decomposer(l, weight, stats.inputs.get(l.name), stats.grad_gram.get(l.name),
                                 stats.fisher.get(l.name), keep=min(l.out_features, l.in_features))
        run.report(0.5 + 0.5 * (i + 1) / len(profile.layers), f"full factors {i + 1}/{len(profile.layers)}")
    return out


def train_ars(loaded: LoadedModel, profile: Profile, ratio: float, config: ars.ARSConfig | None = None, *,
              factors: dict[str, Factorization] | None = None, windows: torch.Tensor | None = None,
              force: bool = False, run: Run = DEFAULT_RUN) -> Allocation:
    """Train ARS for ``profile`` at kept fraction ``ratio`` (cached: a repeat returns at once).

    Runs on the model's device. ``factors`` (full, see ``full_factorizations``) and
    ``windows`` (calibration token ids) default to the profile's own; pass them only
    if they are exactly those (tests, callers that already hold them), since they are
    not part of the cache key.
    """
    config = config or ars.PRESETS["reference"]
    if not force:
        plan = ars.cached_ars_plan(profile, ratio, config, run.cache_dir)
        if plan is not None:
            return ars.allocation_from_plan(plan, ratio)
    started = time.perf_counter()
    windows = calibration_ids(loaded, profile) if windows is None else windows
    run.check_cancel()
    if factors is None:
        factors = full_factorizations(loaded, profile, windows, run=run.stage(0.0, 0.15))
    return ars.train_ars_on(loaded, profile, ratio, windows, factors, config,
                            factor_seconds=time.perf_counter() - started, run=run.stage(0.15, 1.0))


def run_ars_job(profile_folder: str | Path, ratios: list[float], preset_name: str = "cpu-small",
                progress: Progress | None = None, cancel: threading.Event | None = None, *,
                run: Run = DEFAULT_RUN) -> list[dict]:
    """Load the profile's model and train every ratio in turn; returns the plans as dicts.

    The function the app submits as a background job (see ``launch_ars_training``)
    and the CLI runs in the foreground.
    """
    run = job_run(run, progress, cancel)
    profile = Profile.load(profile_folder)
    loaded = models.get_model(profile.model_source, run.device)
    config = ars.preset(preset_name)
    plans = []
    with hold_model(loaded, run=run):  # training swaps the model's Linears in place
        for i, ratio in enumerate(ratios):
            alloc = train_ars(loaded, profile, ratio, config, run=run.stage(i / len(ratios), (i + 1) / len(ratios)))
            plans.append(ars.allocation_to_plan(profile, alloc).to_dict())
    return plans


def launch_ars_training(registry, profile_folder: str | Path, ratios: list[float], preset_name: str = "cpu-small", *,
                        run: Run = DEFAULT_RUN):
    """Start ARS training as a background job of a ``jobs.JobRegistry`` (meta kind "ars").

    Training swaps the shared model's Linears in place for its duration (restored on
    exit, cancel or error), like ``compressed``; it holds the model's lock
    (``hold_model``), so other jobs on the same model wait for it.
    """
    label = ", ".join(f"{r:g}" for r in ratios)
    return registry.submit(f"ARS training ({preset_name}) at {label}", run_ars_job, str(profile_folder),
                           list(ratios), preset_name, run=run,
                           meta={"kind": "ars", "profile": str(profile_folder), "ratios": list(ratios),
                                 "preset": preset_name})
