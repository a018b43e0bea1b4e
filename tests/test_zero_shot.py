"""Zero-shot accuracy through lm-eval, offline, on a multiple-choice task these tests write themselves.

The second half: a local task YAML is validated before lm-eval sees it and runs no code
(injections, aliases, FIFOs, includes outside its folder are refused).
"""
import json
import os
from pathlib import Path

import pytest
import torch

from lems_core.zero_shot import (PAPER_TASKS, HubTasksUnavailable, ZeroShotResult, load_tasks, parse_tasks,
                                 task_manager, zero_shot)

from helpers import word_loaded

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_target: label
doc_to_choice: choices
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No hub: the env switches, and the flags datasets / huggingface_hub read at import time."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def next_word_task(model, folder, name="next_word", n_docs=40, n_choices=4, seed=0):
    """A task the dense model solves by construction: the answer is its own most likely next word.

    The distractors are its next three most likely words, so a model whose predictions
    moved (a heavily compressed one) picks them often. The jsonl is referenced relatively.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        contexts = torch.randint(2, model.config.vocab_size, (n_docs, 12), generator=g)
        logits = model(contexts).logits[:, -1]
    logits[:, :2] = -torch.inf  # never <unk> / <eos>
    top = logits.topk(n_choices, dim=-1).indices
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.jsonl", "w") as f:
        for ctx, best in zip(contexts, top):
            order = torch.randperm(n_choices, generator=g).tolist()
            f.write(json.dumps({"context": " ".join(f"w{int(t)}" for t in ctx),
                                "choices": [f"w{int(best[j])}" for j in order], "label": order.index(0)}) + "\n")
    path = folder / f"{name}.yaml"
    path.write_text(TASK_YAML.format(name=name, data=f"{name}.jsonl"))
    return str(path)


@pytest.fixture()
def zs_plan(tmp_path, monkeypatch):
    """A word-tokenizer tiny llama behind pipeline.get_model, its next-word task, and a rank-1 svd plan."""
    import lems_core.pipeline as pipeline
    from lems_core.calibration import CalibrationConfig
    from lems_core.model import compressible_layers
    from lems_core.plan import from_loadconfig

    loaded = word_loaded(3)
    monkeypatch.setattr(pipeline.models, "get_model", lambda source, device=None, offload=None: loaded)
    monkeypatch.setenv("LEMS_CACHE_DIR", str(tmp_path / "cache"))
    task = next_word_task(loaded.model, tmp_path / "tasks")
    corpus = tmp_path / "corpus.txt"
    g = torch.Generator().manual_seed(1)
    corpus.write_text("\n".join(" ".join(f"w{int(t)}" for t in torch.randint(2, 256, (12,), generator=g))
                                for _ in range(200)))
    cfg = CalibrationConfig(dataset=str(corpus), split="train", n_samples=2, seq_len=32, seed=1, n_search=2)
    layers = compressible_layers(loaded.model)
    plan = from_loadconfig({l.name: 1 for l in layers}, layers, "tiny-llama", loaded.fingerprint, method="uniform",
                           decomposition="svd", meta={"calibration": cfg.to_dict()})
    return loaded, task, plan.save(tmp_path / "plan.json"), corpus


def test_cli_zero_shot_dense_solves_the_task_and_rank_one_does_not(zs_plan, tmp_path, capsys):
    from lems_core.cli import main
    from lems_core.results import ResultStore

    loaded, task, plan_path, corpus = zs_plan
    assert main(["evaluate", "--plan", str(plan_path), "--datasets", str(corpus), "--seq-len", "32",
                 "--max-windows", "2", "--device", "cpu", "--calib-dataset", str(corpus), "--tasks", task]) == 0
    out = json.loads(capsys.readouterr().out)
    dense, comp = out["dense_zero_shot"], out["zero_shot"]
    assert dense["tasks"]["next_word"]["acc"] == 1.0  # its own argmax is always among, and first of, the choices
    assert comp["tasks"]["next_word"]["acc"] < 0.75  # rank 1 everywhere moves most predictions
    assert comp["tasks"]["next_word"]["acc_norm"] is not None and comp["tasks"]["next_word"]["samples"] == 40
    assert comp["mean"]["acc"] == comp["tasks"]["next_word"]["acc"]
    assert out["ppl"] and out["kl"] > 0  # perplexity and KL are measured in the same run
    stored = ResultStore().all()[-1]
    assert stored["zero_shot"] == comp and stored["dense_zero_shot"] == dense


def test_zero_shot_wraps_the_model_in_place_and_limit_caps_documents(tmp_path):
    loaded = word_loaded(3)
    task = next_word_task(loaded.model, tmp_path / "t", n_docs=12)
    result = zero_shot(loaded.model, loaded.tokenizer, [task], limit=5)
    score = result.tasks["next_word"]
    assert score.samples == 5 and score.acc == 1.0
    assert ZeroShotResult.from_dict(result.to_dict()).to_dict() == result.to_dict()


def test_hub_tasks_unreachable_are_named_and_local_ones_still_load(tmp_path):
    loaded = word_loaded(3)
    task = next_word_task(loaded.model, tmp_path / "t", n_docs=4)
    manager = task_manager(["piqa", task])
    with pytest.raises(HubTasksUnavailable) as info:
        load_tasks(["piqa", task, "arc_easy"], manager)
    assert set(info.value.tasks) == {"piqa", "arc_easy"}
    assert "piqa, arc_easy" in str(info.value) and "need the Hugging Face hub" in str(info.value)
    assert list(load_tasks([task], manager)) == [task]
    with pytest.raises(ValueError, match="unknown lm-eval task.*no_such_task"):
        load_tasks(["no_such_task"], manager)


def test_task_specs_expand_the_paper_list_and_bad_local_tasks_fail_clearly(zs_plan, tmp_path, capsys):
    from lems_core.cli import main

    _, _, plan_path, _ = zs_plan

    assert parse_tasks("paper") == list(PAPER_TASKS) and len(PAPER_TASKS) == 8
    assert parse_tasks("piqa, paper,x.yaml") == list(PAPER_TASKS) + ["x.yaml"]
    with pytest.raises(ValueError, match="no zero-shot task"):
        parse_tasks(" , ")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    with pytest.raises(ValueError, match="needs a 'task:' name"):
        load_tasks([str(bad)])
    assert main(["evaluate", "--plan", str(plan_path), "--tasks", f"{tmp_path / 'nope.yaml'}"]) == 2
    assert "task YAML not found" in capsys.readouterr().err


def test_results_table_and_figure_show_zero_shot_accuracy():
    from app_pages import figures, tables

    def record(method, ratio, acc):
        scores = {"tasks": {"piqa": {"acc": acc, "acc_norm": acc - 0.01}, "boolq": {"acc": acc + 0.1, "acc_norm": None}},
                  "mean": {"acc": acc + 0.05}}
        return {"method": method, "budget": ratio, "realised_ratio": ratio, "ppl": {}, "decomposition": "kfac",
                "zero_shot": scores, "dense_zero_shot": {"tasks": {}, "mean": {"acc": 0.9}}}

    frame = tables.results_frame([record("lems", 0.8, 0.7), record("uniform", 0.8, 0.6), record("lems", 0.6, 0.5)])
    assert {"acc piqa", "acc_norm piqa", "acc boolq", "mean acc", "dense mean acc"} <= set(frame.columns)
    assert frame["mean acc"].tolist() == pytest.approx([0.75, 0.65, 0.55])
    assert tables.zero_shot_metrics(frame) == ["mean acc", "acc boolq", "acc piqa", "acc_norm piqa"]
    fig = figures.accuracy_vs_ratio_figure(frame, "mean acc")
    assert len(fig.data) == 2 and "mean acc" in fig.layout.title.text
    assert any(s.y0 == pytest.approx(0.9) for s in fig.layout.shapes)  # dense line


def test_means_are_over_the_tasks_that_define_each_metric():
    from lems_core.zero_shot import TaskScore

    result = ZeroShotResult({"piqa": TaskScore(0.5, 0.7), "boolq": TaskScore(0.8, None)})
    assert result.mean == pytest.approx({"acc": 0.65, "acc_norm": 0.7})
    assert ZeroShotResult({}).mean == {}


# ------------------------------------------------------------------ local task YAMLs run no code
def write_task(folder, name="safe", **fields) -> str:
    """A valid local task YAML over a one-document jsonl, with ``fields`` (YAML lines) added or replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text(json.dumps({"context": "w3 w4", "choices": ["w5", "w6"], "label": 0}) + "\n")
    lines, replaced = [], False
    for line in TASK_YAML.format(name=name, data="data.jsonl").splitlines():
        if not line.startswith(" "):  # a top-level key: its indented lines follow it (or go with it)
            replaced = line.split(":", 1)[0] in fields
        if not replaced:
            lines.append(line)
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines + [f"{k}: {v}" for k, v in fields.items()]) + "\n")
    return str(path)


