"""Pure helpers that turn core objects into DataFrames and Plotly figures for the app.

No streamlit here: every function takes plain core objects (Profile, ranks dicts,
ErrorModelParams, result records) and returns a ``pandas.DataFrame``, a
``plotly.graph_objects.Figure`` or a small dict, so the pages stay thin and this
module is unit-tested directly (tests/test_ui_data.py).

Conventions: a *ranks* dict maps layer name -> rank (``None`` = left dense); the
*kept fraction* of a layer is the share of its dense parameters the factorisation
stores, rank * (m + n) / (m * n), 1.0 when dense.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from .allocators import predicted_errors
from .error_model import ErrorModelParams, depth_bias, reference_rank, residual_energy, spectral_shape
from .model import KINDS, LayerInfo
from .plan import layer_param_cost, normalise_rank
from .profile import Profile

KIND_COLORS = dict(zip(KINDS, px.colors.qualitative.Plotly))
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
METHOD_COLORS = {"lems": "#1f77b4", "uniform": "#7f7f7f", "svdllm_v2": "#ff7f0e", "mrcs": "#2ca02c",
                 "asvd": "#9467bd", "ars": "#8c564b", "atp": "#e377c2", "uploaded": "#17becf",
                 "erc_plc": "#bcbd22", "lcsvd_search": "#d62728"}
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
_LABELLED_ROWS = 16  # heatmaps with at most this many blocks get cell labels
_LOG_FLOOR = 1e-12  # residual energy reaches exactly 0 at full rank; log axes need > 0


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
def spectra_figure(profile: Profile, names: list[str]) -> go.Figure:
    """Singular values against their index, one line per layer, log y."""
    fig = go.Figure()
    styles = _line_styles(profile, names)
    for name in names:
        sigma = profile.spectra[name]
        fig.add_trace(go.Scatter(x=np.arange(1, len(sigma) + 1), y=np.maximum(sigma, _LOG_FLOOR), mode="lines",
                                 **styles[name]))
    fig.update_layout(title=_titled("Singular values", profile, names), xaxis_title="index i", yaxis_title="σ_i",
                      yaxis_type="log", legend_title="kind", height=440, margin=dict(t=70, b=40))
    return fig


def residual_energy_figure(profile: Profile, names: list[str], power: int = 2, ref_ratio: float | None = None) -> go.Figure:
    """Normalised residual energy 1 - E(r)/E against r / eq rank (the per-layer param ratio)."""
    fig = go.Figure()
    styles = _line_styles(profile, names)
    for name in names:
        layer, sigma = profile.layer(name), profile.spectra[name]
        ranks = np.arange(0, min(len(sigma), layer.eq_rank) + 1)
        resid = residual_energy(sigma, ranks, power)
        fig.add_trace(go.Scatter(x=ranks / max(layer.eq_rank, 1), y=np.maximum(resid, _LOG_FLOOR), mode="lines",
                                 **styles[name]))
    if ref_ratio is not None:
        fig.add_vline(x=ref_ratio, line_dash="dot", annotation_text=f"reference {ref_ratio:g}")
    fig.update_layout(title=_titled(f"Residual energy (power {power}) vs kept ratio", profile, names),
                      xaxis_title="rank / eq rank", yaxis_title="1 − E(r)/E", yaxis_type="log", legend_title="kind",
                      height=440, margin=dict(t=70, b=40))
    return fig


def energy_kept_grid(profile: Profile, ratio: float, power: int = 2) -> pd.DataFrame:
    """Block x kind grid of the energy kept, E(r)/E, at rank int(ratio * eq rank)."""
    values = {}
    for l in profile.layers:
        rank = reference_rank(l.eq_rank, ratio)
        values[(l.block, l.kind)] = 1.0 - residual_energy(profile.spectra[l.name], np.array([rank]), power)[0]
    return _grid(values)


# ----------------------------------------------------------------- sensitivity
def kl_scale_figure(profile: Profile) -> go.Figure:
    """Measured KL scale per layer (only that layer at the reference ratio), coloured by kind."""
    table = layer_table(profile).reset_index(names="position")
    fig = px.bar(table, x="position", y="KL scale", color="kind", color_discrete_map=KIND_COLORS,
                 hover_data=["name", "block", "out x in"], category_orders={"kind": list(KINDS)}, log_y=True)
    fig.update_layout(title=f"Measured KL with one layer at ratio {profile.ref_ratio:g}",
                      xaxis_title="layer (model order)", height=380, bargap=0.05, margin=dict(t=50, b=40))
    return fig


def measured_ratios(profile: Profile) -> list[float]:
    """All ratios with a per-layer KL measurement: the reference one and the extra ones."""
    ratios = set(profile.measured)
    if profile.kl_ref is not None:
        ratios.add(profile.ref_ratio)
    return sorted(ratios)


def error_curves_figure(profile: Profile, names: list[str], params: ErrorModelParams, points: int = 60) -> go.Figure:
    """Fitted single-layer error KL_l(ref) x S_l(c) against c, with the measured KL points as markers.

    The shape is normalised at the profile's measurement ratio (where the scale was
    measured) with the current energy power; without measurements the scale is 1.
    """
    fit = replace(params, ref_ratio=profile.ref_ratio)
    scale = np.ones(len(profile.layers)) if profile.kl_ref is None else np.asarray(profile.kl_ref, dtype=np.float64)
    index = {l.name: i for i, l in enumerate(profile.layers)}
    measurements = _measurements(profile)
    ratios = np.linspace(0.02, 0.98, points)
    fig = go.Figure()
    styles = _line_styles(profile, names)
    for name in names:
        layer, i = profile.layer(name), index[name]
        curve = scale[i] * spectral_shape(profile.spectra[name], (ratios * layer.eq_rank).astype(int), layer.eq_rank, fit)
        fig.add_trace(go.Scatter(x=ratios, y=np.maximum(curve, _LOG_FLOOR), mode="lines", **styles[name]))
        if measurements:
            xs = sorted(measurements)
            fig.add_trace(go.Scatter(x=xs, y=[measurements[r][i] for r in xs], mode="markers", showlegend=False,
                                     marker=dict(color=KIND_COLORS.get(layer.kind), size=9, symbol="x"),
                                     legendgroup=layer.kind, hovertemplate=styles[name]["hovertemplate"]))
    fig.update_layout(title=_titled("Fitted error curves (lines) vs measured KL (x)", profile, names),
                      xaxis_title="kept ratio c = r / eq rank", yaxis_title="KL (scale × shape)", yaxis_type="log",
                      legend_title="kind", height=440, margin=dict(t=70, b=40))
    return fig


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


def depth_bias_figure(num_blocks: int, params: ErrorModelParams) -> go.Figure:
    """β_b, the per-block weight of errors (propagation bias), for the current alpha/gamma."""
    beta = depth_bias(num_blocks, params)
    fig = go.Figure(go.Scatter(x=np.arange(num_blocks), y=beta, mode="lines+markers", name="β_b"))
    fig.update_layout(title=f"Depth bias β_b ({params.bias_form}, α={params.alpha:g}, γ={params.gamma:g})",
                      xaxis_title="block b", yaxis_title="β_b", height=320, margin=dict(t=50, b=40))
    fig.update_yaxes(rangemode="tozero")
    fig.update_xaxes(tickformat="d", dtick=1 if num_blocks <= 16 else None)
    return fig


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


def heatmap_figure(grid: pd.DataFrame, title: str, colorbar: str, text: pd.DataFrame | None = None,
                   diverging: bool = False, zrange: tuple[float, float] | None = None) -> go.Figure:
    """A block (rows) x kind (columns) heatmap; ``diverging`` centres a red-blue scale on 0.

    Cells are labelled (with ``text``, else the value) when there are at most 16 blocks.
    """
    z = grid.to_numpy(dtype=float)
    labelled = len(grid) <= _LABELLED_ROWS
    if diverging:
        bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() and np.nanmax(np.abs(z)) > 0 else 1.0
        zrange = (-bound, bound)
    heat = go.Heatmap(
        z=z, x=list(grid.columns), y=list(grid.index), colorscale="RdBu" if diverging else "Viridis",
        zmin=None if zrange is None else zrange[0], zmax=None if zrange is None else zrange[1],
        colorbar=dict(title=colorbar),
        text=None if text is None else text.to_numpy(), hovertemplate=_heat_hover(text is not None),
        texttemplate=("%{text}" if text is not None else "%{z:.2f}") if labelled else None, textfont=dict(size=10))
    fig = go.Figure(heat)
    fig.update_layout(title=title, xaxis_title="kind", yaxis_title="block", height=max(300, 60 + 14 * len(grid)),
                      margin=dict(t=50, b=40))
    fig.update_yaxes(autorange="reversed", dtick=1 if labelled else None)
    return fig


def per_layer_figure(profile: Profile, allocations: Mapping[str, Mapping[str, int | None]]) -> go.Figure:
    """Kept fraction of every layer, grouped bars per method."""
    fig = go.Figure()
    for method, ranks in allocations.items():
        frame = ranks_frame(profile, ranks)
        fig.add_trace(go.Bar(x=np.arange(len(frame)), y=frame["kept fraction"], name=method_label(method),
                             marker_color=METHOD_COLORS.get(method),
                             hovertext=[f"{n}: rank {'dense' if d else int(r)}"
                                        for n, r, d in zip(frame["name"], frame["rank"], frame["dense"])]))
    fig.update_layout(barmode="group", title="Kept fraction per layer", xaxis_title="layer (model order)",
                      yaxis_title="rank params / dense params", height=380, bargap=0.1, margin=dict(t=50, b=40))
    return fig


def predicted_error_tables(profile: Profile, ranks_by_label: Mapping[str, Mapping[str, int | None]],
                           params: ErrorModelParams) -> dict[str, dict[str, float]]:
    """Per label, the LEMS surrogate error of every layer under one error model (so labels compare)."""
    return {label: predicted_errors(profile, ranks, params) for label, ranks in ranks_by_label.items()}


def error_by_block_figure(profile: Profile, errors: Mapping[str, Mapping[str, float]]) -> go.Figure:
    """Predicted error summed per block, one bar group per label (``predicted_error_tables`` output)."""
    blocks = np.array([l.block for l in profile.layers])
    fig = go.Figure()
    for label, per_layer in errors.items():
        sums = np.bincount(blocks, weights=[per_layer[l.name] for l in profile.layers], minlength=profile.num_blocks)
        fig.add_trace(go.Bar(x=np.arange(profile.num_blocks), y=sums, name=method_label(label),
                             marker_color=METHOD_COLORS.get(label)))
    fig.update_layout(barmode="group", title="Predicted error per block (current error model)",
                      xaxis_title="block", yaxis_title="Σ ε_l", height=340, margin=dict(t=50, b=40))
    return fig


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


def parse_budgets(text: str) -> list[float]:
    """"0.6, 0.7 0.8" -> [0.6, 0.7, 0.8] (kept fractions in (0, 1], sorted, unique); ValueError names a bad entry."""
    budgets = set()
    for token in re.split(r"[,\s;]+", text.strip()):
        if not token:
            continue
        try:
            value = float(token)
        except ValueError:
            raise ValueError(f"{token!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise ValueError(f"budget {token} is not a kept fraction in (0, 1]")
        budgets.add(round(value, 6))
    return sorted(budgets)


def ppl_datasets(frame: pd.DataFrame) -> list[str]:
    """Datasets that have a perplexity column in a results frame."""
    return [c.removeprefix("ppl ") for c in frame.columns if c.startswith("ppl ")]


def ppl_vs_ratio_figure(frame: pd.DataFrame, dataset: str, ratio_column: str = "realised_ratio") -> go.Figure:
    """Perplexity on one dataset against the realised param ratio: colour = method, dash = decomposition."""
    column, dense = f"ppl {dataset}", f"dense ppl {dataset}"
    if column not in frame or frame[column].isna().all():
        return go.Figure(layout=dict(title=f"No perplexity on {dataset} yet", height=200))
    data = frame.dropna(subset=[column]).sort_values(ratio_column)
    several = "decomposition" in data and data["decomposition"].nunique() > 1
    fig = px.line(data, x=ratio_column, y=column, color="method" if "method" in data else None, markers=True,
                  line_dash="decomposition" if several else None, log_y=True,
                  hover_data=[c for c in ("budget", "decomposition", "kl", "device") if c in data],
                  color_discrete_map={method_label(k): v for k, v in METHOD_COLORS.items()})
    if dense in data and data[dense].notna().any():
        fig.add_hline(y=float(data[dense].median()), line_dash="dot", annotation_text="dense")
    fig.update_layout(title=f"Perplexity on {dataset} vs realised param ratio", xaxis_title="realised param ratio",
                      yaxis_title="perplexity", height=420, margin=dict(t=50, b=40))
    return fig


# ----------------------------------------------------------------------- cache
def plans_dir(cache_dir: Path) -> Path:
    """Where the app saves rank plans: ``<cache>/plans``."""
    return Path(cache_dir) / "plans"


def saved_plans(cache_dir: Path) -> list[Path]:
    """Saved plan files, newest first."""
    folder = plans_dir(cache_dir)
    files = folder.glob("*.json") if folder.is_dir() else []
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def plan_file_name(method: str, ratio: float, fingerprint: str) -> str:
    """A readable, filesystem-safe name such as ``lems_r0.800_ab12cd34.json``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{method}_r{ratio:.3f}_{fingerprint[:8]}")
    return f"{safe}.json"


