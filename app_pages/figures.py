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

from app_pages import style
from app_pages.tables import kept_fraction_grid, layer_table, method_label, rank_grid

KIND_COLORS = {kind: style.KIND_COLORS.get(kind, "#7F7F7F") for kind in KINDS}
METHOD_COLORS = {key: s.color for key, s in style.METHOD_STYLES.items()}  # from app_pages/style.py
# Heatmaps with at most this many blocks get cell labels, 12 px in rows 24 px tall; larger grids (the
# demo's 30 blocks, 8B models' 32) have the values in the hover only: cells too small to read.
_LABELLED_ROWS = 16
_CELL_FONT = 12  # px: heatmap cell labels
_LOG_FLOOR = 1e-12  # residual energy reaches exactly 0 at full rank; log axes need > 0
REFERENCE_LINE = style.DENSE.color  # reference/dense lines: mid grey reads on light and dark themes
LEGEND_RIGHT = dict(x=1.02, xanchor="left", y=1, yanchor="top", tracegroupgap=4)  # outside the plot, clear of the axes
_LEGEND_ROW = 22  # px per legend entry (Streamlit's theme font), for figures sized to their legend
PPL_CEILING = 1e4  # perplexities above this (diverged runs) are drawn at the top edge, marked "off scale"


def heatmap_labelled(rows: int) -> bool:
    """Whether a block x kind heatmap of ``rows`` blocks draws its cell labels (captions say so)."""
    return rows <= _LABELLED_ROWS


# --------------------------------------------------------------------- spectra
def spectra_figure(profile: Profile, names: list[str]) -> go.Figure:
    """Singular values against their index, one line per layer, log y."""
    fig = go.Figure()
    styles = _line_styles(profile, names)
    values = []
    for name in names:
        sigma = np.maximum(profile.spectra[name], _LOG_FLOOR)
        values.append(sigma)
        fig.add_trace(go.Scatter(x=np.arange(1, len(sigma) + 1), y=sigma, mode="lines", **styles[name]))
    fig.update_layout(title=_titled("Singular values", profile, names), xaxis_title="index i", yaxis_title="σ_i",
                      legend_title="kind · block", legend=LEGEND_RIGHT, height=_layer_legend_height(profile, names),
                      margin=dict(t=70, b=40))
    fig.update_yaxes(**log_axis(*values))
    return fig


def residual_energy_figure(profile: Profile, names: list[str], power: int = 2, ref_ratio: float | None = None) -> go.Figure:
    """Normalised residual energy 1 - E(r)/E against r / eq rank (the per-layer param ratio)."""
    fig = go.Figure()
    styles, values = _line_styles(profile, names), []
    for name in names:
        layer, sigma = profile.layer(name), profile.spectra[name]
        ranks = np.arange(0, min(len(sigma), layer.eq_rank) + 1)
        resid = np.maximum(residual_energy(sigma, ranks, power), _LOG_FLOOR)
        values.append(resid)
        fig.add_trace(go.Scatter(x=ranks / max(layer.eq_rank, 1), y=resid, mode="lines", **styles[name]))
    if ref_ratio is not None:
        fig.add_vline(x=ref_ratio, line_dash="dot", line_color=REFERENCE_LINE, annotation_text=f"reference {ref_ratio:g}",
                      annotation_font_color=REFERENCE_LINE)
    fig.update_layout(title=_titled(f"Residual energy (power {power}) vs kept ratio", profile, names),
                      xaxis_title="rank / eq rank", yaxis_title="1 − E(r)/E", legend_title="kind · block",
                      legend=LEGEND_RIGHT, height=_layer_legend_height(profile, names), margin=dict(t=70, b=40))
    fig.update_yaxes(**log_axis(*values))
    return fig