def marker_module(folder, name, marker) -> None:
    """A Python module that creates ``marker`` when it is imported (what an attacker's !function loads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                       "def proc(docs):\n    return docs\n")


def injections(tmp_path) -> dict[str, tuple[str, str]]:
    """Name -> (task YAML path, what the refusal names) for the three ways a YAML used to run code."""
    marker = tmp_path / "marker"
    tasks = tmp_path / "tasks"
    jinja = f"\"{{{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}}}{{{{context}}}}\""
    marker_module(tasks, "evilmod", marker)
    marker_module(tmp_path / "elsewhere", "payload", marker)
    return {
        "jinja": (write_task(tasks, "jinja", doc_to_text=jinja), "plain field access"),
        "function next to the YAML": (write_task(tasks, "local_fn", process_docs="!function evilmod.proc"),
                                      "!function"),
        "function by absolute path": (write_task(tasks, "abs_fn", process_docs=f"!function {tmp_path}/elsewhere/"
                                                                               "payload.proc"), "!function"),
    }


@pytest.mark.parametrize("kind", ["jinja", "function next to the YAML", "function by absolute path"])
def test_task_yaml_injections_are_refused_before_anything_runs(tmp_path, kind):
    from lems_core.zero_shot import UnsafeTaskYAML, tasks_key

    path, named = injections(tmp_path)[kind]
    with pytest.raises(UnsafeTaskYAML, match=named):
        load_tasks([path])
    with pytest.raises(UnsafeTaskYAML, match=named):
        tasks_key([path])
    assert not (tmp_path / "marker").exists()


def test_cli_refuses_an_injected_task_yaml_with_exit_2_before_the_model_loads(zs_plan, tmp_path, monkeypatch,
                                                                              capsys):
    import lems_core.pipeline as pipeline
    from lems_core.cli import main

    _, _, plan_path, corpus = zs_plan
    asked = []
    monkeypatch.setattr(pipeline.models, "get_model", lambda *a, **k: asked.append(a))
    for path, named in injections(tmp_path).values():
        assert main(["evaluate", "--plan", str(plan_path), "--device", "cpu", "--calib-dataset", str(corpus),
                     "--tasks", path]) == 2
        assert named in capsys.readouterr().err
    assert not asked and not (tmp_path / "marker").exists()


def test_a_safe_task_yaml_still_loads_with_field_access_and_an_include_inside_its_folder(tmp_path):
    from lems_core.zero_shot import check_task_yaml

    folder = tmp_path / "tasks"
    path = write_task(folder, "safe", doc_to_text="\"Q: {{ context|trim }} {{choices[0]}} {{ choices[-1] }}\"")
    (folder / "common").mkdir()
    (folder / "common" / "base.yaml").write_text("description: \"{{ context }}\"\ntarget_delimiter: \"-\"\n")
    text = Path(path).read_text().replace('target_delimiter: " "\n', "")
    Path(path).write_text(text + "include: common/base.yaml\n")
    cfg = check_task_yaml(path)
    assert cfg["target_delimiter"] == "-" and cfg["description"] == "{{ context }}" and "include" not in cfg
    assert list(load_tasks([path])) == [path]


@pytest.mark.parametrize("template", ["{{context}}", "{{ choices.text }}", "{{choices[0]}}", "{{doc['q']}}",
                                      "{{ q|trim }}", "{{[a, b]}}", "Q: {{q}}\nA:", "{{x[-1]}}", "{{a ~ ' ' ~ b}}",
                                      "{# note #}{{q|replace('a', 'b')}}", "plain {text} with braces"])
def test_templates_of_plain_field_access_are_accepted(template):
    from lems_core.task_yaml import check_template

    check_template(template, "test")


@pytest.mark.parametrize("template", ["{% for x in y %}{{x}}{% endfor %}", "{% set a = 1 %}", "{{ x.upper() }}",
                                      "{{ x.__class__ }}", "{{ x._private }}", "{{ x['__class__'] }}", "{{ lipsum }}",
                                      "{{ range }}", "{{ self }}", "{{ x|attr('y') }}", "{{ x|map('upper') }}",
                                      "{{ x[y] }}", "{{ 1 + 2 }}", "{{ x if y }}", "{{ x|replace(y, 'b') }}",
                                      "{{ cycler.next }}", "{{ {'a': 1} }}"])
def test_templates_beyond_field_access_are_refused(template):
    from lems_core.task_yaml import UnsafeTaskYAML, check_template

    with pytest.raises(UnsafeTaskYAML):
        check_template(template, "test")


@pytest.mark.parametrize("fields, named", [
    ({"class": "my.Task"}, "'class:' names Python code"),
    ({"custom_dataset": "x"}, "'custom_dataset:' names Python code"),
    ({"metric_list": "\n  - metric: /tmp/metric_script.py"}, "not one lm-eval registers"),
    ({"metric_list": "\n  - metric: acc\n    hf_evaluate: true"}, "hf_evaluate"),
    ({"doc_to_target": "!!python/object/apply:os.system ['true']"}, "tag"),
    ({"doc_to_target": "!custom label"}, "tag"),
])
def test_keys_tags_and_metrics_that_would_run_code_are_refused(tmp_path, fields, named):
    from lems_core.zero_shot import UnsafeTaskYAML

    with pytest.raises(UnsafeTaskYAML, match=named):
        load_tasks([write_task(tmp_path / "tasks", **fields)])


def test_a_billion_laughs_yaml_is_refused_without_expanding(tmp_path):
    from lems_core.zero_shot import UnsafeTaskYAML, tasks_key

    levels = ["lol0: &l0 [" + ", ".join(['"lol"'] * 10) + "]"]
    levels += [f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 6)]
    path = write_task(tmp_path / "tasks", metadata="\n  " + "\n  ".join(levels))  # 10^6 strings once expanded
    for load in (load_tasks, tasks_key):
        with pytest.raises(UnsafeTaskYAML, match="anchors and aliases"):
            load([path])


def test_a_deeply_nested_yaml_is_a_task_yaml_error(tmp_path):
    from lems_core.zero_shot import TaskYAMLError

    path = write_task(tmp_path / "tasks", metadata="[" * 100 + "]" * 100)
    with pytest.raises(TaskYAMLError, match="nested more than"):
        load_tasks([path])


def _within_a_second(fn, fifos):
    """fn's exception, or a failure if it takes more than a second; a reader stuck on a FIFO is released."""
    import threading
    import time

    outcome = {}

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 (the test inspects it)
            outcome["error"] = exc

    started = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=1.0)
    elapsed = time.monotonic() - started
    if worker.is_alive():
        for fifo in fifos:  # a writer end lets a blocked open() return, so the thread ends
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        worker.join(timeout=5)
        pytest.fail(f"reading a FIFO task YAML blocked for more than a second ({elapsed:.1f} s)")
    return outcome.get("error")


