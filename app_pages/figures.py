"""Plotly figures of the app, built from core objects and the tables in ``app_pages/tables.py``.

No streamlit here: every function takes plain core objects (Profile, ranks dicts,
ErrorModelParams, a results frame) and returns a ``plotly.graph_objects.Figure``,
so the pages stay thin and this module is unit-tested directly
(tests/test_figures.py). Ranks and kept fractions follow the conventions of
``app_pages/tables.py``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from lems_core.error_model import ErrorModelParams, depth_bias, residual_energy, spectral_shape
from lems_core.model import KINDS
from lems_core.profile import Profile

from lems_core.budget import layer_param_cost

from app_pages.tables import layer_table, method_label

KIND_COLORS = dict(zip(KINDS, px.colors.qualitative.Plotly))
METHOD_COLORS = {"lems": "#1f77b4", "uniform": "#7f7f7f", "svdllm_v2": "#ff7f0e", "mrcs": "#2ca02c",
                 "asvd": "#9467bd", "ars": "#8c564b", "atp": "#e377c2", "uploaded": "#17becf",
                 "erc_plc": "#bcbd22", "lcsvd_search": "#d62728"}
_LABELLED_ROWS = 40  # heatmaps with at most this many blocks get cell labels (the demo has 30, 8B models 32)
_LOG_FLOOR = 1e-12  # residual energy reaches exactly 0 at full rank; log axes need > 0
REFERENCE_LINE = "#8c8c8c"  # reference/dense lines: mid grey reads on light and dark themes
PPL_CEILING = 1e4  # perplexities above this (diverged runs) are drawn at the top edge, marked "off scale"


def heatmap_labelled(rows: int) -> bool:
    """Whether a block x kind heatmap of ``rows`` blocks draws its cell labels (captions say so)."""
    return rows <= _LABELLED_ROWS


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
                      yaxis_type="log", legend_title="kind · block", height=440, margin=dict(t=70, b=40))
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
        fig.add_vline(x=ref_ratio, line_dash="dot", line_color=REFERENCE_LINE, annotation_text=f"reference {ref_ratio:g}")
    fig.update_layout(title=_titled(f"Residual energy (power {power}) vs kept ratio", profile, names),
                      xaxis_title="rank / eq rank", yaxis_title="1 − E(r)/E", yaxis_type="log", legend_title="kind · block",
                      height=440, margin=dict(t=70, b=40))
    return fig


# ----------------------------------------------------------------- sensitivity
def kl_scale_figure(profile: Profile) -> go.Figure:
    """Measured KL scale per layer (only that layer at the reference ratio), coloured by kind."""
    table = layer_table(profile).reset_index(names="position")
    fig = px.bar(table, x="position", y="KL scale", color="kind", color_discrete_map=KIND_COLORS,
                 hover_data=["name", "block", "out x in"], category_orders={"kind": list(KINDS)}, log_y=True)
    fig.update_layout(title=f"Measured KL with one layer at ratio {profile.ref_ratio:g}",
                      xaxis_title="layer (model order)", height=380, bargap=0.05, margin=dict(t=50, b=40))
    return fig


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
                      legend_title="kind · block", height=440, margin=dict(t=70, b=40))
    return fig


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
def heatmap_figure(grid: pd.DataFrame, title: str, colorbar: str, text: pd.DataFrame | None = None,
                   diverging: bool = False, zrange: tuple[float, float] | None = None) -> go.Figure:
    """A block (rows) x kind (columns) heatmap; ``diverging`` centres a red-blue scale on 0.

    Cells are labelled (with ``text``, else the value) when ``heatmap_labelled`` says so.
    Built as a plain spec (``_figure``): the Allocate page draws one per method on every
    budget move.
    """
    z = grid.to_numpy(dtype=float)
    labelled = heatmap_labelled(len(grid))
    if diverging:
        bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() and np.nanmax(np.abs(z)) > 0 else 1.0
        zrange = (-bound, bound)
    heat = dict(
        type="heatmap", z=z, x=list(grid.columns), y=list(grid.index), colorscale="RdBu" if diverging else "Viridis",
        colorbar=dict(title=dict(text=colorbar)), hovertemplate=_heat_hover(text is not None),
        textfont=dict(size=10 if len(grid) <= 16 else 8))
    if zrange is not None:
        heat |= dict(zmin=zrange[0], zmax=zrange[1])
    if text is not None:
        heat["text"] = text.to_numpy()
    if labelled:
        heat["texttemplate"] = "%{text}" if text is not None else "%{z:.2f}"
    return _figure([heat], dict(
        title=dict(text=title), xaxis=dict(title=dict(text="kind")),
        yaxis=dict(title=dict(text="block"), autorange="reversed", **({"dtick": 1} if labelled else {})),
        height=max(300, 60 + (14 if len(grid) > _LABELLED_ROWS else 18) * len(grid)), margin=dict(t=50, b=40)))


def _figure(data: list[dict], layout: dict) -> go.Figure:
    """A Figure from a plain spec, without Plotly's per-property validation (about 4x faster).

    Only for the figures redrawn on every slider move, whose property names are fixed
    here and checked by tests/test_figures.py (a typo would pass silently otherwise).
    """
    return go.Figure(dict(data=data, layout=layout), _validate=False)


def per_block_figure(profile: Profile, allocations: Mapping[str, Mapping[str, int | None]],
                     labels: Mapping[str, str] | None = None) -> go.Figure:
    """Kept fraction of every block (params kept / dense params of its layers), one line per method.

    One point per block and method instead of one bar per layer and method (1,050 bars
    for five methods on the demo); the per-layer detail is in the heatmaps' hover.
    """
    blocks = np.array([l.block for l in profile.layers])
    dense = np.bincount(blocks, weights=[l.params for l in profile.layers], minlength=profile.num_blocks)
    traces = []
    for method, ranks in allocations.items():
        costs = [layer_param_cost(l.out_features, l.in_features, ranks.get(l.name)) for l in profile.layers]
        kept = np.bincount(blocks, weights=costs, minlength=profile.num_blocks)
        dense_layers = np.bincount(blocks, weights=[c == l.params for c, l in zip(costs, profile.layers)],
                                   minlength=profile.num_blocks)
        traces.append(dict(
            type="scatter", x=np.arange(profile.num_blocks), y=kept / np.maximum(dense, 1), mode="lines+markers",
            name=(labels or {}).get(method, method_label(method)), line=dict(color=METHOD_COLORS.get(_base(method))),
            customdata=dense_layers, hovertemplate="block %{x}: kept %{y:.3f}, %{customdata:.0f} dense layer(s)"))
    return _figure(traces, dict(title=dict(text="Kept fraction per block"), xaxis=dict(title=dict(text="block")),
                                yaxis=dict(title=dict(text="params kept / dense params"), range=[0, 1.05]),
                                height=360, margin=dict(t=50, b=40)))


def per_layer_figure(profile: Profile, allocations: Mapping[str, Mapping[str, int | None]]) -> go.Figure:
    """Deprecated name of ``per_block_figure`` (the per-layer bars were unreadable on real models)."""
    return per_block_figure(profile, allocations)


def error_by_block_figure(profile: Profile, errors: Mapping[str, Mapping[str, float]],
                          labels: Mapping[str, str] | None = None) -> go.Figure:
    """Predicted error summed per block, one line per label (``tables.predicted_error_tables`` output).

    Log y: the first block (bias 1 + γ and the largest KL) is orders of magnitude above
    the rest, which a linear axis flattens to zero. Blocks left fully dense (error 0)
    are gaps.
    """
    blocks = np.array([l.block for l in profile.layers])
    traces = []
    for label, per_layer in errors.items():
        sums = np.bincount(blocks, weights=[per_layer[l.name] for l in profile.layers], minlength=profile.num_blocks)
        traces.append(dict(type="scatter", x=np.arange(profile.num_blocks), y=np.where(sums > 0, sums, np.nan),
                           mode="lines+markers", name=(labels or {}).get(label, method_label(label)),
                           line=dict(color=METHOD_COLORS.get(_base(label))), hovertemplate="block %{x}: Σ ε = %{y:.3g}"))
    return _figure(traces, dict(title=dict(text="Predicted error per block (current error model)"),
                                xaxis=dict(title=dict(text="block")),
                                yaxis=dict(title=dict(text="Σ ε_l (log)"), type="log"), height=340,
                                margin=dict(t=50, b=40)))


def budget_sweep_figure(sweep: pd.DataFrame, measured: pd.DataFrame | None = None) -> go.Figure:
    """Predicted error against realised ratio per method (lines, log y), measured KL overlaid (x, right axis).

    ``sweep`` is ``tables.sweep_frame``; ``measured`` is ``tables.measured_points`` (stored
    results of this model). The two are on separate log axes: the surrogate is not in KL units.
    """
    fig = go.Figure()
    for method, rows in sweep.groupby("method", sort=False):
        fig.add_trace(go.Scatter(x=rows["realised ratio"], y=rows["predicted error"], mode="lines+markers",
                                 name=f"{method} (predicted)", line=dict(color=METHOD_COLORS.get(_base(method))),
                                 hovertemplate="ratio %{x:.3f}: Σ ε = %{y:.3g}"))
    if measured is not None and not measured.empty:
        for method, rows in measured.groupby("method", sort=False):
            fig.add_trace(go.Scatter(x=rows["realised ratio"], y=rows["kl"], mode="markers", yaxis="y2",
                                     name=f"{method} (measured KL)", marker=dict(symbol="x", size=10,
                                     color=METHOD_COLORS.get(_base(method))),
                                     customdata=rows["protocol"], hovertemplate="ratio %{x:.3f}: KL %{y:.3g} "
                                                                                "(%{customdata})"))
        fig.update_layout(yaxis2=dict(title="measured KL (log)", type="log", overlaying="y", side="right"))
    fig.update_layout(title="Budget sweep: predicted error vs kept ratio", xaxis_title="realised param ratio",
                      yaxis_title="Σ ε (log)", yaxis_type="log", height=420, margin=dict(t=50, b=40))
    return fig


# --------------------------------------------------------------------- results
def ppl_vs_ratio_figure(frame: pd.DataFrame, dataset: str, ratio_column: str = "realised_ratio") -> go.Figure:
    """Perplexity on one dataset against the realised param ratio.

    One line per (method, decomposition, protocol): results measured with different
    windows / sequence lengths are never joined (LEMS@0.8 is 65.9 on 16 x 512 tokens and
    52.0 on all 2048-token windows; both are right). Axes are fitted to the finite
    data: x to the ratios measured, y (log) from below the dense perplexity to the
    largest value under ``PPL_CEILING``; diverged runs above it sit on the top edge as
    triangles, with the real value in the hover.
    """
    column, dense = f"ppl {dataset}", f"dense ppl {dataset}"
    if column not in frame or ratio_column not in frame or frame[column].isna().all():
        return go.Figure(layout=dict(title=f"No perplexity on {dataset} yet", height=200))
    data = frame.copy()
    data[column] = pd.to_numeric(data[column], errors="coerce")
    data[ratio_column] = pd.to_numeric(data[ratio_column], errors="coerce")
    data = data[np.isfinite(data[column]) & (data[column] > 0) & np.isfinite(data[ratio_column])]
    if data.empty:
        return go.Figure(layout=dict(title=f"No finite perplexity on {dataset} yet", height=200))
    data = data.sort_values(ratio_column)
    dense_ppl = float(data[dense].median()) if dense in data and data[dense].notna().any() else None
    in_range = data.loc[data[column] <= PPL_CEILING, column]
    low = min([float(data[column].min())] + ([dense_ppl] if dense_ppl else []))
    high = float(in_range.max()) if not in_range.empty else PPL_CEILING
    top = min(PPL_CEILING, high) * 1.3
    keys = [c for c in ("method", "decomposition", "protocol") if c in data]
    several = {c: data[c].nunique() > 1 for c in keys}
    fig = go.Figure()
    for group, rows in (data.groupby(keys, sort=False, dropna=False) if keys else [((), data)]):
        group = group if isinstance(group, tuple) else (group,)
        values = dict(zip(keys, group))
        name = " · ".join(str(values[c]) for c in keys if c == "method" or several[c]) or "results"
        off = rows[column] > PPL_CEILING
        method = str(values.get("method", ""))
        fig.add_trace(go.Scatter(
            x=rows[ratio_column], y=np.where(off, top / 1.15, rows[column]), mode="lines+markers", name=name,
            line=dict(color=METHOD_COLORS.get(_METHOD_KEYS.get(method, method)),
                      dash=_DASHES[sorted(data["protocol"].unique()).index(values["protocol"]) % len(_DASHES)]
                      if "protocol" in values and several.get("protocol") else "solid"),
            marker=dict(symbol=np.where(off, "triangle-up", "circle"), size=np.where(off, 11, 7)),
            customdata=rows[[column] + [c for c in _HOVER if c in rows]].astype(object).to_numpy(),
            hovertemplate="ratio %{x:.4f}<br>ppl %{customdata[0]:.4g}"
                          + "".join(f"<br>{c} %{{customdata[{i + 1}]}}" for i, c in enumerate(c for c in _HOVER if c in rows))
                          + f"<extra>{name}</extra>"))
    if dense_ppl:
        fig.add_hline(y=dense_ppl, line_dash="dot", line_color=REFERENCE_LINE, annotation_text="dense")
    lo_x, hi_x = float(data[ratio_column].min()), float(data[ratio_column].max())
    pad = max(0.02, 0.05 * (hi_x - lo_x))
    fig.update_xaxes(range=[max(0.0, lo_x - pad), min(1.05, hi_x + pad)])
    fig.update_yaxes(type="log", range=[np.log10(low / 1.3), np.log10(top)])
    off_scale = int((data[column] > PPL_CEILING).sum())
    fig.update_layout(title=dict(text=f"Perplexity on {dataset} vs realised param ratio", subtitle=dict(
                          text=f"{off_scale} diverged run(s) above {PPL_CEILING:g} drawn at the top edge (▲)"
                          if off_scale else "one line per method, decomposition and protocol")),
                      xaxis_title="realised param ratio", yaxis_title="perplexity (log)", height=440,
                      margin=dict(t=70, b=40))
    return fig


_HOVER = ("budget", "decomposition", "protocol", "windows", "seq len", "kl", "source")
_METHOD_KEYS = {method_label(k): k for k in METHOD_COLORS}


def _base(label: str) -> str:
    """The method key of a comparison label ("uploaded" stays itself)."""
    return _METHOD_KEYS.get(label, label)


def accuracy_vs_ratio_figure(frame: pd.DataFrame, column: str, ratio_column: str = "realised_ratio") -> go.Figure:
    """A zero-shot accuracy column ("mean acc", "acc piqa", ...) against the realised param ratio, per method."""
    if column not in frame or frame[column].isna().all():
        return go.Figure(layout=dict(title=f"No {column} yet", height=200))
    data = frame.dropna(subset=[column]).sort_values(ratio_column)
    several = "decomposition" in data and data["decomposition"].nunique() > 1
    fig = px.line(data, x=ratio_column, y=column, color="method" if "method" in data else None, markers=True,
                  line_dash="decomposition" if several else None,
                  hover_data=[c for c in ("budget", "decomposition", "device") if c in data],
                  color_discrete_map={method_label(k): v for k, v in METHOD_COLORS.items()})
    dense = f"dense {column}"
    if dense in data and data[dense].notna().any():
        fig.add_hline(y=float(data[dense].median()), line_dash="dot", annotation_text="dense")
    fig.update_layout(title=f"Zero-shot {column} vs realised param ratio", xaxis_title="realised param ratio",
                      yaxis_title=column, height=420, margin=dict(t=50, b=40))
    return fig


# ------------------------------------------------------------ predicted vs measured
def prediction_scatter_figure(frame: pd.DataFrame, measure: str, correlations: pd.DataFrame | None = None) -> go.Figure:
    """Measured ``measure`` ("KL" or a "ppl <dataset>" column) against predicted Σ ε, log axes, one colour per allocator.

    ``frame`` is ``tables.prediction_frame``; ``correlations`` (``tables.correlation_frame``)
    puts each allocator's Spearman ρ in its legend entry and the overall one in the title.
    Marker shape tells shipped results from the cache's own.
    """
    data = frame[pd.to_numeric(frame[measure], errors="coerce") > 0] if measure in frame else frame.iloc[0:0]
    data = data[pd.to_numeric(data["predicted Σ ε"], errors="coerce") > 0]
    if data.empty:
        return go.Figure(layout=dict(title=f"No results with ranks and {measure} for this profile yet", height=200))
    rho = _rho_column(correlations, measure)
    fig = go.Figure()
    for method, rows in data.groupby("method", sort=False):
        value = rho.get(method)
        fig.add_trace(go.Scatter(
            x=rows["predicted Σ ε"], y=rows[measure], mode="markers",
            name=method + (f" · ρ={value:.2f}" if value is not None else ""),
            marker=dict(color=METHOD_COLORS.get(_base(method)), size=10,
                        symbol=np.where(rows["source"] == "shipped", "circle", "diamond")),
            customdata=rows[["budget", "realised ratio", "protocol", "source"]].astype(object).to_numpy(),
            hovertemplate="Σ ε %{x:.3g}, " + measure + " %{y:.4g}<br>budget %{customdata[0]:.2f}, ratio "
                          "%{customdata[1]:.3f}<br>%{customdata[2]} · %{customdata[3]}<extra>" + method + "</extra>"))
    overall = rho.get("all results")
    subtitle = (f"Spearman ρ over all {len(data)} results: {overall:.2f}" if overall is not None
                else f"{len(data)} result(s): too few for a rank correlation")
    fig.update_layout(title=dict(text=f"Predicted Σ ε vs measured {measure}", subtitle=dict(
                          text=subtitle + " · ● shipped, ◆ this cache's")),
                      xaxis=dict(title="predicted Σ ε (profile's error model, log)", type="log"),
                      yaxis=dict(title=f"measured {measure} (log)", type="log"), legend_title="allocator · ρ",
                      height=440, margin=dict(t=70, b=40))
    return fig


def _rho_column(correlations: pd.DataFrame | None, measure: str) -> dict[str, float]:
    """allocator label -> Spearman ρ for ``measure`` from ``tables.correlation_frame`` (finite values only)."""
    if correlations is None or correlations.empty:
        return {}
    column = "ρ predicted vs KL" if measure == "KL" else f"ρ predicted vs PPL {measure.removeprefix('ppl ')}"
    if column not in correlations:
        return {}
    return {str(a): float(v) for a, v in zip(correlations["allocator"], correlations[column]) if np.isfinite(v)}


def layer_fit_figure(profile: Profile, fits: list, params: ErrorModelParams | None = None, points: int = 60) -> go.Figure:
    """Per layer: the fitted single-layer curve (line) vs the measured KL points (x), residuals below.

    ``fits`` are ``prediction_check.layer_fits``; residuals are log10(measured / fitted)
    in decades (0 = exact; the reference point is 0 by construction). Points under 3x
    the KL floor are hollow: the measurement there is mostly the floor.
    """
    from plotly.subplots import make_subplots

    from lems_core.prediction_check import fitted_curve

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.68, 0.32], vertical_spacing=0.06)
    grid = np.linspace(0.02, 0.98, points)
    styles = _line_styles(profile, [f.name for f in fits])
    for fit in fits:
        style = styles[fit.name]
        color = KIND_COLORS.get(fit.kind)
        curve = fitted_curve(profile, fit.name, grid, params)
        fig.add_trace(go.Scatter(x=grid, y=np.maximum(curve, _LOG_FLOOR), mode="lines", **style), row=1, col=1)
        symbols = np.where(fit.near_floor, "x-open", "x")
        fig.add_trace(go.Scatter(x=fit.ratios, y=np.maximum(fit.measured, _LOG_FLOOR), mode="markers",
                                 showlegend=False, legendgroup=fit.kind, hovertemplate=style["hovertemplate"],
                                 marker=dict(color=color, size=9, symbol=symbols)), row=1, col=1)
        fig.add_trace(go.Scatter(x=fit.ratios, y=fit.residuals, mode="markers+lines", showlegend=False,
                                 legendgroup=fit.kind, line=dict(color=color, width=1, dash=style["line"]["dash"]),
                                 marker=dict(color=color, size=7, symbol=symbols),
                                 hovertemplate=f"{fit.name}<br>c=%{{x:.2f}}: %{{y:+.2f}} decades<extra></extra>"),
                      row=2, col=1)
    fig.add_hline(y=0, line_dash="dot", line_color=REFERENCE_LINE, row=2, col=1)
    fig.update_yaxes(type="log", title_text="single-layer KL (log)", row=1, col=1)
    fig.update_yaxes(title_text="log10 measured / fitted", row=2, col=1)
    fig.update_xaxes(title_text="kept ratio c = r / eq rank", row=2, col=1)
    title = _titled("Fitted error curve (line) vs measured KL (x), residuals below", profile, [f.name for f in fits])
    fig.update_layout(title=title, legend_title="kind · block", height=600, margin=dict(t=70, b=40))
    return fig


# --------------------------------------------------------------------- helpers
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def _block_dashes(profile: Profile, names: list[str]) -> dict[int, str]:
    """Line dash per selected block (cycled when more blocks than dash styles)."""
    blocks = sorted({profile.layer(n).block for n in names})
    return {b: _DASHES[i % len(_DASHES)] for i, b in enumerate(blocks)}


def _line_styles(profile: Profile, names: list[str]) -> dict[str, dict]:
    """Scatter kwargs per layer: colour by kind, dash by block; the legend names both (grouped by kind)."""
    dashes, styles = _block_dashes(profile, names), {}
    for name in names:
        layer = profile.layer(name)
        styles[name] = dict(
            name=f"{layer.kind} · block {layer.block}", legendgroup=layer.kind, legendgrouptitle_text=layer.kind,
            line=dict(color=KIND_COLORS.get(layer.kind), width=1.5, dash=dashes[layer.block]),
            hovertemplate=f"{name}<br>x=%{{x:.3g}}, y=%{{y:.3g}}<extra>block {layer.block}</extra>")
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


def _heat_hover(with_text: bool) -> str:
    extra = "<br>rank %{text}" if with_text else ""
    return "block %{y}, %{x}: %{z:.3f}" + extra + "<extra></extra>"