# ----------------------------------------------------------------- sensitivity
def kl_scale_figure(profile: Profile) -> go.Figure:
    """Measured KL scale per layer (only that layer at the reference ratio), coloured by kind."""
    table = layer_table(profile).reset_index(names="position")
    fig = px.bar(table, x="position", y="KL scale", color="kind", color_discrete_map=KIND_COLORS,
                 hover_data=["name", "block", "out x in"], category_orders={"kind": list(KINDS)})
    fig.update_layout(title=f"Measured KL with one layer at ratio {profile.ref_ratio:g}", legend=LEGEND_RIGHT,
                      xaxis_title="layer (model order)", height=380, bargap=0.05, margin=dict(t=50, b=40))
    fig.update_yaxes(**log_axis(table["KL scale"]))
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
    styles, values = _line_styles(profile, names), []
    for name in names:
        layer, i = profile.layer(name), index[name]
        curve = scale[i] * spectral_shape(profile.spectra[name], (ratios * layer.eq_rank).astype(int), layer.eq_rank, fit)
        values.append(np.maximum(curve, _LOG_FLOOR))
        fig.add_trace(go.Scatter(x=ratios, y=values[-1], mode="lines", **styles[name]))
    if measurements:
        fig.add_trace(_measured_trace(profile, names, measurements))
        values.append(np.asarray(fig.data[-1].y, dtype=float))
    fig.update_layout(title=_titled("Fitted error curves (lines) vs measured KL (×)", profile, names),
                      xaxis_title="kept ratio c = r / eq rank", yaxis_title="KL (scale × shape)",
                      legend_title="kind · block", legend=LEGEND_RIGHT,
                      height=_layer_legend_height(profile, names, extra=1), margin=dict(t=70, b=40))
    fig.update_yaxes(**log_axis(*values))
    return fig


