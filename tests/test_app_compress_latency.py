"""The Compress & evaluate page's latency timing, driven with AppTest (fixtures from test_app).

No real timing: results carry made-up latency records, and the evaluation job is a fake.
"""
import pytest

from lems_core.latency.model_timing import ModelTiming, PredictedFraction, TimingSettings, WorkloadTiming
from lems_core.profile import Profile
from lems_core.results import ResultStore

import test_app
from shipped_fixture import fixture_record
from test_app import _wait_for_job, button_labelled, goto

profile_dir, app = test_app.profile_dir, test_app.app  # the page fixtures, shared with test_app

TIMING = ModelTiming(WorkloadTiming(0.2, 0.16), WorkloadTiming(0.05, 0.04), threads=1, load_average=3.5,
                     device="cpu", repeats=5, tokens=256, decode_steps=4,
                     predicted={"decode": PredictedFraction("decode", 0.8, "plan", "p1", 1)})


def latency_table(at):
    return next(d.value for d in at.dataframe if "measured speedup" in d.value.columns)


def store(profile_dir, latency) -> None:
    record = fixture_record(Profile.load(profile_dir), "lems", 0.8)
    ResultStore(profile_dir.parent.parent).add({**record, "latency": latency})


def test_a_timed_result_shows_measured_against_predicted_speedup(app, profile_dir):
    store(profile_dir, TIMING.to_dict())
    goto(app, "app_pages/compress.py")
    table = latency_table(app).set_index("workload")
    decode, prefill = table.loc["decode per token, after 256 (4 new)"], table.loc["prefill 1x256"]
    assert (decode["dense ms"], decode["compressed ms"]) == pytest.approx((50.0, 40.0))
    assert float(decode["measured speedup"]) == pytest.approx(1.25)
    assert float(decode["predicted fraction (compressible Linears)"]) == pytest.approx(0.8)
    assert float(decode["error %"]) == pytest.approx(0.0, abs=1e-9)
    assert prefill["predicted speedup"] == "n/a"
    assert any("compressible Linears only" in c.value and "load average 3.5" in c.value for c in app.caption)


def test_a_malformed_stored_latency_record_is_an_error_not_a_table(app, profile_dir):
    broken = TIMING.to_dict()
    broken["prefill"]["speedup"] = 9.0
    store(profile_dir, broken)
    goto(app, "app_pages/compress.py")
    assert any("latency record is malformed" in e.value and "dense_s / compressed_s" in e.value for e in app.error)
    assert not any("measured speedup" in d.value.columns for d in app.dataframe)


def test_results_without_latency_show_no_latency_section(app, profile_dir):
    store(profile_dir, None)
    goto(app, "app_pages/compress.py")
    assert not any("measured speedup" in d.value.columns for d in app.dataframe)
    assert not any("Latency" in h.value for h in app.subheader)


def test_the_toggle_sends_the_timing_settings_to_the_job(app, monkeypatch):
    import lems_core.pipeline as pipeline

    seen = []

    def fake_evaluate(plan, datasets, protocol=None, run=None, calibration=None, latency=None, **_):
        seen.append(latency)
        summary = plan.summary
        return pipeline.EvalResult(
            method=plan.method, decomposition=plan.decomposition, budget=plan.budget,
            realised_ratio=summary["realised_ratio"], ppl={"wikitext2": 12.0}, dense_ppl={"wikitext2": 10.0},
            kl=0.1, params_kept=summary["params_kept"], params_total=summary["params_total"], seconds=0.1,
            device="cpu", model_source=plan.model_source, fingerprint=plan.fingerprint, latency=TIMING.to_dict())

    monkeypatch.setattr(pipeline.jobs, "evaluate_plan", fake_evaluate)
    goto(app, "app_pages/allocate.py")
    goto(app, "app_pages/compress.py")
    assert app.number_input(key="latency_tokens").disabled
    app.toggle(key="latency_on").set_value(True).run()
    app.number_input(key="latency_tokens").set_value(128)
    app.number_input(key="latency_repeats").set_value(3)
    button_labelled(app, "Compress & evaluate").click().run()
    state = _wait_for_job(app, "eval_job_id")
    assert state.status == "done", state.error
    assert seen == [TimingSettings(tokens=128, repeats=3)]
    app.run()
    assert float(latency_table(app).set_index("workload").loc["prefill 1x256", "measured speedup"]) == pytest.approx(1.25)
