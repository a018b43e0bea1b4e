"""The Allocate page under a latency budget, driven with AppTest (fixtures from test_app).

No real timing: the measuring function is replaced by one that returns a small synthetic
device profile for the shapes asked, keyed like a real one of this machine.
"""
import pytest

from lems_core.latency import DeviceProfile, Workload, cache_path, current_key, rank_grid
from lems_core.latency.measure import GRID_POINTS
from lems_core.profile import synthetic_profile

import test_app
from test_app import button_labelled, goto
from test_latency import hand_times

profile_dir, app = test_app.profile_dir, test_app.app  # the page fixtures, shared with test_app


@pytest.fixture
def measured(monkeypatch):
    """Replace measuring by a synthetic profile; the list records each workload measured."""
    import lems_core.latency.measure as measure

    calls = []

    def fake(shapes, workload, device="cpu", dtype="float32", *args, **kwargs):
        calls.append(workload.kind)
        return DeviceProfile(current_key(workload, device, dtype),
                             {(m, n): hand_times(m, n, rank_grid(m, n, 8, 4)) for m, n in shapes})

    monkeypatch.setattr(measure, "measure_device_profile", fake)
    return calls


def comparison(at):
    """The comparison table (the dataframe with the predicted latency column)."""
    return next(d.value for d in at.dataframe if "predicted latency" in d.value.columns)


def choose_cost(at, kind: str):
    at.radio(key="cost_kind").set_value(kind).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_latency_cost_measures_once_and_re_solves_with_both_columns(app, measured):
    goto(app, "app_pages/allocate.py")
    table = comparison(app)
    assert set(table["predicted latency"]) == {"—"}  # no device profile of this machine yet
    assert "cost" not in app.session_state["current_plan"].meta

    choose_cost(app, "decode")
    assert measured == ["decode"]
    assert "latency" in next(s.label for s in app.slider if s.label.startswith("Budget"))
    table = comparison(app)
    assert {"realised ratio", "predicted latency"} <= set(table.columns)
    lems = table.set_index("method").loc["LEMS"]
    assert 0 < lems["predicted latency"] <= 0.8 + 1e-6 and 0 < lems["realised ratio"] < 1
    cost = app.session_state["current_plan"].meta["cost"]
    assert cost["kind"] == "latency" and cost["workload"]["kind"] == "decode"

    choose_cost(app, "params")  # the parameter plan, its latency now known from the cached profile
    assert measured == ["decode"]
    assert "cost" not in app.session_state["current_plan"].meta
    assert comparison(app)["predicted latency"].dtype.kind == "f"


def test_a_method_without_latency_support_is_left_out_with_a_message(app, measured):
    goto(app, "app_pages/allocate.py")
    app.multiselect(key="compare_methods").set_value(["lems", "asvd"]).run()
    choose_cost(app, "decode")
    infos = [i.value for i in app.info]
    assert any("ASVD (STRS) allocates under a parameter budget only" in i for i in infos), infos
    assert list(comparison(app)["method"]) == ["LEMS"]
    assert not app.warning or not any("ASVD" in w.value for w in app.warning)


def test_a_corrupt_cached_device_profile_is_an_error_until_measured_again(app, measured, profile_dir):
    from app_pages.common import devices

    workload = Workload.named("decode")
    shapes = [(l.out_features, l.in_features) for l in synthetic_profile().layers]
    path = cache_path(current_key(workload, devices()[0]), shapes, 8, GRID_POINTS,
                      cache_dir=profile_dir.parent.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"schema": "lems-device-profile/1", "shapes": "broken"')
    goto(app, "app_pages/allocate.py")
    choose_cost(app, "decode")
    errors = [e.value for e in app.error]
    assert any("device profile of this machine is unusable" in e for e in errors), errors
    assert measured == [] and not any("predicted latency" in d.value.columns for d in app.dataframe)

    button_labelled(app, "Measure it again").click().run()
    assert measured == ["decode"] and not app.error
    assert comparison(app)["predicted latency"].dtype.kind == "f"