def _measured_trace(profile: Profile, names: list[str], measurements: dict[float, np.ndarray]) -> go.Scatter:
    """Every measured single-layer KL of ``names`` as one legend entry, "measured KL (×)", coloured by kind."""
    index = {l.name: i for i, l in enumerate(profile.layers)}
    xs, ys, colors, hover = [], [], [], []
    for name in names:
        layer = profile.layer(name)
        for ratio in sorted(measurements):
            xs.append(ratio)
            ys.append(float(measurements[ratio][index[name]]))
            colors.append(KIND_COLORS.get(layer.kind))
            hover.append(f"{name}<br>measured at c={ratio:g}")
    return go.Scatter(x=xs, y=ys, mode="markers", name="measured KL (×)", legendgroup="measured", legendrank=0,
                      marker=dict(color=colors, size=9, symbol="x"), hovertext=hover,
                      hovertemplate="%{hovertext}: KL %{y:.3g}<extra></extra>")


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

    Cells are labelled (with ``text``, else the value) when ``heatmap_labelled`` says so,
    in 12 px black or white, whichever contrasts more with the cell's colour; otherwise
    the hover has them. Built as a plain spec (``_figure``): the Allocate page redraws it
    on every budget move.
    """
    z = grid.to_numpy(dtype=float)
    labelled = heatmap_labelled(len(grid))
    if diverging:
        bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() and np.nanmax(np.abs(z)) > 0 else 1.0
        zrange = (-bound, bound)
    scale = "RdBu" if diverging else "Viridis"
    heat = dict(type="heatmap", z=z, x=list(grid.columns), y=list(grid.index), colorscale=scale,
                colorbar=dict(title=dict(text=colorbar)), hovertemplate=_heat_hover(text is not None))
    if zrange is not None:
        heat |= dict(zmin=zrange[0], zmax=zrange[1])
    if text is not None:
        heat["text"] = text.to_numpy()
    data = [heat]
    if labelled:
        labels = text.to_numpy() if text is not None else np.vectorize(lambda v: "" if v != v else f"{v:.2f}")(z)
        data.append(_cell_labels(grid, z, labels, scale, zrange))
    return _figure(data, dict(
        title=dict(text=title), xaxis=dict(title=dict(text="kind")), showlegend=False,
        yaxis=dict(title=dict(text="block"), autorange="reversed", **({"dtick": 1} if labelled else {})),
        height=max(300, 90 + _cell_height(len(grid)) * len(grid)), margin=dict(t=50, b=40)))


def _cell_height(rows: int) -> int:
    """Pixels per heatmap row: room for a 12 px label where cells are labelled."""
    return 24 if heatmap_labelled(rows) else 14


def _cell_labels(grid: pd.DataFrame, z: np.ndarray, labels: np.ndarray, scale: str,
                 zrange: tuple[float, float] | None, axes: tuple[str, str] = ("x", "y")) -> dict:
    """A text-only scatter trace over a heatmap's cells: ``labels``, each black or white for contrast.

    Plotly's own heatmap labels take one font colour (Streamlit's theme sets it), which is
    unreadable on half of a Viridis or RdBu scale; a scatter trace takes one per cell."""
    lo, hi = zrange if zrange is not None else (np.nanmin(z), np.nanmax(z))
    rows, cols = np.meshgrid(np.arange(len(grid.index)), np.arange(len(grid.columns)), indexing="ij")
    keep = np.isfinite(z).ravel()
    where = np.clip((z - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(z)
    colors = [cell_text_color(c) for c in px.colors.sample_colorscale(scale, where.ravel()[keep].tolist())]
    return dict(type="scatter", mode="text", xaxis=axes[0], yaxis=axes[1], hoverinfo="skip", showlegend=False,
                x=np.asarray(grid.columns)[cols.ravel()[keep]].tolist(),
                y=np.asarray(grid.index)[rows.ravel()[keep]].tolist(),
                text=[str(t) for t in np.asarray(labels, dtype=object).ravel()[keep]],
                textfont=dict(size=_CELL_FONT, color=colors))


def cell_text_color(rgb: str) -> str:
    """Black or white, whichever contrasts more (WCAG) with the colour "rgb(r, g, b)" or "#rrggbb"."""
    if rgb.startswith("#"):
        channels = [int(rgb[i:i + 2], 16) for i in (1, 3, 5)]
    else:
        channels = [float(c) for c in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3]]
    linear = [(c / 255) / 12.92 if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in channels]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "#111111" if (luminance + 0.05) / 0.05 > 1.05 / (luminance + 0.05) else "#FFFFFF"


def rank_heatmaps_figure(profile: Profile, allocations: Mapping[str, Mapping[str, int | None]],
                         labels: Mapping[str, str] | None = None) -> go.Figure:
    """Kept fraction per block and kind of every method, side by side in one figure with one colour bar.

    One chart rather than one per method: the Allocate page redraws it on every budget
    move, and each chart costs the browser a full Plotly redraw. The hover has each
    cell's rank (D = dense); cells carry it as text only where they are large enough
    (``heatmap_labelled``). Built as a plain spec (``_figure``).
    """
    keys = list(allocations)
    cols = max(1, min(len(keys), 4 if len(keys) > 5 else 5))
    rows = max(1, -(-len(keys) // cols))
    cell = _cell_height(profile.num_blocks)
    facet, gap, top, bottom = 30 + cell * profile.num_blocks, 40, 50, 40  # 30 px of facet title, 40 of ticks
    plot = rows * facet + (rows - 1) * gap
    height = top + bottom + plot
    data, layout = [], dict(height=height, margin=dict(t=top, b=bottom, l=60, r=20), showlegend=False,
                            title=dict(text="Kept fraction per block and kind (1 = dense)"), annotations=[],
                            coloraxis=dict(colorscale="Viridis", cmin=0.0, cmax=1.0,
                                           colorbar=dict(title=dict(text="kept"), len=min(1.0, 400 / height))))
    width = (1.0 - 0.03 * (cols - 1)) / cols
    for i, key in enumerate(keys):
        row, col = divmod(i, cols)
        axis = "" if i == 0 else str(i + 1)
        grid, ranks = kept_fraction_grid(profile, allocations[key]), rank_grid(profile, allocations[key])
        name = (labels or {}).get(key, method_label(key))
        x0, above = col * (width + 0.03), row * (facet + gap)
        y0, y1 = 1.0 - (above + facet) / plot, 1.0 - (above + 30) / plot
        z = grid.to_numpy(dtype=float)
        data.append(dict(type="heatmap", z=z, x=list(grid.columns), y=list(grid.index), text=ranks.to_numpy(),
                         coloraxis="coloraxis", xaxis=f"x{axis}", yaxis=f"y{axis}",
                         hovertemplate="block %{y}, %{x}: kept %{z:.3f}<br>rank %{text}<extra>" + name + "</extra>"))
        if heatmap_labelled(profile.num_blocks):
            data.append(_cell_labels(grid, z, ranks.to_numpy(), "Viridis", (0.0, 1.0), (f"x{axis}", f"y{axis}")))
        layout[f"xaxis{axis}"] = dict(domain=[x0, x0 + width], anchor=f"y{axis}", tickangle=0)
        layout[f"yaxis{axis}"] = dict(domain=[y0, y1], anchor=f"x{axis}", autorange="reversed",
                                      showticklabels=col == 0, title=dict(text="block" if col == 0 else ""),
                                      **({"dtick": 1} if heatmap_labelled(profile.num_blocks) else {}))
        layout["annotations"].append(dict(text=f"<b>{name}</b>", x=x0 + width / 2, y=y1, xref="paper", yref="paper",
                                          xanchor="center", yanchor="bottom", showarrow=False))
    return _figure(data, layout)


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
    for rank, method in _draw_order(allocations):
        ranks = allocations[method]
        costs = [layer_param_cost(l.out_features, l.in_features, ranks.get(l.name)) for l in profile.layers]
        kept = np.bincount(blocks, weights=costs, minlength=profile.num_blocks)
        dense_layers = np.bincount(blocks, weights=[c == l.params for c, l in zip(costs, profile.layers)],
                                   minlength=profile.num_blocks)
        traces.append(dict(
            type="scatter", x=np.arange(profile.num_blocks), y=kept / np.maximum(dense, 1), mode="lines+markers",
            name=(labels or {}).get(method, method_label(method)), legendrank=rank, **_method_look(method),
            customdata=dense_layers, hovertemplate="block %{x}: kept %{y:.3f}, %{customdata:.0f} dense layer(s)"))
    return _figure(traces, dict(title=dict(text="Kept fraction per block"), xaxis=dict(title=dict(text="block")),
                                yaxis=dict(title=dict(text="params kept / dense params"), range=[0, 1.05]),
                                legend=LEGEND_RIGHT, height=360, margin=dict(t=50, b=40)))


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
    for rank, label in _draw_order(errors):
        per_layer = errors[label]
        sums = np.bincount(blocks, weights=[per_layer[l.name] for l in profile.layers], minlength=profile.num_blocks)
        traces.append(dict(type="scatter", x=np.arange(profile.num_blocks), y=np.where(sums > 0, sums, np.nan),
                           mode="lines+markers", name=(labels or {}).get(label, method_label(label)), legendrank=rank,
                           **_method_look(label), hovertemplate="block %{x}: Σ ε = %{y:.3g}"))
    return _figure(traces, dict(title=dict(text="Predicted error per block (current error model)"),
                                xaxis=dict(title=dict(text="block")), legend=LEGEND_RIGHT,
                                yaxis=dict(title=dict(text="Σ ε_l (log)"), **log_axis(*(t["y"] for t in traces))),
                                height=340, margin=dict(t=50, b=40)))


def budget_sweep_figure(sweep: pd.DataFrame, measured: pd.DataFrame | None = None) -> go.Figure:
    """Predicted error against realised ratio per method (lines, log y), measured KL overlaid (x, right axis).

    ``sweep`` is ``tables.sweep_frame``; ``measured`` is ``tables.measured_points`` (stored
    results of this model). The two are on separate log axes: the surrogate is not in KL units.
    """
    fig = go.Figure()
    groups = {method: rows for method, rows in sweep.groupby("method", sort=False)}
    for rank, method in _draw_order(groups):
        rows = groups[method]
        fig.add_trace(go.Scatter(x=rows["realised ratio"], y=rows["predicted error"], mode="lines+markers",
                                 name=f"{method} (predicted)", legendrank=rank, **_method_look(method),
                                 hovertemplate="ratio %{x:.3f}: Σ ε = %{y:.3g}<extra>" + method + "</extra>"))
    if measured is not None and not measured.empty:
        for method, rows in measured.groupby("method", sort=False):
            fig.add_trace(go.Scatter(x=rows["realised ratio"], y=rows["kl"], mode="markers", yaxis="y2",
                                     name=f"{method} (measured KL)", legendrank=1000 + len(fig.data),
                                     marker=dict(symbol="x", size=10, color=style.method_color(method)),
                                     customdata=rows["protocol"], hovertemplate="ratio %{x:.3f}: KL %{y:.3g} "
                                     "(%{customdata})<extra>" + method + "</extra>"))
        fig.update_layout(yaxis2=dict(title="measured KL (log)", overlaying="y", side="right",
                                      **log_axis(measured["kl"])))
    width = _legend_width([t.name for t in fig.data])
    fig.update_layout(title="Budget sweep: predicted error vs kept ratio", xaxis_title="realised param ratio",
                      yaxis_title="Σ ε (log)", height=max(420, 140 + _LEGEND_ROW * len(fig.data)),
                      # right of the right axis's title: the legend sits at the figure's edge, the margin holds both
                      legend=dict(LEGEND_RIGHT, x=1, xanchor="right", xref="container"),
                      margin=dict(t=50, b=40, r=width + 90))
    fig.update_layout(yaxis=log_axis(sweep["predicted error"]))
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
    groups = list(data.groupby(keys, sort=False, dropna=False)) if keys else [((), data)]
    groups = [(dict(zip(keys, g if isinstance(g, tuple) else (g,))), rows) for g, rows in groups]
    variants = sorted({_variant(values) for values, _ in groups})  # decomposition x protocol: one dash each
    fig = go.Figure()
    for rank, (values, rows) in _draw_order(groups, lambda group: str(group[0].get("method", ""))):
        name = " · ".join(str(values[c]) for c in keys if c == "method" or several[c]) or "results"
        off = rows[column] > PPL_CEILING
        look = _method_look(str(values.get("method", "")))
        if len(variants) > 1:
            look["line"]["dash"] = _DASHES[variants.index(_variant(values)) % len(_DASHES)]
        look["marker"] |= dict(symbol=np.where(off, "triangle-up", look["marker"]["symbol"]), size=np.where(off, 11, 8))
        fig.add_trace(go.Scatter(
            x=rows[ratio_column], y=np.where(off, top / 1.15, rows[column]), mode="lines+markers", name=name,
            legendrank=rank, **look,
            customdata=rows[[column] + [c for c in _HOVER if c in rows]].astype(object).to_numpy(),
            hovertemplate="ratio %{x:.4f}<br>ppl %{customdata[0]:.4g}"
                          + "".join(f"<br>{c} %{{customdata[{i + 1}]}}" for i, c in enumerate(c for c in _HOVER if c in rows))
                          + f"<extra>{name}</extra>"))
    if dense_ppl:
        _dense_line(fig, dense_ppl, f"dense {dense_ppl:.4g}", log=True)
    lo_x, hi_x = float(data[ratio_column].min()), float(data[ratio_column].max())
    pad = max(0.02, 0.05 * (hi_x - lo_x))
    fig.update_xaxes(range=[max(0.0, lo_x - pad), min(1.05, hi_x + pad)])
    fig.update_yaxes(type="log", range=[np.log10(low / 1.3), np.log10(top)])
    off_scale = int((data[column] > PPL_CEILING).sum())
    fig.update_layout(title=dict(text=f"Perplexity on {dataset} vs realised param ratio", subtitle=dict(
                          text=f"{off_scale} diverged run(s) above {PPL_CEILING:g} drawn at the top edge (▲)"
                          if off_scale else "one line per method, decomposition and protocol")),
                      xaxis_title="realised param ratio", yaxis_title="perplexity (log)", height=440,
                      legend=LEGEND_RIGHT, margin=dict(t=70, b=40))
    fig.update_yaxes(log_axis(data.loc[data[column] <= PPL_CEILING, column], [dense_ppl or np.nan]))
    return fig


_HOVER = ("budget", "decomposition", "protocol", "windows", "seq len", "kl", "source")


def _variant(values: Mapping[str, object]) -> tuple[str, str]:
    """(decomposition, protocol) of a result group: lines of one method that must not be joined."""
    return str(values.get("decomposition", "")), str(values.get("protocol", ""))


def _dense_line(fig: go.Figure, y: float, text: str, log: bool = False) -> None:
    """The dense model's value as a dotted line, labelled at its left end in dark text on a light box
    (read on both themes). On a log axis the label's position is log10(y): Plotly places annotations
    in axis units, so ``add_hline``'s own label went ~30 decades off the plot."""
    fig.add_hline(y=y, line_dash=style.DENSE.dash, line_color=REFERENCE_LINE, line_width=2)
    fig.add_annotation(text=text, x=0.01, xref="paper", xanchor="left", y=np.log10(y) if log else y, yref="y",
                       yanchor="bottom", showarrow=False, font=dict(color="#222222", size=13),
                       bgcolor="rgba(255,255,255,0.85)", bordercolor=REFERENCE_LINE, borderpad=2)