def test_a_fifo_task_yaml_or_include_errors_within_a_second(tmp_path):
    from lems_core.zero_shot import TaskYAMLError

    folder = tmp_path / "tasks"
    folder.mkdir()
    os.mkfifo(folder / "pipe.yaml")
    including = write_task(folder, "including")
    Path(including).write_text(Path(including).read_text() + "include: pipe.yaml\n")
    for spec in (str(folder / "pipe.yaml"), including):
        error = _within_a_second(lambda: load_tasks([spec]), [folder / "pipe.yaml"])
        assert isinstance(error, TaskYAMLError) and "named pipe" in str(error), error


def test_an_oversized_task_yaml_is_refused(tmp_path):
    from lems_core.task_yaml import MAX_YAML_BYTES, TaskYAMLError

    path = write_task(tmp_path / "tasks")
    Path(path).write_text(Path(path).read_text() + "# " + "x" * MAX_YAML_BYTES + "\n")
    with pytest.raises(TaskYAMLError, match="too large"):
        load_tasks([path])


def test_includes_outside_the_task_folder_and_cycles_are_refused(tmp_path):
    from lems_core.zero_shot import UnsafeTaskYAML

    folder = tmp_path / "tasks"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "base.yaml").write_text("target_delimiter: \"-\"\n")
    for name, include in (("up", "../outside/base.yaml"), ("absolute", str(outside / "base.yaml"))):
        path = write_task(folder, name)
        Path(path).write_text(Path(path).read_text() + f"include: {include}\n")
        with pytest.raises(UnsafeTaskYAML, match="outside the task's folder"):
            load_tasks([path])
    (folder / "link.yaml").symlink_to(outside / "base.yaml")  # a link inside the folder to a file outside it
    path = write_task(folder, "linked")
    Path(path).write_text(Path(path).read_text() + "include: link.yaml\n")
    with pytest.raises(UnsafeTaskYAML, match="outside the task's folder"):
        load_tasks([path])
    (folder / "a.yaml").write_text("include: b.yaml\n")
    (folder / "b.yaml").write_text("include: a.yaml\n")
    path = write_task(folder, "cycle")
    Path(path).write_text(Path(path).read_text() + "include: a.yaml\n")
    with pytest.raises(UnsafeTaskYAML, match="include cycle"):
        load_tasks([path])


def test_the_offered_task_files_are_the_yamls_of_the_configured_folder(tmp_path, monkeypatch):
    from lems_core.zero_shot import TASKS_DIR_ENV, offered_task_files

    monkeypatch.delenv(TASKS_DIR_ENV, raising=False)
    assert offered_task_files() == {}
    folder = tmp_path / "tasks"
    write_task(folder, "b_task")
    write_task(folder, "a_task")
    os.mkfifo(folder / "pipe.yaml")
    (folder / "sub.yaml").mkdir()
    monkeypatch.setenv(TASKS_DIR_ENV, str(folder))
    assert offered_task_files() == {"a_task.yaml": folder / "a_task.yaml", "b_task.yaml": folder / "b_task.yaml"}
    monkeypatch.setenv(TASKS_DIR_ENV, str(tmp_path / "missing"))
    assert offered_task_files() == {}
