"""Figures of the Allocate page: rank heatmaps, per-block lines and the budget sweep.

These are redrawn on every budget move, so most are built as plain specs
(``figure_base.plain_figure``, no per-property validation). Ranks and kept fractions
follow the conventions of ``app_pages/tables.py``.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from lems_core.budget import layer_param_cost
from lems_core.profile import Profile

from app_pages import style
from app_pages.figure_base import (BOTTOM_MARGIN, LEGEND_RIGHT, LEGEND_ROW, draw_order, legend_width, log_axis,
                                   method_look, plain_figure)
from app_pages.tables import kept_fraction_grid, method_label, rank_grid

# Heatmaps with at most this many blocks get cell labels, 12 px in rows 24 px tall; larger grids (the
# demo's 30 blocks, 8B models' 32) have the values in the hover only: cells too small to read.
_LABELLED_ROWS = 16
_CELL_FONT = 12  # px: heatmap cell labels


def heatmap_labelled(rows: int) -> bool:
    """Whether a block x kind heatmap of ``rows`` blocks draws its cell labels (captions say so)."""
    return rows <= _LABELLED_ROWS


# ------------------------------------------------------------------ allocation
def heatmap_figure(grid: pd.DataFrame, title: str, colorbar: str, text: pd.DataFrame | None = None,
                   diverging: bool = False, zrange: tuple[float, float] | None = None) -> go.Figure:
    """A block (rows) x kind (columns) heatmap; ``diverging`` centres a red-blue scale on 0.

    Cells are labelled (with ``text``, else the value) when ``heatmap_labelled`` says so,
    in 12 px black or white, whichever contrasts more with the cell's colour; otherwise
    the hover has them. Built as a plain spec (``plain_figure``): the Allocate page redraws it
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
    return plain_figure(data, dict(
        title=dict(text=title), xaxis=dict(title=dict(text="kind")), showlegend=False,
        yaxis=dict(title=dict(text="block"), autorange="reversed", **({"dtick": 1} if labelled else {})),
        height=max(300, 90 + _cell_height(len(grid)) * len(grid)), margin=dict(t=50, b=BOTTOM_MARGIN)))


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
    (``heatmap_labelled``). Built as a plain spec (``plain_figure``).
    """
    keys = list(allocations)
    cols = max(1, min(len(keys), 4 if len(keys) > 5 else 5))
    rows = max(1, -(-len(keys) // cols))
    cell = _cell_height(profile.num_blocks)
    upright = cols <= 2  # narrower facets turn the kind labels ("gate", "down") on their side so they do not run together
    facet, top = 30 + cell * profile.num_blocks, 50  # 30 px of facet title
    gap = bottom = 40 if upright else 56  # room for the kind labels under each facet
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
        layout[f"xaxis{axis}"] = dict(domain=[x0, x0 + width], anchor=f"y{axis}",
                                       tickangle=0 if upright else -90)
        layout[f"yaxis{axis}"] = dict(domain=[y0, y1], anchor=f"x{axis}", autorange="reversed",
                                      showticklabels=col == 0, title=dict(text="block" if col == 0 else ""),
                                      **({"dtick": 1} if heatmap_labelled(profile.num_blocks) else {}))
        layout["annotations"].append(dict(text=f"<b>{name}</b>", x=x0 + width / 2, y=y1, xref="paper", yref="paper",
                                          xanchor="center", yanchor="bottom", showarrow=False))
    return plain_figure(data, layout)


def per_block_figure(profile: Profile, allocations: Mapping[str, Mapping[str, int | None]],
                     labels: Mapping[str, str] | None = None) -> go.Figure:
    """Kept fraction of every block (params kept / dense params of its layers), one line per method.

    One point per block and method instead of one bar per layer and method (1,050 bars
    for five methods on the demo); the per-layer detail is in the heatmaps' hover.
    """
    return plain_figure(_kept_traces(profile, allocations, labels), dict(
        title=dict(text="Kept fraction per block"), xaxis=dict(title=dict(text="block")),
        yaxis=_KEPT_AXIS, legend=LEGEND_RIGHT, height=360, margin=dict(t=50, b=BOTTOM_MARGIN)))


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
    traces = _error_traces(profile, errors, labels)
    return plain_figure(traces, dict(title=dict(text="Predicted error per block (current error model)"),
                                     xaxis=dict(title=dict(text="block")), legend=LEGEND_RIGHT,
                                     yaxis=_error_axis(traces), height=340, margin=dict(t=50, b=BOTTOM_MARGIN)))


def block_views_figure(profile: Profile, allocations: Mapping[str, Mapping[str, int | None]],
                       errors: Mapping[str, Mapping[str, float]], labels: Mapping[str, str] | None = None) -> go.Figure:
    """``per_block_figure`` and ``error_by_block_figure`` side by side in one chart with one legend.

    The Allocate page redraws it on every budget move: one chart costs the browser one
    Plotly redraw instead of two, and both panels share the methods' legend (clicking an
    entry hides the method in both)."""
    kept = _kept_traces(profile, allocations, labels)
    error = [dict(trace, xaxis="x2", yaxis="y2", showlegend=False) for trace in _error_traces(profile, errors, labels)]
    both = dict(title=dict(text="block"))
    return plain_figure(kept + error, dict(
        title=dict(text="Per block: kept fraction and predicted error (current error model)"),
        xaxis=dict(both, domain=[0, 0.45], anchor="y"), yaxis=dict(_KEPT_AXIS, anchor="x"),
        xaxis2=dict(both, domain=[0.55, 1], anchor="y2"), yaxis2=dict(_error_axis(error), anchor="x2"),
        legend=LEGEND_RIGHT, height=380, margin=dict(t=50, b=BOTTOM_MARGIN)))


_KEPT_AXIS = dict(title=dict(text="params kept / dense params"), range=[0, 1.05])


def _error_axis(traces: list[dict]) -> dict:
    return dict(title=dict(text="Σ ε_l (log)"), **log_axis(*(t["y"] for t in traces)))


def _kept_traces(profile: Profile, allocations: Mapping[str, Mapping[str, int | None]],
                 labels: Mapping[str, str] | None) -> list[dict]:
    """One line per method: the kept fraction of each block, dense layers counted in the hover."""
    blocks = np.array([l.block for l in profile.layers])
    dense = np.bincount(blocks, weights=[l.params for l in profile.layers], minlength=profile.num_blocks)
    traces = []
    for rank, method in draw_order(allocations):
        ranks = allocations[method]
        costs = [layer_param_cost(l.out_features, l.in_features, ranks.get(l.name)) for l in profile.layers]
        kept = np.bincount(blocks, weights=costs, minlength=profile.num_blocks)
        dense_layers = np.bincount(blocks, weights=[c == l.params for c, l in zip(costs, profile.layers)],
                                   minlength=profile.num_blocks)
        name = (labels or {}).get(method, method_label(method))
        traces.append(dict(
            type="scatter", x=np.arange(profile.num_blocks), y=kept / np.maximum(dense, 1), mode="lines+markers",
            name=name, legendgroup=name, legendrank=rank, **method_look(method), customdata=dense_layers,
            hovertemplate="block %{x}: kept %{y:.3f}, %{customdata:.0f} dense layer(s)"))
    return traces


def _error_traces(profile: Profile, errors: Mapping[str, Mapping[str, float]],
                  labels: Mapping[str, str] | None) -> list[dict]:
    """One line per method: its predicted error summed per block, fully dense blocks (0) as gaps."""
    blocks = np.array([l.block for l in profile.layers])
    traces = []
    for rank, label in draw_order(errors):
        per_layer = errors[label]
        sums = np.bincount(blocks, weights=[per_layer[l.name] for l in profile.layers], minlength=profile.num_blocks)
        name = (labels or {}).get(label, method_label(label))
        traces.append(dict(type="scatter", x=np.arange(profile.num_blocks), y=np.where(sums > 0, sums, np.nan),
                           mode="lines+markers", name=name, legendgroup=name, legendrank=rank, **method_look(label),
                           hovertemplate="block %{x}: Σ ε = %{y:.3g}"))
    return traces


# The sweep's x axis per budget kind: (column of the sweep frame, axis title, hover name, title's x).
SWEEP_AXES = {"params": ("realised ratio", "realised param ratio", "ratio", "kept ratio"),
              "latency": ("predicted latency", "predicted latency fraction (of dense)", "latency", "predicted latency")}


def budget_sweep_figure(sweep: pd.DataFrame, measured: pd.DataFrame | None = None, budget: str = "params") -> go.Figure:
    """Predicted error against the budget's own measure per method (lines, log y), measured KL overlaid (x, right axis).

    ``sweep`` is ``tables.sweep_frame`` (``budget="params"``: x is the realised param
    ratio) or ``allocate_latency.latency_sweep_frame`` (``budget="latency"``: x is the
    plan's predicted latency fraction). ``measured`` is ``tables.measured_points`` (stored
    results of this model, at their param ratio: drawn under a parameter budget only).
    The two are on separate log axes: the surrogate is not in KL units.
    """
    column, axis_title, hover, title = SWEEP_AXES[budget]
    fig = go.Figure()
    groups = {method: rows for method, rows in sweep.groupby("method", sort=False)}
    for rank, method in draw_order(groups):
        rows = groups[method]
        fig.add_trace(go.Scatter(x=rows[column], y=rows["predicted error"], mode="lines+markers",
                                 name=f"{method} (predicted)", legendrank=rank, **method_look(method),
                                 hovertemplate=hover + " %{x:.3f}: Σ ε = %{y:.3g}<extra>" + method + "</extra>"))
    if budget == "params" and measured is not None and not measured.empty:
        _measured_kl_traces(fig, measured)
    width = legend_width([t.name for t in fig.data])
    fig.update_layout(title=f"Budget sweep: predicted error vs {title}", xaxis_title=axis_title,
                      yaxis_title="Σ ε (log)", height=max(420, 140 + LEGEND_ROW * len(fig.data)),
                      # right of the right axis's title: the legend sits at the figure's edge, the margin holds both
                      legend=dict(LEGEND_RIGHT, x=1, xanchor="right", xref="container"),
                      margin=dict(t=50, b=BOTTOM_MARGIN, r=width + 90))
    fig.update_layout(yaxis=log_axis(sweep["predicted error"]))
    return fig


def _measured_kl_traces(fig: go.Figure, measured: pd.DataFrame) -> None:
    """Measured KL of stored results as crosses per method on a right-hand log axis."""
    for method, rows in measured.groupby("method", sort=False):
        fig.add_trace(go.Scatter(x=rows["realised ratio"], y=rows["kl"], mode="markers", yaxis="y2",
                                 name=f"{method} (measured KL)", legendrank=1000 + len(fig.data),
                                 marker=dict(symbol="x", size=10, color=style.method_color(method)),
                                 customdata=rows["protocol"], hovertemplate="ratio %{x:.3f}: KL %{y:.3g} "
                                 "(%{customdata})<extra>" + method + "</extra>"))
    fig.update_layout(yaxis2=dict(title="measured KL (log)", overlaying="y", side="right", **log_axis(measured["kl"])))



def _heat_hover(with_text: bool) -> str:
    extra = "<br>rank %{text}" if with_text else ""
    return "block %{y}, %{x}: %{z:.3f}" + extra + "<extra></extra>"
