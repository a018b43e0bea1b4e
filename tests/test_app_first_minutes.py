"""A new user's first minutes, driven with AppTest: where to start, what one click on Compress costs,
what the pages say when something is missing or refused, and which controls hold across pages.

The evaluation job is faked at ``lems_core.jobs.for_each`` (what the Compress page submits), so
nothing loads a model; the job's own first report is checked on the pipeline entry point.
"""
import json
import re
import threading
import time
from pathlib import Path

import pytest

import test_app
from test_app import goto

profile_dir, app = test_app.profile_dir, test_app.app  # the page fixtures, shared with test_app
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def submitted(monkeypatch):
    """Evaluation jobs the page submits: [(task keywords, plans)]; each fake job waits for ``release``."""
    import lems_core.jobs

    calls, release = [], threading.Event()

    def fake_for_each(fn, items, progress, cancel):
        calls.append((dict(fn.keywords), list(items)))
        progress(0.01, "loading the model demo")
        release.wait(10)
        return []

    monkeypatch.setattr(lems_core.jobs, "for_each", fake_for_each)
    yield calls
    release.set()


def _button(at, label: str):
    return next(b for b in at.button if b.label == label)


def _texts(at) -> list[str]:
    return [e.value for kind in ("markdown", "caption", "info", "warning", "error", "success")
            for e in getattr(at, kind)]


def _job(at):
    from app_pages.common import job_registry

    return job_registry().get(at.session_state["eval_job_id"])


# ------------------------------------------------------------------------------------------ Home
def test_home_says_what_lems_is_and_links_the_first_steps(app):
    assert any("Layer-wise Error Modeling Search" in c.value for c in app.caption)
    pages = [link.proto.page for link in app.get("page_link")]
    assert {"spectra", "sensitivity", "allocate", "compress"} <= set(pages)
    assert any(m.value.startswith("**Model:**") for m in app.markdown)  # in full, not a cut metric
    columns = json.loads(app.dataframe[0].proto.columns)
    assert columns["params"]["type_config"]["format"] == "localized"  # thousands separators


# ------------------------------------------------------------------------- Compress & evaluate
def test_quick_is_the_cpu_default_and_holds_across_pages(app, monkeypatch):
    goto(app, "app_pages/compress.py")
    quick = app.toggle(key="quick_protocol")
    assert quick.value
    assert _labelled(app.number_input, "Window cap").disabled and _labelled(app.selectbox, "Sequence length").disabled
    quick.set_value(False).run()
    assert not _labelled(app.number_input, "Window cap").disabled
    assert not _labelled(app.selectbox, "Sequence length").disabled
    goto(app, "app_pages/allocate.py")
    goto(app, "app_pages/compress.py")
    assert app.toggle(key="quick_protocol").value is False