def folder_size(folder: Path) -> int:
    """Total bytes of the files under a folder (0 when missing)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def cache_summary(cache_dir: Path) -> dict:
    """Counts and size shown in the sidebar's cache status."""
    cache_dir = Path(cache_dir)
    profiles = list((cache_dir / "profiles").glob("*/profile.json"))
    return {"profiles": len(profiles), "saved plans": len(saved_plans(cache_dir)),
            "size": human_bytes(folder_size(cache_dir))}


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KB'."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.3g} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024


# --------------------------------------------------------------------- helpers
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def _block_dashes(profile: Profile, names: list[str]) -> dict[int, str]:
    """Line dash per selected block (cycled when more blocks than dash styles)."""
    blocks = sorted({profile.layer(n).block for n in names})
    return {b: _DASHES[i % len(_DASHES)] for i, b in enumerate(blocks)}


def _line_styles(profile: Profile, names: list[str]) -> dict[str, dict]:
    """Scatter kwargs per layer: colour by kind, dash by block, one legend entry per kind."""
    dashes, shown, styles = _block_dashes(profile, names), set(), {}
    for name in names:
        layer = profile.layer(name)
        styles[name] = dict(
            name=layer.kind, legendgroup=layer.kind, showlegend=layer.kind not in shown,
            line=dict(color=KIND_COLORS.get(layer.kind), width=1.5, dash=dashes[layer.block]),
            hovertemplate=f"{name}<br>x=%{{x:.3g}}, y=%{{y:.3g}}<extra>block {layer.block}</extra>")
        shown.add(layer.kind)
    return styles


