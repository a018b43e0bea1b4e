"""Shared pieces of the app's Plotly figures: colours, legend placement, log axes, line styles.

The figure modules (``figures_profile``, ``figures_allocation``, ``figures_results``) build
on these so every chart speaks one visual language; ``chart_template`` is the compact
explicit template the pages send with ``theme=None`` (Streamlit's own theme would add
its template, several kB, to every chart on every rerun). No streamlit here.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from lems_core.model import KINDS
from lems_core.profile import Profile

from app_pages import style

KIND_COLORS = {kind: style.KIND_COLORS.get(kind, "#7F7F7F") for kind in KINDS}
METHOD_COLORS = {key: s.color for key, s in style.METHOD_STYLES.items()}  # from app_pages/style.py
LOG_FLOOR = 1e-12  # residual energy reaches exactly 0 at full rank; log axes need > 0
REFERENCE_LINE = style.DENSE.color  # reference/dense lines: mid grey reads on light and dark themes
LEGEND_RIGHT = dict(x=1.02, xanchor="left", y=1, yanchor="top", tracegroupgap=4)  # outside the plot, clear of the axes
# px under the plot for the tick labels and the x axis title at the template's 14 px font: the
# charts are drawn without automargin (``chart_template``), so the margin must hold them itself.
BOTTOM_MARGIN = 64
LEGEND_ROW = 22  # px per legend entry (Streamlit's theme font), for figures sized to their legend


# The compact template the pages send instead of a Streamlit or Plotly one: Streamlit's font and
# text colours per theme (its light and dark defaults), transparent backgrounds, faint grids.
_THEME_TEXT = {False: "#31333F", True: "#FAFAFA"}  # light, dark
_FONT = '"Source Sans", "Source Sans Pro", sans-serif'


def chart_template(dark: bool = False) -> dict:
    """A small explicit Plotly template (under 1 kB of JSON) matching the app's light or dark theme.

    Sent with ``theme=None``: Streamlit's own theme ships its template (about 3.7 kB) with
    every chart on every rerun, and the Allocate page redraws four charts per budget move.
    Colours of traces are set by the figures themselves (``style.py``); the colorway only
    serves traces without one.
    """
    text = _THEME_TEXT[dark]
    grid = "rgba(250,250,250,0.12)" if dark else "rgba(49,51,63,0.10)"
    # No automargin: it makes Plotly lay a chart out again until the margins settle, about twice the
    # drawing time of these charts in Chromium; the figures set margins that hold their labels instead.
    axis = dict(gridcolor=grid, linecolor=grid, zerolinecolor=grid)
    return dict(layout=dict(
        font=dict(family=_FONT, size=14, color=text), paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)",
        colorway=[s.color for s in style.METHOD_STYLES.values()], xaxis=axis, yaxis=axis,
        hoverlabel=dict(font=dict(family=_FONT, size=13)), title=dict(x=0, xanchor="left", pad=dict(l=4), font=dict(size=16)),
        legend=dict(bgcolor="rgba(0,0,0,0)"), colorscale=dict(sequential="Viridis", diverging="RdBu")))


def plain_figure(data: list[dict], layout: dict) -> go.Figure:
    """A Figure from a plain spec, without Plotly's per-property validation (about 4x faster).

    Only for the figures redrawn on every slider move, whose property names are fixed
    here and checked by tests/test_figures.py (a typo would pass silently otherwise).
    """
    return go.Figure(dict(data=data, layout=layout), _validate=False)


def dense_line(fig: go.Figure, y: float, text: str, log: bool = False) -> None:
    """The dense model's value as a dotted line, labelled at its left end in dark text on a light box
    (read on both themes). On a log axis the label's position is log10(y): Plotly places annotations
    in axis units, so ``add_hline``'s own label went ~30 decades off the plot."""
    fig.add_hline(y=y, line_dash=style.DENSE.dash, line_color=REFERENCE_LINE, line_width=2)
    fig.add_annotation(text=text, x=0.01, xref="paper", xanchor="left", y=np.log10(y) if log else y, yref="y",
                       yanchor="bottom", showarrow=False, font=dict(color="#222222", size=13),
                       bgcolor="rgba(255,255,255,0.85)", bordercolor=REFERENCE_LINE, borderpad=2)


def legend_key(name: str, symbol: str, group: str, rank: int = 0) -> go.Scatter:
    """A legend-only entry: ``symbol`` in the neutral reference grey, toggling ``group``.

    For markers coloured per point (by layer kind): Plotly draws a trace's legend symbol in
    its first point's colour, which would read as "this kind only"."""
    return go.Scatter(x=[None], y=[None], mode="markers", name=name, legendgroup=group, legendrank=rank,
                      marker=dict(symbol=symbol, size=9, color=REFERENCE_LINE), hoverinfo="skip")


DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def block_dashes(profile: Profile, names: list[str]) -> dict[int, str]:
    """Line dash per selected block (cycled when more blocks than dash styles)."""
    blocks = sorted({profile.layer(n).block for n in names})
    return {b: DASHES[i % len(DASHES)] for i, b in enumerate(blocks)}


def line_styles(profile: Profile, names: list[str]) -> dict[str, dict]:
    """Scatter kwargs per layer: colour by kind, dash by block; the legend names both (grouped by kind)."""
    dashes, styles = block_dashes(profile, names), {}
    for name in names:
        layer = profile.layer(name)
        styles[name] = dict(
            name=f"{layer.kind} · block {layer.block}", legendgroup=layer.kind,
            line=dict(color=KIND_COLORS.get(layer.kind), width=1.5, dash=dashes[layer.block]),
            hovertemplate=f"{name}<br>x=%{{x:.3g}}, y=%{{y:.3g}}<extra>block {layer.block}</extra>")
    return styles


def titled(title: str, profile: Profile, names: list[str]) -> dict:
    """A title whose subtitle says which dash is which block (when that fits)."""
    dashes = block_dashes(profile, names)
    if len(dashes) > len(DASHES):
        return dict(text=title, subtitle=dict(text="colour = kind, dash = block (cycled); hover for the layer"))
    legend = ", ".join(f"{style} = block {b}" for b, style in dashes.items())
    return dict(text=title, subtitle=dict(text=f"colour = kind; {legend}"))



def layer_legend_height(profile: Profile, names: list[str], base: int = 440, extra: int = 0) -> int:
    """A height at which the legend of ``line_styles`` (one entry per layer, grouped by kind) and
    ``extra`` entries fits without scrolling; at most 1200 px (narrow the selection beyond)."""
    groups = len({profile.layer(n).kind for n in names}) + extra
    legend = LEGEND_ROW * (len(names) + extra + 1) + LEGEND_RIGHT["tracegroupgap"] * groups
    return int(min(1200, max(base, 130 + legend)))


def legend_width(names: list[str]) -> int:
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


def method_look(method: str) -> dict:
    """Scatter kwargs of a method key or display name: its colour, marker and dash (style.py)."""
    look = style.method_style(method)
    return dict(line=dict(color=look.color, dash=look.dash, width=2.5 if look.dash != "solid" else 2),
                marker=dict(color=look.color, symbol=look.marker, size=8))


def draw_order(items, method_of=str) -> list[tuple[int, object]]:
    """(legend rank, item) with Uniform's items last, so its line is drawn on top of the others'
    (it lies under SVD-LLM V2's at most budgets); the legend keeps the given order."""
    ranked = list(enumerate(items))
    return sorted(ranked, key=lambda pair: style.method_key(method_of(pair[1])) == "uniform")
