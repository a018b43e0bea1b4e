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
from lems_core.model import KINDS, LayerInfo
from lems_core.plan import layer_param_cost, normalise_rank
from lems_core.profile import Profile

METHOD_LABELS = {
    "lems": "LEMS",
    "uniform": "Uniform",
    "svdllm_v2": "SVD-LLM V2",
    "mrcs": "MRCS",
    "asvd": "ASVD (STRS)",
    "atp": "ATP",
    "ars": "ARS",
    "erc_plc": "ERC-SVD (PLC)",
    "lcsvd_search": "LC-SVD search",
}
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
    """Display name of an allocator method ("lems" -> "LEMS")."""
    return METHOD_LABELS.get(method, method)


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
def profile_summary(profile: Profile) -> dict:
    """Headline facts about a profile, label -> printable value."""
    shapes = sorted({(l.out_features, l.in_features) for l in profile.layers})
    return {
        "Model": profile.model_source,
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


def comparison_table(profile: Profile, allocations: Mapping[str, object],
                     errors: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """One row per allocation: realised ratio, params, dense layers, predicted error, solve time.

    ``allocations`` maps a label to an object with ``ranks`` (and optionally ``objective``
    and ``solve_seconds``) such as ``allocators.Allocation``; ``errors`` holds the same
    labels' per-layer errors under one error model (``predicted_error_tables``).
    """
    rows = []
    for label, alloc in allocations.items():
        frame = ranks_frame(profile, alloc.ranks, errors[label])
        rows.append({
            "method": method_label(label),
            "realised ratio": frame["params"].sum() / profile.total_params,
            "params": int(frame["params"].sum()),
            "dense layers": int(frame["dense"].sum()),
            "predicted error": float(frame["predicted error"].sum()),
            "objective": getattr(alloc, "objective", None),
            "solve ms": 1000.0 * float(getattr(alloc, "solve_seconds", 0.0) or 0.0),
        })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------- results
def results_frame(records: list[dict]) -> pd.DataFrame:
    """Flatten evaluation records (EvalResult.to_dict()) into one row each, ppl per dataset as columns."""
    rows = []
    for rec in records:
        row = {k: v for k, v in rec.items() if not isinstance(v, (dict, list))}
        for dataset, value in (rec.get("ppl") or {}).items():
            row[f"ppl {dataset}"] = value
        for dataset, value in (rec.get("dense_ppl") or {}).items():
            row[f"dense ppl {dataset}"] = value
        rows.append(row)
    frame = pd.DataFrame(rows)
    if "method" in frame:
        frame["method"] = frame["method"].map(lambda m: method_label(str(m)))
    return frame


def ppl_datasets(frame: pd.DataFrame) -> list[str]:
    """Datasets that have a perplexity column in a results frame."""
    return [c.removeprefix("ppl ") for c in frame.columns if c.startswith("ppl ")]


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
    frame = pd.Series(values).unstack()
    frame.index.name, frame.columns.name = "block", "kind"
    return frame.reindex(columns=[k for k in KINDS if k in frame.columns]).sort_index()
