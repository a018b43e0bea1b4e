"""Figures of the Spectra, Sensitivity and Predicted vs measured pages: per-layer curves of a profile.

Each function takes core objects (Profile, ErrorModelParams, the prediction tables of
``app_pages/tables.py``) and returns a ``plotly.graph_objects.Figure``; lines are coloured
by layer kind and dashed by block (``figure_base.line_styles``).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from lems_core.error_model import ErrorModelParams, depth_bias, residual_energy, spectral_shape
from lems_core.model import KINDS
from lems_core.profile import Profile

from app_pages import style
from app_pages.figure_base import (BOTTOM_MARGIN, KIND_COLORS, LEGEND_RIGHT, LOG_FLOOR, REFERENCE_LINE,
                                   layer_legend_height, legend_key, line_styles, log_axis, titled)
from app_pages.tables import layer_table

MEASURED_KL = "measured KL (×)"  # the legend name of measured single-layer KL crosses

# --------------------------------------------------------------------- spectra
def spectra_figure(profile: Profile, names: list[str]) -> go.Figure:
    """Singular values against their index, one line per layer, log y."""
    fig = go.Figure()
    styles = line_styles(profile, names)
    values = []
    for name in names:
        sigma = np.maximum(profile.spectra[name], LOG_FLOOR)
        values.append(sigma)
        fig.add_trace(go.Scatter(x=np.arange(1, len(sigma) + 1), y=sigma, mode="lines", **styles[name]))
    fig.update_layout(title=titled("Singular values", profile, names), xaxis_title="index i", yaxis_title="σ_i",
                      legend_title="kind · block", legend=LEGEND_RIGHT, height=layer_legend_height(profile, names),
                      margin=dict(t=70, b=BOTTOM_MARGIN))
    fig.update_yaxes(**log_axis(*values))
    return fig


def residual_energy_figure(profile: Profile, names: list[str], power: int = 2, ref_ratio: float | None = None) -> go.Figure:
    """Normalised residual energy 1 - E(r)/E against r / eq rank (the per-layer param ratio)."""
    fig = go.Figure()
    styles, values = line_styles(profile, names), []
    for name in names:
        layer, sigma = profile.layer(name), profile.spectra[name]
        ranks = np.arange(0, min(len(sigma), layer.eq_rank) + 1)
        resid = np.maximum(residual_energy(sigma, ranks, power), LOG_FLOOR)
        values.append(resid)
        fig.add_trace(go.Scatter(x=ranks / max(layer.eq_rank, 1), y=resid, mode="lines", **styles[name]))
    if ref_ratio is not None:
        fig.add_vline(x=ref_ratio, line_dash="dot", line_color=REFERENCE_LINE, annotation_text=f"reference {ref_ratio:g}",
                      annotation_font_color=REFERENCE_LINE)
    fig.update_layout(title=titled(f"Residual energy (power {power}) vs kept ratio", profile, names),
                      xaxis_title="rank / eq rank", yaxis_title="1 − E(r)/E", legend_title="kind · block",
                      legend=LEGEND_RIGHT, height=layer_legend_height(profile, names), margin=dict(t=70, b=BOTTOM_MARGIN))
    fig.update_yaxes(**log_axis(*values))
    return fig


# ----------------------------------------------------------------- sensitivity
def kl_scale_figure(profile: Profile) -> go.Figure:
    """Measured KL scale per layer (only that layer at the reference ratio), coloured by kind."""
    table = layer_table(profile).reset_index(names="position")
    fig = px.bar(table, x="position", y="KL scale", color="kind", color_discrete_map=KIND_COLORS,
                 hover_data=["name", "block", "out x in"], category_orders={"kind": list(KINDS)})
    fig.update_layout(title=f"Measured KL with one layer at ratio {profile.ref_ratio:g}", legend=LEGEND_RIGHT,
                      xaxis_title="layer (model order)", height=380, bargap=0.05, margin=dict(t=50, b=BOTTOM_MARGIN))
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
    styles, values = line_styles(profile, names), []
    for name in names:
        layer, i = profile.layer(name), index[name]
        curve = scale[i] * spectral_shape(profile.spectra[name], (ratios * layer.eq_rank).astype(int), layer.eq_rank, fit)
        values.append(np.maximum(curve, LOG_FLOOR))
        fig.add_trace(go.Scatter(x=ratios, y=values[-1], mode="lines", **styles[name]))
    if measurements:
        fig.add_trace(_measured_trace(profile, names, measurements))
        values.append(np.asarray(fig.data[-1].y, dtype=float))
        fig.add_trace(legend_key(MEASURED_KL, "x", "measured"))
    fig.update_layout(title=titled("Fitted error curves (lines) vs measured KL (×)", profile, names),
                      xaxis_title="kept ratio c = r / eq rank", yaxis_title="KL (scale × shape)",
                      legend_title="kind · block", legend=LEGEND_RIGHT,
                      height=layer_legend_height(profile, names, extra=1), margin=dict(t=70, b=BOTTOM_MARGIN))
    fig.update_yaxes(**log_axis(*values))
    return fig


def _measured_trace(profile: Profile, names: list[str], measurements: dict[float, np.ndarray]) -> go.Scatter:
    """Every measured single-layer KL of ``names``, coloured by kind; its legend entry is a neutral ``legend_key``."""
    index = {l.name: i for i, l in enumerate(profile.layers)}
    xs, ys, colors, hover = [], [], [], []
    for name in names:
        layer = profile.layer(name)
        for ratio in sorted(measurements):
            xs.append(ratio)
            ys.append(float(measurements[ratio][index[name]]))
            colors.append(KIND_COLORS.get(layer.kind))
            hover.append(f"{name}<br>measured at c={ratio:g}")
    return go.Scatter(x=xs, y=ys, mode="markers", name=MEASURED_KL, legendgroup="measured", showlegend=False,
                      marker=dict(color=colors, size=9, symbol="x"), hovertext=hover,
                      hovertemplate="%{hovertext}: KL %{y:.3g}<extra></extra>")


def depth_bias_figure(num_blocks: int, params: ErrorModelParams) -> go.Figure:
    """β_b, the per-block weight of errors (propagation bias), for the current alpha/gamma."""
    beta = depth_bias(num_blocks, params)
    fig = go.Figure(go.Scatter(x=np.arange(num_blocks), y=beta, mode="lines+markers", name="β_b"))
    fig.update_layout(title=f"Depth bias β_b ({params.bias_form}, α={params.alpha:g}, γ={params.gamma:g})",
                      xaxis_title="block b", yaxis_title="β_b", height=320, margin=dict(t=50, b=BOTTOM_MARGIN))
    fig.update_yaxes(rangemode="tozero")
    fig.update_xaxes(tickformat="d", dtick=1 if num_blocks <= 16 else None)
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
                      legend_title="allocator · ρ", legend=LEGEND_RIGHT, height=440, margin=dict(t=70, b=BOTTOM_MARGIN))
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
    styles = line_styles(profile, [f.name for f in fits])
    for fit in fits:
        style = styles[fit.name]
        color = KIND_COLORS.get(fit.kind)
        curve = fitted_curve(profile, fit.name, grid, params)
        fig.add_trace(go.Scatter(x=grid, y=np.maximum(curve, LOG_FLOOR), mode="lines", **style), row=1, col=1)
        symbols = np.where(fit.near_floor, "x-open", "x")
        fig.add_trace(go.Scatter(x=fit.ratios, y=np.maximum(fit.measured, LOG_FLOOR), mode="markers",
                                 showlegend=False, legendgroup=fit.kind, hovertemplate=style["hovertemplate"],
                                 marker=dict(color=color, size=9, symbol=symbols)), row=1, col=1)
        fig.add_trace(go.Scatter(x=fit.ratios, y=fit.residuals, mode="markers+lines", showlegend=False,
                                 legendgroup=fit.kind, line=dict(color=color, width=1, dash=style["line"]["dash"]),
                                 marker=dict(color=color, size=7, symbol=symbols),
                                 hovertemplate=f"{fit.name}<br>c=%{{x:.2f}}: %{{y:+.2f}} decades<extra></extra>"),
                      row=2, col=1)
    keys = _fit_legend_keys(fits)
    for key in keys:
        fig.add_trace(key, row=1, col=1)
    fig.add_hline(y=0, line_dash="dot", line_color=REFERENCE_LINE, row=2, col=1)
    fig.update_yaxes(title_text="single-layer KL (log)", row=1, col=1,
                     **log_axis(*(np.asarray(t.y, dtype=float) for t in fig.data if t.yaxis in (None, "y"))))
    fig.update_yaxes(title_text="log10 measured / fitted", row=2, col=1)
    fig.update_xaxes(title_text="kept ratio c = r / eq rank", row=2, col=1)
    title = titled("Fitted error curve (line) vs measured KL (x), residuals below", profile, [f.name for f in fits])
    fig.update_layout(title=title, legend_title="kind · block", legend=LEGEND_RIGHT, margin=dict(t=70, b=BOTTOM_MARGIN),
                      height=layer_legend_height(profile, [f.name for f in fits], base=600, extra=len(keys)))
    return fig


def _fit_legend_keys(fits: list) -> list[go.Scatter]:
    """Legend entries of the per-layer crosses: measured KL, and hollow ones near the KL floor when there are any."""
    keys = [legend_key(MEASURED_KL, "x", "measured crosses")]
    if any(np.any(fit.near_floor) for fit in fits):
        keys.append(legend_key("near the KL floor (hollow ×)", "x-open", "measured crosses", rank=1))
    return keys


def _measurements(profile: Profile) -> dict[float, np.ndarray]:
    found = {float(r): np.asarray(v) for r, v in profile.measured.items()}
    if profile.kl_ref is not None:
        found[float(profile.ref_ratio)] = np.asarray(profile.kl_ref)
    return found
