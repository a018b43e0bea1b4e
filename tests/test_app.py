"""AppTest checks of every page on a synthetic profile saved in a temporary cache.

AppTest has no browser: fragments rerun the whole script here, Plotly charts are
looked up as unknown elements, and nothing is really downloaded (the browser
test in tests/e2e covers those).
"""
import base64
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from lems_core.plan import PLAN_SCHEMA
from lems_core.profile import synthetic_profile

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGES = ["app_pages/spectra.py", "app_pages/sensitivity.py", "app_pages/allocate.py", "app_pages/compress.py",
         "app_pages/prediction.py"]
TIMEOUT = 30


@pytest.fixture
def profile_dir(tmp_path, monkeypatch):
    """A synthetic profile in a fresh cache; the app is pointed at both by env vars."""
    cache = tmp_path / "cache"
    folder = synthetic_profile().save(cache / "profiles" / "synthetic-test")
    monkeypatch.setenv("LEMS_CACHE_DIR", str(cache))
    monkeypatch.setenv("LEMS_PROFILE_DIR", str(folder))
    return folder


@pytest.fixture
def app(profile_dir):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts(at: AppTest) -> list:
    return at.get("plotly_chart")


def test_home_shows_profile_summary_and_layers(app, profile_dir):
    assert app.title[0].value == "LEMS Explorer"
    assert app.sidebar.selectbox(key="profile_choice").value == str(profile_dir)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Blocks"] == "4" and metrics["Decomposition"] == "svd_llm"
    assert len(app.dataframe) >= 2  # per-kind table + all layers
    assert "Build profile" in [b.label for b in app.button]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_exception(app, page):
    goto(app, page)
    assert app.title, "page drew nothing"
    # the sidebar (drawn by the entry point) is present on every page
    assert app.sidebar.selectbox(key="profile_choice").value


def test_spectra_and_sensitivity_draw_their_charts(app):
    assert len(charts(goto(app, "app_pages/spectra.py"))) == 3  # spectra, residual energy, heatmap
    assert len(charts(goto(app, "app_pages/sensitivity.py"))) == 3  # KL scale, error curves, depth bias


def test_sensitivity_gamma_changes_depth_bias_curve(app):
    goto(app, "app_pages/sensitivity.py")
    before = _values(_figure(app, "depth_bias")["data"][0]["y"])
    app.slider(key="em_gamma").set_value(1.0).run()
    after = _values(_figure(app, "depth_bias")["data"][0]["y"])
    assert before[0] == pytest.approx(6.0) and after[0] == pytest.approx(2.0)


def test_budget_slider_changes_the_current_plan(app):
    goto(app, "app_pages/allocate.py")
    plan = app.session_state["current_plan"]
    assert plan.method == "lems" and plan.budget == pytest.approx(0.8)
    ratio_before = _metric(app, "LEMS realised ratio")

    app.slider(key="budget").set_value(0.5).run()
    assert not app.exception
    plan = app.session_state["current_plan"]
    assert plan.budget == pytest.approx(0.5)
    assert plan.summary["realised_ratio"] <= 0.5 + 1e-9
    assert _metric(app, "LEMS realised ratio") != ratio_before
    assert any("Current plan:** LEMS at budget 0.50" in m.value for m in app.markdown)


def test_allocate_compares_methods_and_draws_views(app):
    goto(app, "app_pages/allocate.py")
    table = app.dataframe[0].value
    assert {"LEMS", "Uniform"} <= set(table["method"])
    lems, uniform = (table.set_index("method").loc[m, "predicted error"] for m in ("LEMS", "Uniform"))
    assert lems <= uniform + 1e-12  # LEMS is optimal for its own objective
    assert len(charts(app)) >= 3  # heatmaps, difference, per block (kept fraction and error)


def test_error_model_controls_change_the_lems_plan(app):
    goto(app, "app_pages/allocate.py")
    before = app.session_state["current_plan"].ranks()
    app.toggle(key="em_use_scale").set_value(False).run()
    app.slider(key="em_gamma").set_value(0.0).run()
    assert not app.exception
    assert app.session_state["current_plan"].ranks() != before


def test_infeasible_method_shows_its_message(app):
    goto(app, "app_pages/allocate.py")
    app.multiselect(key="compare_methods").set_value(["lems", "uniform", "asvd"]).run()
    assert any("ASVD" in w.value and "measured" in w.value for w in app.warning)