def accuracy_vs_ratio_figure(frame: pd.DataFrame, column: str, ratio_column: str = "realised_ratio") -> go.Figure:
    """A zero-shot accuracy column ("mean acc", "acc piqa", ...) against the realised param ratio, per method."""
    if column not in frame or frame[column].isna().all():
        return go.Figure(layout=dict(title=f"No {column} yet", height=200))
    data = frame.dropna(subset=[column]).sort_values(ratio_column)
    several = "decomposition" in data and data["decomposition"].nunique() > 1
    methods = list(dict.fromkeys(data["method"])) if "method" in data else []
    fig = px.line(data, x=ratio_column, y=column, color="method" if methods else None, markers=True,
                  symbol="method" if methods else None, line_dash="decomposition" if several else None,
                  hover_data=[c for c in ("budget", "decomposition", "device") if c in data],
                  category_orders={"method": [m for _, m in _draw_order(methods)]},
                  color_discrete_map={m: style.method_color(m) for m in methods},
                  symbol_map={m: style.method_marker(m) for m in methods})
    dense = f"dense {column}"
    if dense in data and data[dense].notna().any():
        value = float(data[dense].median())
        _dense_line(fig, value, f"dense {value:.3g}")
    fig.update_layout(title=f"Zero-shot {column} vs realised param ratio", xaxis_title="realised param ratio",
                      yaxis_title=column, height=420, legend=LEGEND_RIGHT, margin=dict(t=50, b=40))
    return fig


