"""The Allocate page's views, driven with AppTest (fixtures from test_app and test_app_latency): charts sent
with the app's compact template, the budget slider and the sweep under a latency cost, a missing objective.

The figure modules are checked for their split as well: each imports on its own and the
``figures`` facade still names every figure the pages and tests use.
"""
import importlib
import json
import math
import re
from pathlib import Path

import pytest

from lems_core.allocators import allocate
from lems_core.budget import candidate_ranks
from lems_core.profile import synthetic_profile

import test_app
import test_app_latency
from test_app import goto
from test_app_latency import choose_cost

profile_dir, app, measured = test_app.profile_dir, test_app.app, test_app_latency.measured  # shared fixtures
FIGURE_MODULES = ["figure_base", "figures_profile", "figures_allocation", "figures_results", "figures"]
APP_PAGES = Path(__file__).resolve().parents[1] / "app_pages"


@pytest.mark.parametrize("name", FIGURE_MODULES)
def test_each_figure_module_imports_on_its_own_and_stays_small(name):
    module = importlib.import_module(f"app_pages.{name}")
    assert len((APP_PAGES / f"{name}.py").read_text().splitlines()) < 600
    for exported in getattr(module, "__all__", []):
        assert callable(getattr(module, exported)) or exported.isupper(), exported


def test_the_facade_names_every_figure_the_pages_use():
    from app_pages import figures

    sources = [*APP_PAGES.glob("*.py"), *APP_PAGES.parent.joinpath("tests").glob("test_*.py")]
    used = {name for path in sources for name in re.findall(r"(?<![\w./])figures\.([A-Za-z]\w*)", path.read_text())}
    used.discard("py")  # "figures.py" in docstrings
    assert {"ppl_vs_ratio_figure", "rank_heatmaps_figure", "spectra_figure"} <= used
    assert not used - set(dir(figures)), used - set(dir(figures))


def _chart_specs(at) -> dict[str, tuple[str, dict]]:
    """Every Plotly chart on the page: key-ish title -> (theme sent, parsed spec)."""
    return {json.loads(c.proto.spec)["layout"].get("title", {}).get("text", ""): (c.proto.theme, json.loads(c.proto.spec))
            for c in at.get("plotly_chart")}


def test_allocate_charts_are_sent_with_the_compact_template_and_no_streamlit_theme(app):
    from app_pages.figure_base import chart_template

    goto(app, "app_pages/allocate.py")
    charts = _chart_specs(app)
    assert len(charts) >= 3  # heatmaps, difference, per block
    for title, (theme, spec) in charts.items():
        template = spec["layout"]["template"]
        assert theme == "", title  # theme=None: the browser applies no Streamlit theme of its own
        assert template == chart_template(dark=False), title  # not Streamlit's or Plotly's default template
        assert "data" not in template and len(json.dumps(template)) < 1200, title


def test_under_latency_the_slider_starts_at_the_all_minimum_rank_latency_fraction(app, measured):
    goto(app, "app_pages/allocate.py")
    params_floor = _budget_slider(app).min
    choose_cost(app, "decode")
    cost = _latency_cost(app)
    layers = synthetic_profile().layers
    # every layer at its smallest candidate rank (or dense, where that is faster), as a fraction of dense latency
    for regime, upper in ((0.3, 0.5), (0.5, 1.0)):
        cheapest = sum(min(cost.dense_cost(l), cost.layer_time(l, int(candidate_ranks(l, regime).min())))
                       for l in layers)
        floor = math.ceil(cheapest / cost.dense_total(layers) * 100 - 1e-9) / 100
        if floor < upper:
            break
    slider = _budget_slider(app)
    assert slider.min == pytest.approx(max(floor, 0.01 if regime < 0.5 else regime))
    assert slider.min != pytest.approx(params_floor)
    assert "smallest candidate rank, or dense where that is faster" in slider.help


def test_under_latency_the_sweep_runs_over_predicted_latency_fractions(app, measured):
    goto(app, "app_pages/allocate.py")
    choose_cost(app, "decode")
    app.toggle(key="sweep_on").set_value(True).run()
    assert not app.exception, [e.value for e in app.exception]
    _, spec = next(v for t, v in _chart_specs(app).items() if t.startswith("Budget sweep"))
    assert spec["layout"]["xaxis"]["title"]["text"] == "predicted latency fraction (of dense)"
    lems = next(t for t in spec["data"] if t["name"] == "LEMS (predicted)")
    cost, profile = _latency_cost(app), synthetic_profile()
    expected = []
    for budget in (round(0.3 + 0.05 * i, 2) for i in range(14)):
        try:
            expected.append(cost.fraction(profile.layers, allocate(profile, "lems", budget, cost=cost).ranks))
        except ValueError:  # below the smallest latency LEMS can reach
            continue
    assert _values(lems["x"]) == pytest.approx(expected)
    params_sweep = [allocate(profile, "lems", b).info["realised_ratio"] for b in (0.5, 0.8)]
    assert not any(x == pytest.approx(p) for x in _values(lems["x"]) for p in params_sweep)


def test_a_method_without_an_objective_shows_n_a_with_the_reason(app):
    goto(app, "app_pages/allocate.py")
    table = next(d.value for d in app.dataframe if "objective" in d.value.columns).set_index("method")
    assert table.loc["Uniform", "objective"] == "n/a" and table.loc["LEMS", "objective"] != "n/a"
    app.selectbox(key="plan_method").set_value("uniform").run()
    metric = next(m for m in app.metric if m.label == "Uniform objective")
    assert metric.value == "n/a" and "instead of minimising an objective" in metric.help
    assert not any("None" in str(m.value) for m in app.metric)


def _budget_slider(at):
    return next(s for s in at.slider if s.label.startswith("Budget"))


def _latency_cost(at):
    from app_pages.allocate_latency import LATENCY_COSTS

    (cost,) = at.session_state[LATENCY_COSTS].values()
    return cost


def _values(array) -> list[float]:
    """A Plotly spec array (a list, or base64 typed {"dtype", "bdata"}) as floats."""
    if isinstance(array, dict):
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).astype(float).tolist()
    return [float(v) for v in array]
