"""Zero-shot accuracy through lm-eval, offline, on a multiple-choice task these tests write themselves."""
import json

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
    monkeypatch.setattr(pipeline, "get_model", lambda source, device=None, offload=None: loaded)
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