# ------------------------------------------------------------ predicted vs measured
def prediction_scatter_figure(frame: pd.DataFrame, measure: str, correlations: pd.DataFrame | None = None) -> go.Figure:
    """Measured ``measure`` ("KL" or a "ppl <dataset>" column) against predicted Σ ε, log axes, one colour per allocator.

    ``frame`` is ``tables.prediction_frame``; ``correlations`` (``tables.correlation_frame``)
    puts each allocator's Spearman ρ in its legend entry and the overall one in the title.
    Each allocator has its own colour and marker; filled markers are shipped results, open ones the user's own.
    """
    data = frame[pd.to_numeric(frame[measure], errors="coerce") > 0] if measure in frame else frame.iloc[0:0]
    data = data[pd.to_numeric(data["predicted Σ ε"], errors="coerce") > 0]
    if data.empty:
        return go.Figure(layout=dict(title=f"No results with ranks and {measure} for this profile yet", height=200))
    rho = _rho_column(correlations, measure)
    fig = go.Figure()
    for method, rows in data.groupby("method", sort=False):
        value = rho.get(method)
        marker = style.method_marker(method)
        fig.add_trace(go.Scatter(
            x=rows["predicted Σ ε"], y=rows[measure], mode="markers",
            name=method + (f" · ρ={value:.2f}" if value is not None else ""),
            marker=dict(color=style.method_color(method), size=10, line=dict(width=1.5, color=style.method_color(method)),
                        symbol=np.where(rows["source"] == "shipped", marker, f"{marker}-open")),
            customdata=rows[["budget", "realised ratio", "protocol", "source"]].astype(object).to_numpy(),
            hovertemplate="Σ ε %{x:.3g}, " + measure + " %{y:.4g}<br>budget %{customdata[0]:.2f}, ratio "
                          "%{customdata[1]:.3f}<br>%{customdata[2]} · %{customdata[3]}<extra>" + method + "</extra>"))
    overall = rho.get("all results")
    subtitle = (f"Spearman ρ over all {len(data)} results: {overall:.2f}" if overall is not None
                else f"{len(data)} result(s): too few for a rank correlation")
    fig.update_layout(title=dict(text=f"Predicted Σ ε vs measured {measure}", subtitle=dict(
                          text=subtitle + " · filled: shipped, open: yours")),
                      xaxis=dict(title="predicted Σ ε (profile's error model, log)", **log_axis(data["predicted Σ ε"])),
                      yaxis=dict(title=f"measured {measure} (log)", **log_axis(data[measure])),
                      legend_title="allocator · ρ", legend=LEGEND_RIGHT, height=440, margin=dict(t=70, b=40))
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
    fig.update_yaxes(title_text="single-layer KL (log)", row=1, col=1,
                     **log_axis(*(np.asarray(t.y, dtype=float) for t in fig.data if t.yaxis in (None, "y"))))
    fig.update_yaxes(title_text="log10 measured / fitted", row=2, col=1)
    fig.update_xaxes(title_text="kept ratio c = r / eq rank", row=2, col=1)
    title = _titled("Fitted error curve (line) vs measured KL (x), residuals below", profile, [f.name for f in fits])
    fig.update_layout(title=title, legend_title="kind · block", legend=LEGEND_RIGHT, margin=dict(t=70, b=40),
                      height=_layer_legend_height(profile, [f.name for f in fits], base=600))
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
            name=f"{layer.kind} · block {layer.block}", legendgroup=layer.kind,
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


