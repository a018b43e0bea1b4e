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

from app_pages.tables import layer_table, method_label, ranks_frame

KIND_COLORS = dict(zip(KINDS, px.colors.qualitative.Plotly))
METHOD_COLORS = {"lems": "#1f77b4", "uniform": "#7f7f7f", "svdllm_v2": "#ff7f0e", "mrcs": "#2ca02c",
                 "asvd": "#9467bd", "ars": "#8c564b", "atp": "#e377c2", "uploaded": "#17becf",
                 "erc_plc": "#bcbd22", "lcsvd_search": "#d62728"}
_LABELLED_ROWS = 16  # heatmaps with at most this many blocks get cell labels
_LOG_FLOOR = 1e-12  # residual energy reaches exactly 0 at full rank; log axes need > 0


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
                      legend_title="kind", height=440, margin=dict(t=70, b=40))
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


def error_by_block_figure(profile: Profile, errors: Mapping[str, Mapping[str, float]]) -> go.Figure:
    """Predicted error summed per block, one bar group per label (``tables.predicted_error_tables`` output)."""
    blocks = np.array([l.block for l in profile.layers])
    fig = go.Figure()
    for label, per_layer in errors.items():
        sums = np.bincount(blocks, weights=[per_layer[l.name] for l in profile.layers], minlength=profile.num_blocks)
        fig.add_trace(go.Bar(x=np.arange(profile.num_blocks), y=sums, name=method_label(label),
                             marker_color=METHOD_COLORS.get(label)))
    fig.update_layout(barmode="group", title="Predicted error per block (current error model)",
                      xaxis_title="block", yaxis_title="Σ ε_l", height=340, margin=dict(t=50, b=40))
    return fig


# --------------------------------------------------------------------- results
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


def _heat_hover(with_text: bool) -> str:
    extra = "<br>rank %{text}" if with_text else ""
    return "block %{y}, %{x}: %{z:.3f}" + extra + "<extra></extra>"