def test_plan_downloads_are_valid_json(app):
    goto(app, "app_pages/allocate.py")
    plan = app.session_state["current_plan"]
    doc = json.loads(plan.to_json())
    assert doc["schema"] == PLAN_SCHEMA
    labels = [b.label for b in app.get("download_button")]
    assert labels == ["Download plan JSON", "Download loadconfig JSON"]


@pytest.mark.parametrize("content, message", [
    (b"this is not json", "not valid JSON"),
    (b'{"schema": "something-else/9"}', "is not supported"),
    (b"[1, 2, 3]", "must be a JSON object"),
])
def test_bad_plan_upload_shows_error(app, content, message):
    goto(app, "app_pages/allocate.py")
    app.file_uploader(key="plan_upload").upload("bad.json", content, "application/json").run()
    assert not app.exception
    errors = [e.value for e in app.error]
    assert any(message in e and "bad.json" in e for e in errors), errors
    assert "uploaded_plan" not in app.session_state


def test_plan_for_another_model_is_rejected(app):
    goto(app, "app_pages/allocate.py")
    doc = json.loads(app.session_state["current_plan"].to_json())
    doc["model"]["fingerprint"] = "someothermodel"
    app.file_uploader(key="plan_upload").upload("other.json", json.dumps(doc).encode(), "application/json").run()
    assert any("another model" in e.value for e in app.error)


def test_good_plan_upload_joins_the_comparison(app):
    goto(app, "app_pages/allocate.py")
    text = app.session_state["current_plan"].to_json()
    app.file_uploader(key="plan_upload").upload("mine.json", text.encode(), "application/json").run()
    assert not app.error and not app.exception
    assert app.session_state["uploaded_plan"].method == "lems"
    assert "uploaded" in app.selectbox(key="plan_method").options[-1]


