"""Figures of measured results: perplexity and zero-shot accuracy against the realised param ratio.

``frame`` is the results table of ``app_pages/tables.py``; one line per method (and per
decomposition and protocol where those differ), styled by ``app_pages/style.py``.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from app_pages import style
from app_pages.figure_base import (BOTTOM_MARGIN, DASHES, LEGEND_RIGHT, dense_line, draw_order, log_axis,
                                   method_look)

PPL_CEILING = 1e4  # perplexities above this (diverged runs) are drawn at the top edge, marked "off scale"


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
    for rank, (values, rows) in draw_order(groups, lambda group: str(group[0].get("method", ""))):
        name = " · ".join(str(values[c]) for c in keys if c == "method" or several[c]) or "results"
        off = rows[column] > PPL_CEILING
        look = method_look(str(values.get("method", "")))
        if len(variants) > 1:
            look["line"]["dash"] = DASHES[variants.index(_variant(values)) % len(DASHES)]
        look["marker"] |= dict(symbol=np.where(off, "triangle-up", look["marker"]["symbol"]), size=np.where(off, 11, 8))
        fig.add_trace(go.Scatter(
            x=rows[ratio_column], y=np.where(off, top / 1.15, rows[column]), mode="lines+markers", name=name,
            legendrank=rank, **look,
            customdata=rows[[column] + [c for c in _HOVER if c in rows]].astype(object).to_numpy(),
            hovertemplate="ratio %{x:.4f}<br>ppl %{customdata[0]:.4g}"
                          + "".join(f"<br>{c} %{{customdata[{i + 1}]}}" for i, c in enumerate(c for c in _HOVER if c in rows))
                          + f"<extra>{name}</extra>"))
    if dense_ppl:
        dense_line(fig, dense_ppl, f"dense {dense_ppl:.4g}", log=True)
    lo_x, hi_x = float(data[ratio_column].min()), float(data[ratio_column].max())
    pad = max(0.02, 0.05 * (hi_x - lo_x))
    fig.update_xaxes(range=[max(0.0, lo_x - pad), min(1.05, hi_x + pad)])
    fig.update_yaxes(type="log", range=[np.log10(low / 1.3), np.log10(top)])
    off_scale = int((data[column] > PPL_CEILING).sum())
    fig.update_layout(title=dict(text=f"Perplexity on {dataset} vs realised param ratio", subtitle=dict(
                          text=f"{off_scale} diverged run(s) above {PPL_CEILING:g} drawn at the top edge (▲)"
                          if off_scale else "one line per method, decomposition and protocol")),
                      xaxis_title="realised param ratio", yaxis_title="perplexity (log)", height=440,
                      legend=LEGEND_RIGHT, margin=dict(t=70, b=BOTTOM_MARGIN))
    fig.update_yaxes(log_axis(data.loc[data[column] <= PPL_CEILING, column], [dense_ppl or np.nan]))
    return fig


_HOVER = ("budget", "decomposition", "protocol", "windows", "seq len", "kl", "source")


def _variant(values: Mapping[str, object]) -> tuple[str, str]:
    """(decomposition, protocol) of a result group: lines of one method that must not be joined."""
    return str(values.get("decomposition", "")), str(values.get("protocol", ""))



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
                  category_orders={"method": [m for _, m in draw_order(methods)]},
                  color_discrete_map={m: style.method_color(m) for m in methods},
                  symbol_map={m: style.method_marker(m) for m in methods})
    dense = f"dense {column}"
    if dense in data and data[dense].notna().any():
        value = float(data[dense].median())
        dense_line(fig, value, f"dense {value:.3g}")
    fig.update_layout(title=f"Zero-shot {column} vs realised param ratio", xaxis_title="realised param ratio",
                      yaxis_title=column, height=420, legend=LEGEND_RIGHT, margin=dict(t=50, b=BOTTOM_MARGIN))
    return fig