def _layer_legend_height(profile: Profile, names: list[str], base: int = 440, extra: int = 0) -> int:
    """A height at which the legend of ``_line_styles`` (one entry per layer, grouped by kind) and
    ``extra`` entries fits without scrolling; at most 1200 px (narrow the selection beyond)."""
    groups = len({profile.layer(n).kind for n in names}) + extra
    legend = _LEGEND_ROW * (len(names) + extra + 1) + LEGEND_RIGHT["tracegroupgap"] * groups
    return int(min(1200, max(base, 130 + legend)))


def _legend_width(names: list[str]) -> int:
    """Pixels a vertical legend of these entry names takes (symbol, gap, ~7.5 px per character)."""
    return 50 + int(7.5 * max((len(n) for n in names), default=0))


def log_axis(*values) -> dict:
    """Settings of a log axis over ``values``: numbers as powers of ten (10⁻⁵, never an SI prefix
    such as "10μ" on a unitless ratio) and no piled-up minor labels. Over half a decade to three,
    labels at 1, 2 and 5 of each decade; over more, at most ~8 labelled decades; minor ticks unlabelled."""
    data = np.concatenate([np.asarray(v, dtype=float).ravel() for v in values]) if values else np.array([])
    data = data[np.isfinite(data) & (data > 0)]
    axis = dict(type="log", exponentformat="power", minor=dict(ticks="outside", ticklen=3, showgrid=False))
    span = float(np.log10(data.max() / data.min())) if data.size else 0.0
    if 0.5 <= span <= 3:
        decades = range(int(np.floor(np.log10(data.min()))), int(np.ceil(np.log10(data.max()))) + 1)
        ticks = [(m, e) for e in decades for m in (1, 2, 5)]
        axis |= dict(tickmode="array", tickvals=[m * 10.0 ** e for m, e in ticks],
                     ticktext=[_power_text(m, e) for m, e in ticks], minor=dict(ticks=""))  # minors piled up here
    elif span > 3:
        axis["dtick"] = max(1, int(np.ceil(span / 8)))
    return axis