def test_save_plan_to_cache_and_offer_it_for_evaluation(app, profile_dir):
    goto(app, "app_pages/allocate.py")
    app.button(key="save_plan").click().run()
    saved = list((profile_dir.parents[1] / "plans").glob("*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["schema"] == PLAN_SCHEMA

    goto(app, "app_pages/compress.py")
    options = app.multiselect[0].options
    assert any(o.startswith("current: LEMS @ 0.80") for o in options)
    assert any(o == f"saved: {saved[0].name}" for o in options)
    assert "Compress & evaluate" in [b.label for b in app.button]


def test_widget_state_survives_page_switches(app):
    goto(app, "app_pages/allocate.py")
    app.slider(key="budget").set_value(0.6).run()
    goto(app, "app_pages/spectra.py")
    goto(app, "app_pages/allocate.py")
    assert app.slider(key="budget").value == pytest.approx(0.6)


def test_synthetic_fallback_only_without_any_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("LEMS_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("LEMS_PROFILE_DIR", raising=False)
    monkeypatch.setattr("lems_core.cache.DEMO_DIR", tmp_path / "no-demo")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert "synthetic demo" in at.sidebar.selectbox(key="profile_choice").format_func("synthetic")
    assert any("synthetic demo" in w.value for w in at.sidebar.warning)
    goto(at, "app_pages/compress.py")
    assert any("synthetic demo profile" in w.value for w in at.warning)


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def _values(array) -> np.ndarray:
    """Plotly 7 writes numpy data as {"dtype", "bdata"} (base64); plain lists stay lists."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
    return np.asarray(array)


def _figure(at: AppTest, title_start: str) -> dict:
    for chart in charts(at):
        fig = json.loads(chart.proto.spec)
        title = fig.get("layout", {}).get("title", {}).get("text", "")
        if title.lower().startswith(title_start.replace("_", " ")):
            return fig
    raise AssertionError(f"no chart titled {title_start!r}")


def _fake_build(source, decomposition, calibration, device=None, progress=None, cancel=None, **_):
    """Stands in for pipeline.build_profile: reports progress, saves a small profile, returns its folder."""
    from lems_core.cache import profiles_dir

    for step in range(3):
        progress((step + 1) / 3, f"step {step + 1}")
    profile = synthetic_profile(num_blocks=2, seed=7)
    profile.model_source, profile.decomposition = source, decomposition
    return profile.save(profiles_dir() / "built-by-test")


def test_build_profile_runs_as_job_and_can_be_opened(app, monkeypatch):
    import lems_core.pipeline

    monkeypatch.setattr(lems_core.pipeline, "build_profile_job", _fake_build)
    app.text_input[0].set_value("my/model")
    button_labelled(app, "Build profile").click().run()
    job = _wait_for_job(app, "build_job_id")
    assert job.status == "done", job.error
    app.run()
    assert any("Profile built" in s.value for s in app.success)
    app.button(key="open_built").click().run()
    assert app.session_state["profile_choice"].endswith("built-by-test")
    metrics = {m.label: m.value for m in app.metric}
    assert "**Model:** my/model" in [m.value for m in app.markdown] and metrics["Blocks"] == "2"


def test_build_form_passes_the_memory_budget_and_refuses_a_bad_one(app, monkeypatch):
    import lems_core.pipeline

    seen = {}

    def fake(*args, run=None, **kwargs):
        seen["max_memory"] = run.max_memory
        return _fake_build(*args, **kwargs)

    monkeypatch.setattr(lems_core.pipeline, "build_profile_job", fake)
    app.text_input[1].set_value("lots of RAM")
    button_labelled(app, "Build profile").click().run()
    assert any("cannot read memory size" in e.value for e in app.error)
    assert "build_job_id" not in app.session_state
    app.text_input[1].set_value("2GB")
    button_labelled(app, "Build profile").click().run()
    assert _wait_for_job(app, "build_job_id").status == "done"
    assert seen["max_memory"] == 2 * 2**30


def test_failed_build_is_reported(app, monkeypatch):
    import lems_core.pipeline

    def broken(*args, progress=None, cancel=None, **kwargs):
        raise FileNotFoundError("GGUF file not found: nowhere.gguf")

    monkeypatch.setattr(lems_core.pipeline, "build_profile_job", broken)
    button_labelled(app, "Build profile").click().run()
    assert _wait_for_job(app, "build_job_id").status == "failed"
    app.run()
    assert any("GGUF file not found" in e.value for e in app.error)


def button_labelled(at: AppTest, label: str):
    """The page's button with this label."""
    return next(b for b in at.button if b.label == label)


def _wait_for_job(at: AppTest, key: str, seconds: float = 20):
    """The JobState of the job whose id the page stored under ``key``, once finished."""
    from app_pages.common import job_registry

    job = job_registry().get(at.session_state[key])
    return job.wait(seconds)


def test_opens_on_the_kfac_demo_profile_by_default(tmp_path, monkeypatch):
    demo = tmp_path / "demo"
    for decomposition in ("svd_llm", "kfac"):
        profile = synthetic_profile()
        profile.decomposition = decomposition
        profile.save(demo / decomposition)
    monkeypatch.setattr("lems_core.cache.DEMO_DIR", demo)
    monkeypatch.setenv("LEMS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LEMS_PROFILE_DIR", raising=False)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    picker = at.sidebar.selectbox(key="profile_choice")
    assert picker.value == str(demo / "kfac") and len(picker.options) == 2
    assert {m.label: m.value for m in at.metric}["Decomposition"] == "kfac"
    picker.set_value(str(demo / "svd_llm")).run()
    assert {m.label: m.value for m in at.metric}["Decomposition"] == "svd_llm"


def test_ars_is_compared_when_trained_and_explained_when_not(app, monkeypatch):
    from lems_core import pipeline

    goto(app, "app_pages/allocate.py")
    assert "ars" in app.multiselect(key="compare_methods").value
    assert any(i.value.startswith("ARS: no ARS plan") for i in app.info)

    def fake_run(profile_folder, ratios, preset_name="cpu-small", progress=None, cancel=None, run=None):
        progress(0.5, "training")
        return [{"ratio": r} for r in ratios]

    monkeypatch.setattr(pipeline.ars_training, "run_ars_job", fake_run)
    form_text = next(t for t in app.text_input if t.label.startswith("Budgets"))
    form_text.set_value("0.7, 0.8")
    button_labelled(app, "Train ARS").click().run()
    state = _wait_for_job(app, "ars_job_id")
    assert state.status == "done" and state.result == [{"ratio": 0.7}, {"ratio": 0.8}]
    app.run()
    assert any("ARS trained 2 plan(s)" in s.value for s in app.success)


def test_evaluation_job_stores_results_and_plots_them(app, monkeypatch):
    import lems_core.pipeline as pipeline

    seen = []

    def fake_evaluate(plan, datasets, protocol=None, run=None, calibration=None, **_):
        seen.append((plan.method, round(plan.budget, 2), calibration.to_dict(), tuple(datasets), protocol.max_windows,
                     protocol.seq_len))
        run.report(0.5, "perplexity")
        summary = plan.summary
        return pipeline.EvalResult(
            method=plan.method, decomposition=plan.decomposition, budget=plan.budget,
            realised_ratio=summary["realised_ratio"], ppl={d: 10 + 20 * (1 - plan.budget) for d in datasets},
            dense_ppl={d: 10.0 for d in datasets}, kl=0.1, params_kept=summary["params_kept"],
            params_total=summary["params_total"], seconds=0.1, device="cpu", model_source=plan.model_source,
            fingerprint=plan.fingerprint)

    monkeypatch.setattr(pipeline.jobs, "evaluate_plan", fake_evaluate)
    goto(app, "app_pages/allocate.py")
    goto(app, "app_pages/compress.py")
    assert any("No stored results" in i.value for i in app.info)
    app.multiselect[1].set_value(["lems", "uniform"])  # new plans of ...
    button_labelled(app, "Compress & evaluate").click().run()
    state = _wait_for_job(app, "eval_job_id")
    assert state.status == "done", state.error
    assert len(seen) == 2 * 3  # 2 methods x 3 default budgets; the current plan (LEMS @ 0.8) is one of them
    assert seen[0][:2] == ("lems", 0.8) and seen[0][2]["dataset"] == "synthetic"  # the profile's calibration
    assert seen[0][3] == ("wikitext2",) and seen[0][4:] == (8, 512)  # the quick protocol by default on a CPU
    app.run()
    assert any("Evaluated 6 plan(s)" in s.value for s in app.success)
    table = app.dataframe[0].value
    assert len(table) == 6 and set(table["method"]) == {"LEMS", "Uniform"}
    assert set(table["protocol"]) == {"unknown"}  # the fake result records no settings
    fig = json.loads(charts(app)[0].proto.spec)
    assert fig["layout"]["title"]["text"].startswith("Perplexity on wikitext2")


def test_compress_page_offers_decompositions_and_model_scored_methods(app):
    goto(app, "app_pages/compress.py")
    picker = app.selectbox(key="factorise_with")
    assert picker.options[0] == "plan's own decomposition" and picker.value == ""
    for name in ("saes", "erc", "lcsvd", "svd_llm", "kfac"):
        assert any(f"({name})" in o for o in picker.options), name
    assert all("slower" in o for o in picker.options if any(f"({n})" in o for n in ("saes", "erc", "lcsvd")))
    new_plans = app.multiselect[1].options
    for label in ("LEMS", "ATP (scored on the model)", "ERC-SVD (PLC) (scored on the model)",
                  "LC-SVD search (scored on the model)"):
        assert label in new_plans


def test_allocate_page_points_to_model_scored_methods(app):
    goto(app, "app_pages/allocate.py")
    assert any("ATP" in c.value and "Compress & evaluate page" in c.value for c in app.caption)


def test_model_scored_plans_are_built_in_the_job_and_factorised_as_chosen(app, monkeypatch):
    import lems_core.pipeline as pipeline

    seen, asked = [], []

    def fake_score_function(profile, kind, run=None):
        asked.append(kind)
        if kind == "kl":  # erc_plc: a failing scorer must not stop the other plans
            raise ValueError("no model behind this profile")
        return lambda ranks: float(sum(r or 0 for r in ranks.values()) % 5)

    def fake_evaluate(plan, datasets, max_windows=None, seq_len=512, device=None, progress=None, cancel=None,
                      calibration=None, decomposition=None, **_):
        seen.append((plan.method, round(plan.budget, 2), decomposition))
        summary = plan.summary
        return pipeline.EvalResult(
            method=plan.method, decomposition=decomposition or plan.decomposition, budget=plan.budget,
            realised_ratio=summary["realised_ratio"], ppl={d: 12.0 for d in datasets}, dense_ppl={d: 10.0 for d in datasets},
            kl=0.1, params_kept=summary["params_kept"], params_total=summary["params_total"], seconds=0.1, device="cpu",
            model_source=plan.model_source, fingerprint=plan.fingerprint)

    monkeypatch.setattr(pipeline.scoring, "score_function", fake_score_function)
    monkeypatch.setattr(pipeline.jobs, "evaluate_plan", fake_evaluate)
    goto(app, "app_pages/compress.py")
    app.multiselect[1].set_value(["uniform", "atp", "erc_plc"])
    next(t for t in app.text_input if t.label.startswith("at budgets")).set_value("0.7")
    app.selectbox(key="factorise_with").set_value("saes")
    button_labelled(app, "Compress & evaluate").click().run()
    state = _wait_for_job(app, "eval_job_id")
    assert state.status == "done", state.error
    assert sorted(seen) == [("atp", 0.7, "saes"), ("uniform", 0.7, "saes")]
    assert sorted(asked) == ["kl", "ppl"]
    app.run()
    assert any("Evaluated 2 plan(s)" in s.value for s in app.success)
    assert any("ERC-SVD (PLC) at 0.7" in w.value and "no model behind" in w.value for w in app.warning)
    table = app.dataframe[0].value
    assert set(table["method"]) == {"ATP", "Uniform"} and set(table["decomposition"]) == {"saes"}


def test_zero_shot_tasks_reach_the_job_and_accuracy_is_plotted(app, monkeypatch, tmp_path):
    import lems_core.pipeline as pipeline

    seen = []
    (tmp_path / "tasks").mkdir()
    local = tmp_path / "tasks" / "mine.yaml"
    local.write_text("task: mine\n")
    (tmp_path / "tasks" / "evil.yaml").write_text("task: evil\nprocess_docs: !function evilmod.proc\n")
    monkeypatch.setenv("LEMS_TASKS_DIR", str(tmp_path / "tasks"))

    def fake_evaluate(plan, datasets, max_windows=None, seq_len=512, device=None, progress=None, cancel=None,
                      calibration=None, tasks=(), task_limit=None, **_):
        seen.append((tuple(datasets), tuple(tasks), task_limit))
        summary = plan.summary
        acc = 0.3 + 0.4 * plan.budget
        return pipeline.EvalResult(
            method=plan.method, decomposition=plan.decomposition, budget=plan.budget,
            realised_ratio=summary["realised_ratio"], ppl={}, dense_ppl={}, kl=0.1, params_kept=summary["params_kept"],
            params_total=summary["params_total"], seconds=0.1, device="cpu", model_source=plan.model_source,
            fingerprint=plan.fingerprint,
            zero_shot={"tasks": {"mine": {"acc": acc, "acc_norm": acc}}, "mean": {"acc": acc, "acc_norm": acc}},
            dense_zero_shot={"tasks": {"mine": {"acc": 0.9, "acc_norm": 0.9}}, "mean": {"acc": 0.9, "acc_norm": 0.9}})

    monkeypatch.setattr(pipeline.jobs, "evaluate_plan", fake_evaluate)
    goto(app, "app_pages/allocate.py")
    goto(app, "app_pages/compress.py")
    assert app.multiselect(key="zero_shot_tasks").value == ["piqa", "openbookqa", "hellaswag", "arc_challenge",
                                                            "arc_easy", "winogrande", "boolq", "mathqa"]
    app.toggle(key="zero_shot_on").set_value(True).run()  # the task fields are enabled by the toggle
    assert app.multiselect(key="zero_shot_local").options == ["evil.yaml", "mine.yaml"]  # the server's folder only
    app.multiselect(key="zero_shot_local").set_value(["evil.yaml"])
    button_labelled(app, "Compress & evaluate").click().run()
    assert any("Task evil.yaml" in e.value and "!function" in e.value for e in app.error) and not seen
    assert "eval_job_id" not in app.session_state

    app.multiselect(key="zero_shot_tasks").set_value(["arc_easy"])
    app.multiselect(key="zero_shot_local").set_value(["mine.yaml"])
    app.number_input(key="zero_shot_limit").set_value(50)
    button_labelled(app, "Compress & evaluate").click().run()
    state = _wait_for_job(app, "eval_job_id")
    assert state.status == "done", state.error
    assert seen == [(("wikitext2",), ("arc_easy", str(local)), 50)]
    app.run()
    table = app.dataframe[0].value
    assert table["mean acc"].iloc[0] == pytest.approx(0.62) and table["dense acc mine"].iloc[0] == 0.9
    assert app.radio(key="results_zero_shot").options[0] == "mean acc"
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in charts(app)]
    assert any(t.startswith("Zero-shot mean acc") for t in titles)


# ------------------------------------------------------------- state that holds (#13)
def test_controls_hold_across_pages_even_when_streamlit_drops_widget_state(app):
    goto(app, "app_pages/allocate.py")
    app.slider(key="budget").set_value(0.75).run()
    app.slider(key="em_gamma").set_value(4.5).run()
    app.multiselect(key="compare_methods").set_value(["lems", "uniform"]).run()
    assert app.session_state["current_plan"].budget == pytest.approx(0.75)
    goto(app, "app_pages/sensitivity.py")
    assert app.slider(key="em_gamma").value == pytest.approx(4.5)
    goto(app, "app_pages/spectra.py")
    for key in ("budget", "em_gamma", "compare_methods"):  # Streamlit drops widgets a run did not draw
        if key in app.session_state:
            del app.session_state[key]
    goto(app, "app_pages/allocate.py")
    assert app.slider(key="budget").value == pytest.approx(0.75)
    assert app.slider(key="em_gamma").value == pytest.approx(4.5)
    assert app.multiselect(key="compare_methods").value == ["lems", "uniform"]
    assert app.session_state["current_plan"].budget == pytest.approx(0.75)
    assert app.session_state["current_plan"].error_model["gamma"] == pytest.approx(4.5)


def test_budget_slider_starts_where_lems_can_solve(app):
    from lems_core.allocators.lems import lems_min_budget

    goto(app, "app_pages/allocate.py")
    low = app.slider(key="budget").min
    assert low == pytest.approx(lems_min_budget(synthetic_profile())) and low > 0.1
    app.slider(key="budget").set_value(low).run()
    assert app.session_state["current_plan"].method == "lems"
    assert not any(w.value.startswith("LEMS") for w in app.warning)


def test_kept_plan_never_changes_method_by_itself(app):
    goto(app, "app_pages/allocate.py")
    app.multiselect(key="compare_methods").set_value(["lems", "uniform", "asvd"]).run()
    app.selectbox(key="plan_method").set_value("asvd").run()  # ASVD cannot run on this profile
    assert "current_plan" not in app.session_state
    assert any("No plan kept" in w.value and "ASVD" in w.value for w in app.warning)
    app.slider(key="budget").set_value(0.6).run()
    assert app.selectbox(key="plan_method").value == "asvd" and "current_plan" not in app.session_state
    app.selectbox(key="plan_method").set_value("uniform").run()
    assert app.session_state["current_plan"].method == "uniform"
    app.multiselect(key="compare_methods").set_value(["lems"]).run()  # still kept (and solved) when not compared
    assert app.session_state["current_plan"].method == "uniform"


def test_warnings_name_the_method_once(app):
    goto(app, "app_pages/allocate.py")
    app.multiselect(key="compare_methods").set_value(["lems", "asvd"]).run()
    assert all("ASVD: asvd:" not in w.value for w in app.warning)


def test_reset_error_model_restores_the_reference_defaults(app):
    goto(app, "app_pages/allocate.py")
    before = app.session_state["current_plan"].ranks()
    app.toggle(key="em_use_scale").set_value(False).run()
    app.slider(key="em_gamma").set_value(1.0).run()
    assert app.session_state["current_plan"].ranks() != before
    button_labelled(app, "Reset error model to defaults").click().run()
    assert app.slider(key="em_gamma").value == pytest.approx(5.0) and app.toggle(key="em_use_scale").value
    assert app.session_state["current_plan"].ranks() == before


def test_layer_constraints_change_the_plan_and_are_recorded(app):
    goto(app, "app_pages/allocate.py")
    before = app.session_state["current_plan"]
    assert before.constraints is None and any(r is not None for n, r in before.ranks().items() if ".layers.3." in n)
    app.multiselect(key="con_lock_blocks").set_value([3]).run()
    app.selectbox(key="con_rank_multiple").set_value(16).run()
    plan = app.session_state["current_plan"]
    assert plan.method == "lems" and plan.constraints["lock_dense"] == ["block:3"]
    assert all(r is None for n, r in plan.ranks().items() if ".layers.3." in n)
    assert all(r is None or r % 16 == 0 for r in plan.ranks().values())
    assert plan.summary["realised_ratio"] <= 0.8 + 1e-9
    goto(app, "app_pages/spectra.py")
    goto(app, "app_pages/allocate.py")  # constraints hold across pages too
    assert app.session_state["current_plan"].constraints["lock_dense"] == ["block:3"]


def test_infeasible_or_malformed_constraints_say_so(app):
    goto(app, "app_pages/allocate.py")
    app.multiselect(key="con_lock_blocks").set_value([0, 1, 2]).run()
    app.slider(key="budget").set_value(0.5).run()
    assert "current_plan" not in app.session_state and app.selectbox(key="plan_method").value == "lems"
    assert any("No plan kept" in w.value and "LEMS" in w.value for w in app.warning)
    app.multiselect(key="con_lock_blocks").set_value([]).run()
    assert app.session_state["current_plan"].method == "lems"  # back to LEMS, never silently another method
    app.text_input(key="con_min_kept").set_value("ffn=0.3").run()
    assert any("Layer constraints" in e.value and "ffn" in e.value for e in app.error)
    assert "current_plan" not in app.session_state


def test_budget_sweep_draws_on_request(app):
    goto(app, "app_pages/allocate.py")
    app.toggle(key="sweep_on").set_value(True).run()
    assert not app.exception
    fig = _figure(app, "budget_sweep")
    assert {t["name"] for t in fig["data"]} >= {"LEMS (predicted)", "Uniform (predicted)"}


# ----------------------------------------------------- shipped results, predicted vs measured (#13)
def _shipped_demo(tmp_path, monkeypatch, content=None):
    """A fresh machine: an empty cache and a demo folder holding one profile and its shipped results."""
    from shipped_fixture import fixture_records, write_shipped

    demo = tmp_path / "demo"
    profile = synthetic_profile()
    folder = profile.save(demo / "synthetic-demo")
    records = fixture_records(profile, methods=("lems", "uniform", "mrcs"), budgets=(0.6, 0.7, 0.8))
    records.append({**records[0], "ranks": None, "created": "2024-01-01T00:00:00+00:00"})  # stored before ranks were
    if content is None:
        write_shipped(demo / "results.json", records, note="made-up fixture measurements")
    else:
        (demo / "results.json").write_text(content)
    monkeypatch.setattr("lems_core.cache.DEMO_DIR", demo)
    monkeypatch.setenv("LEMS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LEMS_PROFILE_DIR", raising=False)
    monkeypatch.delenv("LEMS_SHIPPED_RESULTS", raising=False)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.sidebar.selectbox(key="profile_choice").value == str(folder)
    return at, records


def _frame_with(at: AppTest, *columns):
    return next(d.value for d in at.dataframe if set(columns) <= set(d.value.columns))


def test_a_fresh_machine_shows_the_shipped_results_on_compress_and_evaluate(tmp_path, monkeypatch):
    at, records = _shipped_demo(tmp_path, monkeypatch)
    goto(at, "app_pages/compress.py")
    assert not any("No stored results" in i.value for i in at.info)
    table = _frame_with(at, "source", "ppl wikitext2")
    assert len(table) == len(records) and set(table["source"]) == {"shipped"}
    assert {"LEMS", "Uniform", "MRCS"} <= set(table["method"]) and set(table["protocol"]) == {"quick"}
    assert any("shipped with the demo" in c.value and "made-up fixture" in c.value for c in at.caption)
    fig = _figure(at, "perplexity on wikitext2")
    assert {t["name"] for t in fig["data"]} >= {"LEMS", "Uniform", "MRCS"}


def test_allocate_shows_measured_results_at_the_budget_and_on_the_sweep(tmp_path, monkeypatch):
    at, _ = _shipped_demo(tmp_path, monkeypatch)
    goto(at, "app_pages/allocate.py")
    here = _frame_with(at, "predicted Σ ε", "source")
    assert sorted(here["method"]) == ["LEMS", "MRCS", "Uniform"] and set(here["source"]) == {"shipped"}
    lems = here.set_index("method").loc["LEMS", "predicted Σ ε"]
    live = at.dataframe[0].value.set_index("method").loc["LEMS", "predicted error"]
    assert lems == pytest.approx(live)  # the shipped LEMS plan is the one solved live at 0.8
    at.slider(key="budget").set_value(0.6).run()
    here = _frame_with(at, "predicted Σ ε", "source")
    assert len(here) == 4 and here["predicted Σ ε"].isna().sum() == 1  # + the record without ranks
    at.slider(key="budget").set_value(0.75).run()
    assert not any("predicted Σ ε" in d.value.columns for d in at.dataframe)
    assert any("0.60, 0.70, 0.80" in c.value for c in at.caption)
    at.toggle(key="sweep_on").set_value(True).run()
    names = {t["name"] for t in _figure(at, "budget_sweep")["data"]}
    assert {"LEMS (measured KL)", "Uniform (measured KL)", "MRCS (measured KL)"} <= names


def test_predicted_vs_measured_page_scatters_correlates_and_fits_layers(tmp_path, monkeypatch):
    at, records = _shipped_demo(tmp_path, monkeypatch)
    goto(at, "app_pages/prediction.py")
    kl = _figure(at, "predicted σ ε vs measured kl")
    assert kl["layout"]["xaxis"]["type"] == "log" and kl["layout"]["yaxis"]["type"] == "log"
    assert {t["name"] for t in kl["data"]} == {"LEMS · ρ=1.00", "Uniform · ρ=1.00", "MRCS · ρ=1.00"}
    assert "ρ over all 9 results: 1.00" in kl["layout"]["title"]["subtitle"]["text"]
    _figure(at, "predicted σ ε vs measured ppl wikitext2")
    rho = _frame_with(at, "allocator", "ρ predicted vs KL")
    assert rho.set_index("allocator").loc["all results", "ρ predicted vs KL"] == pytest.approx(1.0)
    skipped = _frame_with(at, "reason")
    assert len(skipped) == 1 and "no ranks" in skipped["reason"].iloc[0]
    layers = _figure(at, "fitted error curve")
    drawn = [t for t in layers["data"] if t.get("hoverinfo") != "skip"]  # without the legend-only entries
    assert len(drawn) == 3 * 6  # q and down of blocks 0, 2, 3: curve, points, residuals each
    worst = _frame_with(at, "RMS residual (decades)")
    assert len(worst) == len(synthetic_profile().layers)


def test_a_malformed_shipped_file_is_reported_and_the_rest_still_shows(tmp_path, monkeypatch):
    at, _ = _shipped_demo(tmp_path, monkeypatch, content='{"schema": "lems-results/1", "results": [{"method": 3}]}')
    assert any("shipped results" in m.value for m in at.sidebar.markdown)
    assert "Remove" not in [b.label for b in at.sidebar.button]  # read-only: never moved from the demo folder
    goto(at, "app_pages/compress.py")
    assert any("record 0" in e.value and "'method' must be a non-empty string" in e.value for e in at.error)
    assert any("No stored results" in i.value for i in at.info)
    goto(at, "app_pages/prediction.py")
    assert any("'method' must be a non-empty string" in e.value for e in at.error)
    assert (tmp_path / "demo" / "results.json").is_file()


# ----------------------------------------------------- oversized numbers and the server's job cap
def test_home_refuses_an_oversized_memory_budget_with_a_message(app, monkeypatch):
    import lems_core.pipeline

    monkeypatch.setattr(lems_core.pipeline, "build_profile_job", _fake_build)
    for typed, message in (("9" * 400 + "GB", "too long"), ("1" * 30 + "GB", "at most 1 EiB"),
                           ("1e400", "cannot read memory size")):
        app.text_input[1].set_value(typed)
        button_labelled(app, "Build profile").click().run()
        assert not app.exception, typed
        assert any(message in e.value for e in app.error), typed
    assert "build_job_id" not in app.session_state


def test_a_build_beyond_the_job_cap_is_refused_with_a_message(app, monkeypatch):
    import threading

    import lems_core.pipeline
    from app_pages.common import job_registry
    from lems_core.jobs import MAX_ACTIVE_JOBS

    monkeypatch.setattr(lems_core.pipeline, "build_profile_job", _fake_build)
    gate, registry = threading.Event(), job_registry()
    held = [registry.submit("hold", lambda progress, cancel: gate.wait(20))
            for _ in range(MAX_ACTIVE_JOBS - len(registry.active()))]
    try:
        button_labelled(app, "Build profile").click().run()
        assert not app.exception
        assert any("Profile build not started" in e.value and "already queued or running" in e.value for e in app.error)
        assert "build_job_id" not in app.session_state
    finally:
        gate.set()
        for job in held:
            job.wait(5)
    button_labelled(app, "Build profile").click().run()
    assert _wait_for_job(app, "build_job_id").status == "done"


def test_allocate_refuses_oversized_budgets_and_fractions_with_a_message(app):
    goto(app, "app_pages/allocate.py")
    form_text = next(t for t in app.text_input if t.label.startswith("Budgets"))
    form_text.set_value("0.7, 0." + "9" * 400)
    button_labelled(app, "Train ARS").click().run()
    assert not app.exception
    assert any(e.value.startswith("Budgets:") and "too long to be a number" in e.value for e in app.error)
    assert "ars_job_id" not in app.session_state
    app.text_input(key="con_min_kept").set_value("q=" + "9" * 400).run()
    assert not app.exception
    assert any("Layer constraints" in e.value for e in app.error)


def test_the_websocket_refuses_a_rebound_host_and_accepts_the_local_names(monkeypatch):
    """server.allowedHosts of .streamlit/config.toml, checked by streamlit's own Host test (DNS rebinding shape)."""
    import tomllib

    from streamlit import config
    from streamlit.web.server.starlette.starlette_websocket import is_host_allowed

    hosts = tomllib.loads((Path(APP).parent / ".streamlit" / "config.toml").read_text())["server"]["allowedHosts"]
    assert hosts, "an empty list accepts every Host"
    real = config.get_option
    monkeypatch.setattr(config, "get_option", lambda name: hosts if name == "server.allowedHosts" else real(name))
    for local in ("localhost:8501", "127.0.0.1:8501", "[::1]:8501", "LOCALHOST"):
        assert is_host_allowed(local), local
    for foreign in ("rebind.attacker.example:8501", "localhost.attacker.example", "10.0.0.5:8501", None):
        assert not is_host_allowed(foreign), foreign
