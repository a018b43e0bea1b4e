"""One look per allocation method on every page: display name, colour and marker symbol.

Figures (``figures.py``), tables (``tables.py``) and the pages' messages take names and
colours from here only, so a method looks the same everywhere and no two methods share
a colour. Colours: the Okabe-Ito palette first (told apart under the common colour-vision
deficiencies), then hues of middle lightness that read on the light and the dark theme;
every method also has its own marker symbol, so two methods whose colours a colour-blind
reader confuses still differ by shape. Reserved symbols: "x" for measured points, "triangle-up"
for values off the top of an axis, "-open" variants for the user's own results. tests/test_figures.py checks that every allocator
of lems_core's registry has a style and that the colours are pairwise distinct.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodStyle:
    """How one method is shown: its display name, line/marker colour, marker symbol and line dash."""

    name: str
    color: str
    marker: str
    dash: str = "solid"


METHOD_STYLES: dict[str, MethodStyle] = {
    "lems": MethodStyle("LEMS", "#0072B2", "circle"),
    "lems_fixed": MethodStyle("LEMS (fixed bias)", "#56B4E9", "square"),
    "lems_fit": MethodStyle("LEMS (bias fitted on the model)", "#AA4499", "diamond"),
    "lems_mp": MethodStyle("LEMS-MP", "#5E4FA2", "star-triangle-up"),
    # the baseline: dark grey and dashed, drawn on top of the others (figure_base.draw_order)
    "uniform": MethodStyle("Uniform", "#5A5A5A", "diamond-tall", "dash"),
    "svdllm_v2": MethodStyle("SVD-LLM V2", "#D55E00", "triangle-down"),
    "mrcs": MethodStyle("MRCS", "#009E73", "pentagon"),
    "mrcs_dense": MethodStyle("MRCS (untouched dense)", "#66A61E", "hexagon"),
    "atp": MethodStyle("ATP", "#CC79A7", "star"),
    "asvd": MethodStyle("ASVD (STRS)", "#E69F00", "triangle-left"),
    "asvd_kl": MethodStyle("ASVD (KL)", "#A6761D", "triangle-right"),
    "ars": MethodStyle("ARS", "#E7298A", "hourglass"),
    "erc_plc": MethodStyle("ERC-SVD (PLC)", "#B2182B", "bowtie"),
    "lcsvd_search": MethodStyle("LC-SVD search", "#BCBD22", "star-diamond"),
    "uploaded": MethodStyle("uploaded", "#17BECF", "hexagram"),
}
# The dense model: reference lines ("dense" on the perplexity plot, a reference ratio). Mid grey
# reads on the light and the dark theme.
DENSE = MethodStyle("Dense", "#8C8C8C", "line-ew", "dot")
# Methods without a style of their own (a newly registered allocator) take one of these, by name.
_SPARE_COLORS = ("#1B9E77", "#7570B3", "#E6AB02", "#666666", "#A6CEE3", "#FB9A99")
_SPARE_MARKERS = ("circle-open", "square-open", "diamond-open", "star-open")

# Block x kind facets use one colour per layer kind (not a method colour): the Okabe-Ito order.
KIND_COLORS = {"q": "#0072B2", "k": "#E69F00", "v": "#009E73", "o": "#D55E00", "gate": "#CC79A7",
               "up": "#56B4E9", "down": "#999933"}

SOURCE_LABELS = {"cache": "yours", "shipped": "shipped"}  # a result's source: the user's own runs vs the shipped study


def method_style(method: str) -> MethodStyle:
    """The style of a method key ("lems") or display name ("LEMS"); a stable spare one for others."""
    key = method_key(method)
    if key in METHOD_STYLES:
        return METHOD_STYLES[key]
    pick = zlib.crc32(key.encode())
    return MethodStyle(key, _SPARE_COLORS[pick % len(_SPARE_COLORS)], _SPARE_MARKERS[pick % len(_SPARE_MARKERS)])


def display_name(method: str) -> str:
    """The display name of a method key ("lems_fixed" -> "LEMS (fixed bias)"); other text unchanged."""
    style = METHOD_STYLES.get(str(method))
    return style.name if style is not None else str(method)


def method_key(label: str) -> str:
    """The method key of a display name ("SVD-LLM V2" -> "svdllm_v2"); keys and other labels unchanged."""
    return _KEYS.get(str(label), str(label))


def method_color(method: str) -> str:
    return method_style(method).color


def method_marker(method: str) -> str:
    return method_style(method).marker


def source_label(source) -> str:
    """How a result's source is shown: "yours" for the user's own runs, "shipped" for the demo study."""
    return SOURCE_LABELS.get(str(source), "" if source is None else str(source))


def display_names_in(text: str) -> str:
    """``text`` with every method key written as a whole word replaced by its display name.

    For messages from lems_core, which name methods by key ("ars does not honour layer
    constraints; use one of lems, lems_fixed, ..."): the user sees the names of the menus.
    """
    return _KEY_PATTERN.sub(lambda m: METHOD_STYLES[m.group(0)].name, str(text))


_KEYS = {style.name: key for key, style in METHOD_STYLES.items()}
# Longest keys first, so "lems_fixed" is not read as "lems"; "uploaded" is an ordinary word in messages.
_KEY_PATTERN = re.compile(r"(?<![\w./-])(" + "|".join(
    re.escape(k) for k in sorted(METHOD_STYLES, key=len, reverse=True) if k != "uploaded") + r")(?![\w/-]|\.\w)")
