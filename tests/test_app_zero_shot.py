"""The Compress page's zero-shot and submission limits, driven with AppTest (fixtures from test_app).

Local task YAMLs come only from the server's list, one submission queues a bounded
number of evaluations, and malformed stored zero-shot scores never break the page.
"""
import json

from lems_core.profile import synthetic_profile

import test_app
from test_app import button_labelled, charts, goto

profile_dir, app = test_app.profile_dir, test_app.app  # the page fixtures, shared with test_app


def test_zero_shot_tasks_are_chosen_from_the_server_list_never_typed(app, monkeypatch, tmp_path):
    monkeypatch.delenv("LEMS_TASKS_DIR", raising=False)
    goto(app, "app_pages/compress.py")
    local = app.multiselect(key="zero_shot_local")
    assert local.options == [] and local.disabled
    assert not any("yaml" in t.label.lower() or "task" in t.label.lower() for t in app.text_input)

    # with a folder offered, a forged value (a server path, existing or not) never reaches a job, and the page
    # answers the same either way: nothing tells whether the path exists
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.yaml").write_text("task: mine\n")
    monkeypatch.setenv("LEMS_TASKS_DIR", str(tmp_path / "tasks"))
    goto(app, "app_pages/allocate.py")
    goto(app, "app_pages/compress.py")
    app.toggle(key="zero_shot_on").set_value(True).run()  # the task fields are enabled by the toggle
    app.multiselect(key="zero_shot_tasks").set_value([])
    answers = []
    for forged in (tmp_path / "tasks" / "mine.yaml", tmp_path / "no-such.yaml"):
        app.multiselect(key="zero_shot_local").set_value([str(forged)])
        button_labelled(app, "Compress & evaluate").click().run()
        assert not app.exception and "eval_job_id" not in app.session_state
        answers.append([e.value for e in app.error])
    assert answers[0] == answers[1] and answers[0] == ["Zero-shot accuracy is on: choose at least one task."]


EVALUATION_CAP = 24  # the documented per-submission cap of the Compress page


def test_one_submission_may_queue_at_most_the_evaluation_cap(app, monkeypatch):
    import lems_core.pipeline as pipeline

    MAX_EVALUATIONS = EVALUATION_CAP
    seen = []
    monkeypatch.setattr(pipeline.jobs, "evaluate_plan", lambda plan, *a, **k: seen.append(plan))
    goto(app, "app_pages/compress.py")
    methods = ["lems", "uniform", "svdllm_v2", "mrcs"]
    budgets = [round(0.3 + 0.01 * i, 2) for i in range(MAX_EVALUATIONS // len(methods) + 1)]
    app.multiselect[1].set_value(methods)
    next(t for t in app.text_input if t.label.startswith("at budgets")).set_value(", ".join(map(str, budgets)))
    button_labelled(app, "Compress & evaluate").click().run()
    assert not app.exception
    assert any(f"at most {MAX_EVALUATIONS}" in e.value for e in app.error)
    assert "eval_job_id" not in app.session_state and not seen


def test_malformed_zero_shot_fields_show_as_invalid_and_the_rest_still_plots(app, profile_dir):
    from lems_core.results import ResultStore

    good = {"tasks": {"piqa": {"acc": 0.7, "acc_norm": 0.6}}, "mean": {"acc": 0.7, "acc_norm": 0.6}}
    base = {"method": "lems", "decomposition": "svd", "budget": 0.8, "realised_ratio": 0.8, "ppl": {}, "dense_ppl": {},
            "kl": 0.1, "params_kept": 8, "params_total": 10, "settings": {},
            "fingerprint": synthetic_profile().fingerprint}
    bad_fields = [{"tasks": "piqa"}, {"mean": [0.5]}, {"tasks": {"piqa": {"acc": "high"}}}, "oops", 3,
                  {"tasks": {"piqa": [0.5]}}, {"mean": {"acc": {"x": 1}}}]
    store = ResultStore(profile_dir.parents[1])
    store.add({**base, "zero_shot": good, "dense_zero_shot": good})
    for i, bad in enumerate(bad_fields):
        store.add({**base, "budget": 0.7 - 0.01 * i, "zero_shot": bad, "dense_zero_shot": {"mean": "x"}})
    goto(app, "app_pages/compress.py")
    table = app.dataframe[0].value
    assert len(table) == 1 + len(bad_fields)
    assert table["zero_shot"].tolist().count("invalid") == len(bad_fields)
    assert table["dense_zero_shot"].tolist().count("invalid") == len(bad_fields)
    assert table["mean acc"].notna().sum() == 1 and table["acc piqa"].dropna().tolist() == [0.7]
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in charts(app)]
    assert any(t.startswith("Zero-shot mean acc") for t in titles)
