"""The Compress page's recovery option and its job submission, driven with AppTest (fixtures from test_app).

No training runs here: the registry's submit is replaced, so the test sees what would be queued.
"""
import pytest

from lems_core.jobs import JobLimitError, JobRegistry
from lems_core.recovery import RecoveryConfig

import test_app
from test_app import button_labelled, goto

profile_dir, app = test_app.profile_dir, test_app.app  # the page fixtures, shared with test_app
FIELDS = ("recovery_steps", "recovery_lr", "recovery_seed")


def open_compress(at):
    """The Compress page, with the Allocate page's current plan offered there."""
    return goto(goto(at, "app_pages/allocate.py"), "app_pages/compress.py")


@pytest.fixture
def submitted(monkeypatch):
    """What the page hands JobRegistry.submit, each call then refused as over the registry's cap."""
    calls = []

    def refuse(self, name, fn, *args, **kwargs):
        calls.append((name, fn, args, kwargs))
        raise JobLimitError("4 jobs are already queued or running: wait for one to finish")

    monkeypatch.setattr(JobRegistry, "submit", refuse)
    return calls


def test_a_full_job_registry_shows_an_error_and_starts_nothing(app, submitted):
    open_compress(app)
    button_labelled(app, "Compress & evaluate").click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert len(submitted) == 1
    assert any("Evaluation not started" in e.value and "already queued" in e.value for e in app.error)
    assert "eval_job_id" not in app.session_state


def test_the_recovery_toggle_enables_its_fields_and_reaches_the_job(app, submitted):
    open_compress(app)
    assert all(app.number_input(key=k).disabled for k in FIELDS)
    button_labelled(app, "Compress & evaluate").click().run()
    assert "recovery" not in submitted[-1][2][0].keywords  # off: the default evaluation, unchanged
    app.toggle(key="recovery_on").set_value(True).run()
    assert not any(app.number_input(key=k).disabled for k in FIELDS)
    assert app.number_input(key="recovery_steps").value == 50
    app.number_input(key="recovery_steps").set_value(20)
    app.number_input(key="recovery_lr").set_value(1e-3)
    app.number_input(key="recovery_seed").set_value(7)
    button_labelled(app, "Compress & evaluate").click().run()
    assert not app.exception, [e.value for e in app.exception]
    config = submitted[-1][2][0].keywords["recovery"]
    assert isinstance(config, RecoveryConfig)
    assert (config.steps, config.lr, config.seed, config.mode) == (20, 1e-3, 7, "lora")
    assert config.dataset == "synthetic"  # the profile's calibration text, not the evaluation text


def test_recovery_with_zero_shot_is_refused_before_a_job_is_queued(app, submitted):
    open_compress(app)
    app.toggle(key="recovery_on").set_value(True)
    app.toggle(key="zero_shot_on").set_value(True).run()
    button_labelled(app, "Compress & evaluate").click().run()
    assert any("Recovery and zero-shot" in e.value for e in app.error) and not submitted


def test_recovered_results_are_marked_in_the_table():
    from app_pages import tables

    base = {"method": "lems", "budget": 0.8, "realised_ratio": 0.8, "ppl": {"wikitext2": 20.0}, "settings": {}}
    healed = dict(base, recovery={"mode": "lora", "steps": 50, "steps_done": 50, "lr": 2e-4})
    frame = tables.results_frame([base, healed])
    assert list(frame.columns[:2]) == ["method", "recovered"]
    assert list(frame["recovered"]) == ["", "lora, 50 steps, lr 0.0002"]
    assert "recovered" not in tables.results_frame([base])