def test_quick_is_off_by_default_with_a_gpu(profile_dir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    import app_pages.common

    monkeypatch.setattr(app_pages.common, "devices", lambda: ["cuda", "cpu"])
    at = AppTest.from_file(test_app.APP, default_timeout=test_app.TIMEOUT).run()
    goto(at, "app_pages/compress.py")
    assert at.toggle(key="quick_protocol").value is False


def test_zero_shot_fields_follow_their_toggle(app):
    goto(app, "app_pages/compress.py")
    assert app.multiselect(key="zero_shot_tasks").disabled and app.number_input(key="zero_shot_limit").disabled
    app.toggle(key="zero_shot_on").set_value(True).run()
    assert not app.multiselect(key="zero_shot_tasks").disabled and not app.number_input(key="zero_shot_limit").disabled


def test_a_quick_run_starts_at_once_with_an_estimate(app, submitted):
    goto(app, "app_pages/allocate.py")
    goto(app, "app_pages/compress.py")
    _button(app, "Compress & evaluate").click().run()
    assert len(submitted) == 1
    options, plans = submitted[0]
    assert _protocol(options) == (8, 512) and plans[0].method == "lems"
    state = _job(app).snapshot()
    for _ in range(100):  # the fake job reports from its thread
        if state.fraction > 0:
            break
        time.sleep(0.05)
        state = _job(app).snapshot()
    assert state.meta["estimate_s"] > 0
    assert state.fraction > 0 and "estimated" in state.status_line  # during the load: the estimate made before


def test_the_evaluation_job_reports_the_model_load_above_zero_before_it_starts():
    from lems_core import pipeline
    from lems_core.allocators import allocate
    from lems_core.profile import synthetic_profile

    class Stop(Exception):
        pass

    reports = []

    def progress(fraction, message=""):
        reports.append((fraction, message))
        raise Stop  # nothing slow may come before the first report

    profile = synthetic_profile()
    plan = allocate(profile, "uniform", 0.8).to_plan(profile)
    with pytest.raises(Stop):
        pipeline.evaluate_and_store(plan, progress, None, profile=profile, datasets=["wikitext2"])
    assert reports[0][0] > 0 and reports[0][1].startswith("loading the model")


def test_a_reference_run_on_cpu_asks_first_with_its_estimate(app, submitted):
    goto(app, "app_pages/allocate.py")
    goto(app, "app_pages/compress.py")
    app.toggle(key="quick_protocol").set_value(False).run()
    _button(app, "Compress & evaluate").click().run()
    assert not submitted and "eval_job_id" not in app.session_state
    warning = next(w.value for w in app.warning if "reference protocol on a CPU" in w.value)
    assert re.search(r"Estimated \d+ s", warning) and "This is an estimate" in warning  # a tiny synthetic model
    assert f"about {305_000 // 2048} perplexity windows" in warning  # WikiText-2 in 2048-token windows

    _button(app, "Back (change the settings)").click().run()
    assert not any("reference protocol on a CPU" in w.value for w in app.warning) and not submitted

    _button(app, "Compress & evaluate").click().run()
    _button(app, "Start the reference run").click().run()
    assert len(submitted) == 1 and _protocol(submitted[0][0]) == (None, 2048)
    assert not any("reference protocol on a CPU" in w.value for w in app.warning)


def test_turning_quick_on_drops_a_pending_confirmation(app, submitted):
    goto(app, "app_pages/compress.py")
    app.toggle(key="quick_protocol").set_value(False).run()
    app.multiselect[1].set_value(["uniform"])
    _button(app, "Compress & evaluate").click().run()
    assert any("reference protocol on a CPU" in w.value for w in app.warning)
    app.toggle(key="quick_protocol").set_value(True).run()
    assert not any("reference protocol on a CPU" in w.value for w in app.warning) and not submitted


def test_an_empty_plan_picker_says_where_plans_come_from(app):
    goto(app, "app_pages/compress.py")  # opened directly: no current plan, nothing saved
    assert app.multiselect[0].options == []
    assert any("No plan to pick yet" in i.value and "Allocate" in i.value for i in app.info)
    assert "allocate" in [link.proto.page for link in app.get("page_link")]
    goto(app, "app_pages/allocate.py")
    goto(app, "app_pages/compress.py")
    assert not any("No plan to pick yet" in i.value for i in app.info)


def test_results_of_all_models_holds_across_pages(app):
    goto(app, "app_pages/compress.py")
    app.toggle(key="results_all").set_value(True).run()
    goto(app, "app_pages/spectra.py")
    goto(app, "app_pages/compress.py")
    assert app.toggle(key="results_all").value is True


# ------------------------------------------------------------------------------------- Allocate
def test_the_constraints_expander_keeps_its_label_and_shows_active_inside(app):
    goto(app, "app_pages/allocate.py")
    labels = [e.label for e in app.expander]
    assert "Layer constraints" in labels
    app.multiselect(key="con_lock_blocks").set_value([0]).run()
    assert [e.label for e in app.expander] == labels
    assert any(i.value.startswith("**Active:**") and "locked dense" in i.value for i in app.info)


def test_the_loadconfig_download_is_accepted_back(app):
    goto(app, "app_pages/allocate.py")
    plan = app.session_state["current_plan"]
    text = json.dumps(plan.to_loadconfig()).encode()
    app.file_uploader(key="plan_upload").upload("plan_loadconfig.json", text, "application/json").run()
    assert not app.error and not app.exception
    uploaded = app.session_state["uploaded_plan"]
    assert uploaded.ranks() == plan.ranks() and uploaded.method == "loadconfig"


def test_a_refused_upload_gives_no_budget_advice(app):
    goto(app, "app_pages/allocate.py")
    good = app.session_state["current_plan"].to_json().encode()
    app.file_uploader(key="plan_upload").upload("mine.json", good, "application/json").run()
    app.selectbox(key="plan_method").set_value("uploaded").run()
    app.file_uploader(key="plan_upload").upload("bad.json", b"not json", "application/json").run()
    assert any("bad.json" in e.value for e in app.error)
    assert any("No plan kept" in w.value for w in app.warning)
    assert not any("budget" in w.value.lower() for w in app.warning)


def test_the_headline_metrics_follow_the_kept_plan(app):
    goto(app, "app_pages/allocate.py")
    assert "LEMS realised ratio" in [m.label for m in app.metric]
    app.selectbox(key="plan_method").set_value("uniform").run()
    metrics = {m.label: m.value for m in app.metric}
    assert "LEMS realised ratio" not in metrics
    realised = app.session_state["current_plan"].summary["realised_ratio"]
    assert metrics["Uniform realised ratio"] == f"{realised:.4f}"


def test_the_difference_picks_hold_across_pages(app):
    goto(app, "app_pages/allocate.py")
    app.selectbox(key="diff_a").set_value("mrcs").run()
    app.selectbox(key="diff_b").set_value("lems").run()
    goto(app, "app_pages/spectra.py")
    goto(app, "app_pages/allocate.py")
    assert (app.selectbox(key="diff_a").value, app.selectbox(key="diff_b").value) == ("mrcs", "lems")


# ---------------------------------------------------------------------------- words and config
def test_help_texts_name_files_that_exist():
    for page in [ROOT / "app.py", *sorted((ROOT / "app_pages").glob("*.py"))]:
        for cited in re.findall(r"[\w/.-]*methods\.md", page.read_text()):
            assert (ROOT / cited).is_file(), f"{page.name} cites {cited}"


def test_the_app_fetches_no_icon_and_shows_no_deploy_button():
    import tomllib

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["client"]["toolbarMode"] in ("minimal", "viewer")
    assert not re.search(r"page_icon=\":material", (ROOT / "app.py").read_text())


def _protocol(options: dict) -> tuple:
    """(max_windows, seq_len) the job was asked for."""
    protocol = options.get("protocol")
    return (protocol.max_windows, protocol.seq_len) if protocol else (options["max_windows"], options["seq_len"])


def _labelled(widgets, label_start: str):
    return next(w for w in widgets if w.label.startswith(label_start))


def test_the_rank_multiple_picker_shows_the_allocators_own_choice(app):
    goto(app, "app_pages/allocate.py")
    picker = app.selectbox(key="con_rank_multiple")
    assert picker.value == 0 and picker.format_func(picker.value).startswith("allocator's own")
    picker.set_value(16).run()
    assert app.session_state["current_plan"].constraints["rank_multiple"] == 16
    app.selectbox(key="con_rank_multiple").set_value(0).run()
    assert app.session_state["current_plan"].constraints is None


def test_the_kl_floor_is_explained_and_a_floor_of_zero_has_no_layers_under_it(app):
    from app_pages import tables
    from lems_core.profile import synthetic_profile

    goto(app, "app_pages/sensitivity.py")
    assert any("The KL floor is what the measurement reads" in c.value for c in app.caption)
    profile = synthetic_profile()
    profile.kl_floor = {"kl": 0.0, "reference_precision": "fp32"}
    assert "layers measure less than" not in tables.kl_floor_caption(profile)
    profile.kl_floor = {"kl": 1e9, "reference_precision": "bf16"}
    assert f"{len(profile.layers)} of {len(profile.layers)} layers measure less than" in tables.kl_floor_caption(profile)
