"""The app's background jobs: the functions a ``jobs.JobRegistry`` runs, and what they share.

A registry calls ``fn(*args, progress=, cancel=, **kwargs)``; each entry point here joins
that progress and cancel to the ``Run`` it was given (``job_run``) and calls the pipeline.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..calibration import CalibrationConfig
from ..cpu_share import free_core_count, others_load
from ..plan import check_plan_layers
from ..profile import Profile
from ..run import DEFAULT_RUN, Progress, Run
from .evaluation import LOADING_REPORTED, evaluate_plan
from .profiling import build_profile
from .scoring import allocate_on_model


@dataclass(frozen=True)
class PlanRequest:
    """A plan still to be built inside a background job: allocator ``method`` at kept fraction ``budget``."""

    method: str
    budget: float


def job_run(run: Run, progress: Progress | None, cancel: threading.Event | None) -> Run:
    """``run`` with the progress and cancel a job registry hands its function (the run's own where none is given)."""
    return run.but(progress=run.progress if progress is None else progress,
                   cancel=run.cancel if cancel is None else cancel)


def build_profile_job(source: str, decomposition: str, calibration: CalibrationConfig,
                      progress: Progress | None = None, cancel: threading.Event | None = None, *,
                      run: Run = DEFAULT_RUN) -> Path:
    """``build_profile`` with the default settings, as the app's build job; returns the profile's folder."""
    return build_profile(source, decomposition, calibration, run=job_run(run, progress, cancel))


def plan_for_profile(plan, profile: Profile):
    """(plan, calibration) to evaluate a plan that came from outside (upload, saved file) on ``profile``'s model.

    Nothing the plan names is opened as given: it must be for the profile's model
    (fingerprint) and cover exactly its layers; the model is the profile's own source;
    the calibration is the profile's when the plan carries the same config, else the
    plan's resolved by dataset *name* (``calibration.untrusted_calibration``).
    Raises PlanError / ValueError with the reason.
    """
    from ..calibration import untrusted_calibration
    from ..plan import PlanError

    if plan.fingerprint != profile.fingerprint:
        raise PlanError(f"plan is for model {plan.fingerprint!r}, the chosen profile's model is {profile.fingerprint!r}")
    check_plan_layers(plan, profile.layers)
    stored = plan.meta.get("calibration")
    if not stored or stored == profile.calibration:
        calibration = CalibrationConfig.from_dict(profile.calibration)
    else:
        calibration = untrusted_calibration(stored)
    return dataclasses.replace(plan, model_source=profile.model_source), calibration


def evaluate_and_store(item, progress: Progress | None = None, cancel: threading.Event | None = None, *,
                       profile: Profile, params=None, decomposition: str | None = None, run: Run = DEFAULT_RUN,
                       **options) -> dict:
    """One item of the app's evaluation job: a RankPlan, or a PlanRequest solved here on the model first.

    The plan is evaluated (factorised with ``decomposition`` or its own, calibration from
    the plan, else the profile's; ``options`` are ``evaluate_plan``'s: datasets, protocol,
    tasks, ...) and the result is added to the ResultStore of ``run.cache_dir``.
    Returns the result's dict, or {"method", "budget", "error"} for a request that could
    not be allocated (a ValueError such as an infeasible budget), so the other items still run.
    """
    from ..results import ResultStore

    run = job_run(run, progress, cancel)
    run.report(LOADING_REPORTED, f"loading the model {profile.model_source}")  # before anything slow
    if isinstance(item, PlanRequest):
        try:
            alloc = allocate_on_model(profile, item.method, item.budget, params, run=run.stage(0, 0.5))
        except ValueError as exc:  # e.g. no feasible candidate at this budget: skip it, keep the job going
            return {"method": item.method, "budget": item.budget, "error": str(exc)}
        item = alloc.to_plan(profile, meta={"calibration": profile.calibration})
        run = run.stage(0.5, 1.0)
    item, calibration = plan_for_profile(item, profile)
    with free_core_threads():
        result = evaluate_plan(item, calibration=calibration, decomposition=decomposition, run=run, **options)
    ResultStore(run.cache_dir).add(result)
    return result.to_dict()


@contextlib.contextmanager
def free_core_threads(busy_elsewhere: Callable[[int], float] = others_load) -> Iterator[int]:
    """Run a background job with as many intra-op threads as other processes leave cores free
    (at least one, at most torch's setting); restored afterwards. Yields the count.

    On a machine busy with other work, OpenMP threads wait on each other at every
    barrier, so a forward pass or the statistics can take several times longer with
    more threads than free cores. The others' use is measured with this process's own
    CPU time taken out (``cpu_share.others_load``): the load average would count the
    model load that came just before as someone else's work. The thread count does not
    change the numbers (the demo's statistics and logits are the same bits with one and
    two threads; bench/first_run.py).
    """
    before = torch.get_num_threads()
    cpus = os.cpu_count() or 1
    threads = free_core_count(cpus, before, busy_elsewhere(cpus))
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
