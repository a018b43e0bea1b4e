"""A small shipped-results file for tests (the real one is cache/demo/results.json, measured by studies/ship_results.py).

Records are ``EvalResult.to_dict()`` of real allocations of a profile, ranks included;
the measurements are made up but deterministic: KL grows with the predicted error
(so the rank correlation is known), perplexity with KL.
"""
from __future__ import annotations

import json
from pathlib import Path

from lems_core.allocators import allocate
from lems_core.evaluation import QUICK_EVAL
from lems_core.pipeline import EvalResult
from lems_core.prediction_check import profile_error_model
from lems_core.error_model import predicted_errors
from lems_core.results import RESULTS_SCHEMA

BUDGETS = (0.6, 0.7, 0.8)
METHODS = ("lems", "uniform", "mrcs")


def fixture_record(profile, method: str, budget: float, kl_scale: float = 0.05) -> dict:
    """One record of ``method`` at ``budget`` on ``profile``: real ranks, KL = kl_scale x predicted Σ ε."""
    alloc = allocate(profile, method, budget)
    plan = alloc.to_plan(profile)
    summary = plan.summary
    params, _ = profile_error_model(profile, budget)
    predicted = sum(predicted_errors(profile, alloc.ranks, params).values())
    kl = kl_scale * predicted
    settings = {"seq_len": QUICK_EVAL.seq_len, "max_windows": QUICK_EVAL.max_windows,
                "protocol": QUICK_EVAL.to_dict(), "splits": {"wikitext2": "test"},
                "calibration": profile.calibration, "plan_decomposition": profile.decomposition}
    return EvalResult(method, profile.decomposition, budget, summary["realised_ratio"], {"wikitext2": 20.0 * (1 + kl)},
                      {"wikitext2": 20.0}, kl, summary["params_kept"], summary["params_total"], 1.0, "cpu",
                      profile.model_source, profile.fingerprint, settings, created="2025-01-01T00:00:00+00:00",
                      ranks=dict(alloc.ranks)).to_dict()


def fixture_records(profile, methods=METHODS, budgets=BUDGETS) -> list[dict]:
    return [fixture_record(profile, m, b) for m in methods for b in budgets]


def write_shipped(path: Path, records: list[dict], note: str = "test fixture") -> Path:
    """Write ``records`` as a lems-results/1 file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": RESULTS_SCHEMA, "note": note, "results": records}))
    return path