def _power_text(mantissa: int, exponent: int) -> str:
    """A tick label: plain between 0.001 and 10⁴ ("0.02", "500"), else "2×10⁻⁵" in Plotly's markup."""
    if -3 <= exponent <= 4:
        return f"{mantissa * 10.0 ** exponent:g}"
    power = f"10<sup>{'−' if exponent < 0 else ''}{abs(exponent)}</sup>"
    return power if mantissa == 1 else f"{mantissa}×{power}"


def _method_look(method: str) -> dict:
    """Scatter kwargs of a method key or display name: its colour, marker and dash (style.py)."""
    look = style.method_style(method)
    return dict(line=dict(color=look.color, dash=look.dash, width=2.5 if look.dash != "solid" else 2),
                marker=dict(color=look.color, symbol=look.marker, size=8))


def _draw_order(items, method_of=str) -> list[tuple[int, object]]:
    """(legend rank, item) with Uniform's items last, so its line is drawn on top of the others'
    (it lies under SVD-LLM V2's at most budgets); the legend keeps the given order."""
    ranked = list(enumerate(items))
    return sorted(ranked, key=lambda pair: style.method_key(method_of(pair[1])) == "uniform")


def _heat_hover(with_text: bool) -> str:
    extra = "<br>rank %{text}" if with_text else ""
    return "block %{y}, %{x}: %{z:.3f}" + extra + "<extra></extra>"
