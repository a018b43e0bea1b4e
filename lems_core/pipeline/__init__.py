"""The steps wired together with the cache: statistics -> factorisations -> profile, and plan ->
compressed model -> evaluation; the model-scored allocators, ARS training and the app's jobs.

Every function that runs a job's work takes one ``run: Run`` (``lems_core.run``): the
cache folder, device, memory budget, factor dtype, offloading, progress and cancel.

- ``models``        the process's loaded models (``get_model``) and their locks (``hold_model``)
- ``artefacts``     calibration windows, statistics and static factorisations, cached; a profile's model
- ``plan_factors``  the factors one plan compresses with (static slices, rank-dependent methods)
- ``evaluation``    ``evaluate_plan``: compressed in place, perplexity, KL, zero-shot; ``EvalResult``
- ``scoring``       KL / perplexity scorers and the model-scored allocators (``allocate_on_model``)
- ``profiling``     ``build_profile`` (``ProfileSettings``) and ``add_measured_points``
- ``jobs``          the app's background jobs (``evaluate_and_store``, ``build_profile_job``, ``PlanRequest``)
- ``ars_training``  ARS training for a profile (``train_ars``, ``run_ars_job``, ``launch_ars_training``)
"""
from __future__ import annotations

__all__ = [
    "BASE_DECOMPOSITION", "Cancelled", "DEFAULT_RUN", "DENSE_PPL_FIELDS", "EVAL_WEIGHTS", "EvalResult",
    "LOADED_MODELS", "LOADING_REPORTED", "PlanRequest", "ProfileSettings", "RANK_DEPENDENT", "Run", "SHIPPED_DENSE_PPL",
    "add_measured_points", "allocate_on_model", "build_profile", "build_profile_job", "calibration_ids",
    "calibration_windows", "check_decomposition", "compressed", "decomposition_names", "dense_perplexity",
    "dense_zero_shot", "evaluate_and_store", "evaluate_plan", "factorizations_for", "free_core_threads",
    "full_factorizations", "get_model", "hold_model", "job_run", "launch_ars_training", "make_kl_scorer",
    "make_ppl_scorer", "model_lock", "plan_factorizations", "plan_for_profile", "plan_zero_shot", "profile_model",
    "reference_logits", "reference_logits_dtype", "run_ars_job", "score_function", "shipped_dense_perplexity",
    "statistics_for", "statistics_key", "train_ars",
]

from ..decompositions import BASE_DECOMPOSITION, RANK_DEPENDENT, check_decomposition, decomposition_names
from ..run import DEFAULT_RUN, Cancelled, Run
from .models import LOADED_MODELS, get_model, hold_model, model_lock
from .artefacts import calibration_windows, factorizations_for, profile_model, statistics_for, statistics_key
from .plan_factors import plan_factorizations
from .evaluation import (DENSE_PPL_FIELDS, EVAL_WEIGHTS, LOADING_REPORTED, SHIPPED_DENSE_PPL, EvalResult, compressed,
                         dense_perplexity, dense_zero_shot, evaluate_plan, plan_zero_shot, reference_logits,
                         reference_logits_dtype, shipped_dense_perplexity)
from .scoring import allocate_on_model, make_kl_scorer, make_ppl_scorer, score_function
from .profiling import ProfileSettings, add_measured_points, build_profile
from .jobs import PlanRequest, build_profile_job, evaluate_and_store, free_core_threads, job_run, plan_for_profile
from .ars_training import calibration_ids, full_factorizations, launch_ars_training, run_ars_job, train_ars