def _titled(title: str, profile: Profile, names: list[str]) -> dict:
    """A title whose subtitle says which dash is which block (when that fits)."""
    dashes = _block_dashes(profile, names)
    if len(dashes) > len(_DASHES):
        return dict(text=title, subtitle=dict(text="colour = kind, dash = block (cycled); hover for the layer"))
    legend = ", ".join(f"{style} = block {b}" for b, style in dashes.items())
    return dict(text=title, subtitle=dict(text=f"colour = kind; {legend}"))


def _measurements(profile: Profile) -> dict[float, np.ndarray]:
    found = {float(r): np.asarray(v) for r, v in profile.measured.items()}
    if profile.kl_ref is not None:
        found[float(profile.ref_ratio)] = np.asarray(profile.kl_ref)
    return found


def _grid(values: Mapping[tuple[int, str], object]) -> pd.DataFrame:
    """{(block, kind): value} -> DataFrame indexed by block with columns in KINDS order."""
    frame = pd.Series(values).unstack()
    frame.index.name, frame.columns.name = "block", "kind"
    return frame.reindex(columns=[k for k in KINDS if k in frame.columns]).sort_index()


def _heat_hover(with_text: bool) -> str:
    extra = "<br>rank %{text}" if with_text else ""
    return "block %{y}, %{x}: %{z:.3f}" + extra + "<extra></extra>"
