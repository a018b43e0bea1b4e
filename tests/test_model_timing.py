"""Whole-model latency, dense against compressed (lems_core/latency/model_timing.py), its record and the CLI flag.

Tiny random-weight models; no assertion is about which model is faster (CPU times are noisy).
"""
import copy
import json

import numpy as np
import pytest

from lems_core.compression import LowRankLinear, compress_model
from lems_core.decompositions import Decomposer
from lems_core.latency import DeviceProfile, Workload, cache_path, current_key, rank_grid
from lems_core.latency.measure import GRID_POINTS
from lems_core.latency.model_timing import (ModelTiming, ModelTimingError, PredictedFraction, TimingSettings,
                                            WorkloadTiming, comparison_rows, predicted_fractions,
                                            time_dense_and_compressed)
from lems_core.model import compressible_layers
from lems_core.plan import from_loadconfig
from lems_core.results import ResultsFileError, check_record, read_results_file

from helpers import tiny_loaded, uniform_ranks
from shipped_fixture import write_shipped
from test_latency import hand_times

SMALL = TimingSettings(tokens=16, repeats=3, decode_steps=2)


@pytest.fixture(scope="module")
def swapped():
    """(model, dense modules, low-rank modules) of a tiny llama compressed by SVD at 0.3 of break-even; left dense."""
    model = tiny_loaded(5).model
    ranks = uniform_ranks(model, 0.3)
    dense = {name: model.get_submodule(name) for name in ranks}
    svd = Decomposer("svd")
    compress_model(model, ranks, lambda layer: svd(layer, dense[layer.name].weight))
    low_rank = {name: model.get_submodule(name) for name in ranks}
    for name, module in dense.items():  # back to dense: the timing must swap by itself
        from lems_core.compression import set_module

        set_module(model, name, module)
    return model, dense, low_rank


@pytest.fixture(scope="module")
def timing(swapped):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return time_dense_and_compressed(*swapped, SMALL)
    finally:
        torch.set_num_threads(before)


def test_the_timing_has_positive_medians_and_speedup_dense_over_compressed(timing):
    for measured in (timing.prefill, timing.decode):
        assert measured.dense_s > 0 and measured.compressed_s > 0
        assert measured.speedup == pytest.approx(measured.dense_s / measured.compressed_s, rel=1e-12)
        assert measured.to_dict()["speedup"] == measured.speedup
    assert (timing.repeats, timing.tokens, timing.decode_steps, timing.device) == (3, 16, 2, "cpu")
    assert timing.threads == 1 and (timing.load_average is None or timing.load_average >= 0)


def test_each_turn_runs_its_own_modules_and_the_model_is_left_as_it_was(swapped):
    model, dense, low_rank = swapped
    name = next(n for n, m in low_rank.items() if isinstance(m, LowRankLinear))
    calls = {"dense": 0, "compressed": 0}
    hooks = [dense[name].register_forward_hook(lambda *_: calls.__setitem__("dense", calls["dense"] + 1)),
             low_rank[name].register_forward_hook(lambda *_: calls.__setitem__("compressed", calls["compressed"] + 1))]
    try:
        time_dense_and_compressed(model, dense, low_rank, TimingSettings(tokens=8, repeats=2, decode_steps=3))
    finally:
        for hook in hooks:
            hook.remove()
    per_turn = 1 + 3  # one prefill, three decode tokens
    assert calls == {"dense": 1 + (1 + 2) * per_turn, "compressed": (1 + 2) * per_turn}  # + the cache's prompt pass
    assert all(model.get_submodule(n) is m for n, m in dense.items())


def test_settings_and_sizes_that_cannot_be_timed_are_refused(swapped):
    model, dense, low_rank = swapped
    for bad in ({"tokens": 0}, {"repeats": 101}, {"decode_steps": 1.5}, {"tokens": True}):
        with pytest.raises(ModelTimingError, match="latency timing"):
            TimingSettings(**bad)
    with pytest.raises(ModelTimingError, match="positions; the model has 256"):
        time_dense_and_compressed(model, dense, low_rank, TimingSettings(tokens=255, decode_steps=4))
    with pytest.raises(ModelTimingError, match="same layers"):
        time_dense_and_compressed(model, dense, dict(list(low_rank.items())[1:]), SMALL)


# ------------------------------------------------------------------ the record and the results validator
def record_with(latency) -> dict:
    """A minimal valid result record carrying ``latency``."""
    return {"method": "lems", "decomposition": "svd", "fingerprint": "f", "budget": 0.8, "realised_ratio": 0.79,
            "params_kept": 8, "params_total": 10, "ppl": {"wikitext2": 12.0}, "dense_ppl": {"wikitext2": 10.0},
            "kl": 0.1, "settings": {}, "latency": latency}


def stored(timing: ModelTiming) -> dict:
    predicted = {"decode": PredictedFraction("decode", 0.8, "plan", "abc", 1)}
    return ModelTiming(**{**timing.__dict__, "predicted": predicted}).to_dict()


def test_a_timed_record_round_trips_through_the_results_validator(timing, tmp_path):
    latency = stored(timing)
    check_record(record_with(latency), "record")
    path = write_shipped(tmp_path / "results.json", [record_with(latency), record_with(None)])
    back = read_results_file(path)["results"]
    assert back[0]["latency"] == json.loads(json.dumps(latency))
    assert ModelTiming.from_dict(back[0]["latency"]).predicted["decode"].speedup == pytest.approx(1.25)
    old = record_with(None)
    del old["latency"]
    check_record(old, "record stored before latency was timed")


def _edited(latency: dict, edit) -> dict:
    bad = copy.deepcopy(latency)
    edit(bad)
    return bad


MALFORMED = [
    (lambda d: d["prefill"].update(speedup=d["prefill"]["speedup"] * 2), "is not dense_s / compressed_s"),
    (lambda d: d["decode"].update(dense_s=-1.0), "decode.dense_s must be a finite number > 0"),
    (lambda d: d["decode"].update(compressed_s=float("nan")), "decode.compressed_s must be a finite number > 0"),
    (lambda d: d["prefill"].pop("speedup"), "latency.prefill must be an object"),
    (lambda d: d.pop("threads"), "must be an object with fields"),
    (lambda d: d.update(threads=0), "threads must be a positive integer"),
    (lambda d: d.update(repeats=True), "repeats must be a positive integer"),
    (lambda d: d.update(load_average="high"), "load_average must be a number >= 0 or null"),
    (lambda d: d.update(device=""), "device must be a non-empty string"),
    (lambda d: d.update(predicted={"train": {}}), "predicted must be an object keyed by"),
    (lambda d: d["predicted"]["decode"].update(speedup=3.0), "speedup 1 / fraction"),
    (lambda d: d["predicted"]["decode"].update(source="guess"), "source must be one of"),
    (lambda d: d["predicted"]["decode"].update(tokens=0), "tokens must be a positive integer or null"),
]


@pytest.mark.parametrize("edit, message", MALFORMED)
def test_a_malformed_latency_record_is_refused_with_the_field_named(timing, edit, message):
    with pytest.raises(ResultsFileError, match=message):
        check_record(record_with(_edited(stored(timing), edit)), "record")


def test_a_latency_field_that_is_not_an_object_is_refused():
    with pytest.raises(ResultsFileError, match="latency must be an object with fields"):
        check_record(record_with("fast"), "record")


# ------------------------------------------------------------------ predictions and the table
def _plan(model, meta=None):
    layers = compressible_layers(model)
    return from_loadconfig({l.name: 0.5 for l in layers}, layers, "tiny", "fp", method="uniform",
                           decomposition="svd", meta=meta or {})


def test_predictions_come_from_the_plans_latency_budget_then_a_cached_profile(swapped, tmp_path):
    model = swapped[0]
    layers = compressible_layers(model)
    cost = {"kind": "latency", "budget": 0.8, "predicted_latency_fraction": 0.75,
            "workload": {"kind": "decode", "batch": 1, "tokens": 1}, "device_profile": {"id": "p1", "key": {}}}
    assert predicted_fractions(_plan(model), layers, cache_dir=tmp_path) == {}
    own = predicted_fractions(_plan(model, {"cost": cost}), layers, cache_dir=tmp_path)
    assert set(own) == {"decode"} and (own["decode"].fraction, own["decode"].source) == (0.75, "plan")

    workload = Workload.named("prefill")
    shapes = sorted({(l.out_features, l.in_features) for l in layers})
    profile = DeviceProfile(current_key(workload, "cpu"), {s: hand_times(*s, rank_grid(*s, 8, 4)) for s in shapes})
    profile.save(cache_path(profile.key, shapes, 8, GRID_POINTS, cache_dir=tmp_path))
    both = predicted_fractions(_plan(model, {"cost": cost}), layers, cache_dir=tmp_path)
    assert both["decode"].source == "plan" and both["prefill"].source == "device profile"
    assert 0 < both["prefill"].fraction < 1 and both["prefill"].tokens == workload.tokens


def test_the_table_compares_measured_and_predicted_speedup(timing):
    with_prediction = ModelTiming.from_dict(stored(timing))
    rows = {r["workload"].split()[0]: r for r in comparison_rows(with_prediction)}
    decode, prefill = rows["decode"], rows["prefill"]
    assert decode["dense ms"] == pytest.approx(timing.decode.dense_s * 1e3)
    assert decode["measured speedup"] == pytest.approx(timing.decode.speedup)
    assert decode["measured fraction (whole model)"] == pytest.approx(1 / timing.decode.speedup)
    assert decode["predicted fraction (compressible Linears)"] == 0.8
    assert decode["error %"] == pytest.approx(100 * (1.25 - timing.decode.speedup) / timing.decode.speedup)
    assert prefill["predicted speedup"] == "n/a" and prefill["error %"] == "n/a"
    assert np.isfinite(prefill["measured speedup"])


def test_workload_timing_rejects_a_speedup_that_is_not_the_ratio():
    good = WorkloadTiming(2.0, 1.0).to_dict()
    assert WorkloadTiming.from_dict(good, "x").speedup == 2.0
    with pytest.raises(ModelTimingError, match="x.speedup"):
        WorkloadTiming.from_dict({**good, "speedup": 1.0}, "x")


# ------------------------------------------------------------------ the CLI
@pytest.fixture()
def model_folder(tmp_path, monkeypatch):
    """A tiny llama saved with a word tokenizer, a word corpus and a uniform plan for it; cache in tmp_path."""
    from helpers import word_tokenizer
    from lems_core.calibration import CalibrationConfig
    from lems_core.model import model_fingerprint, tiny_model

    monkeypatch.setenv("LEMS_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_model("llama", seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    word_tokenizer(model.config.vocab_size).save_pretrained(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    corpus = tmp_path / "words.txt"
    corpus.write_text("\n".join(" ".join(f"w{i}" for i in rng.integers(2, 256, 12)) for _ in range(200)))
    cfg = CalibrationConfig(dataset=str(corpus), split="train", n_samples=2, seq_len=32, seed=1, n_search=2)
    layers = compressible_layers(model)
    plan = from_loadconfig({l.name: 0.4 for l in layers}, layers, str(tmp_path / "ckpt"), model_fingerprint(model),
                           method="uniform", decomposition="svd", meta={"calibration": cfg.to_dict()})
    return plan.save(tmp_path / "plan.json"), corpus


def _evaluate(plan_path, corpus, *extra):
    from lems_core.cli import main

    return main(["evaluate", "--plan", str(plan_path), "--model", str(plan_path.parent / "ckpt"), "--datasets",
                 str(corpus), "--calib-dataset", str(corpus), "--seq-len", "16", "--max-windows", "1", "--device",
                 "cpu", *extra])


def test_evaluate_measure_latency_records_and_prints_the_figures(model_folder, capsys, one_thread, monkeypatch):
    from lems_core.compression import LowRankLinear
    from lems_core.pipeline import evaluation

    prepared = []

    def spy(model, modules):  # the compressed turn runs the export's inference path
        counts = real(model, modules)
        prepared.append((counts, sum(isinstance(m, LowRankLinear) for m in model.modules())))
        return counts

    real = evaluation.prepare_modules
    monkeypatch.setattr(evaluation, "prepare_modules", spy)
    plan_path, corpus = model_folder
    assert _evaluate(plan_path, corpus, "--measure-latency", "--latency-tokens", "16", "--latency-repeats", "2") == 0
    [(counts, factorised)] = prepared
    assert factorised > 0 and counts["direct"] == factorised
    out = capsys.readouterr()
    timing = ModelTiming.from_dict(json.loads(out.out)["latency"])
    assert (timing.tokens, timing.repeats, timing.device) == (16, 2, "cpu")
    assert timing.prefill.dense_s > 0 and timing.decode.compressed_s > 0 and timing.predicted == {}
    assert "measured speedup" in out.err and "compressible Linears only" in out.err and "n/a" in out.err


def test_evaluate_without_the_flag_records_no_latency(model_folder, capsys, one_thread):
    plan_path, corpus = model_folder
    assert _evaluate(plan_path, corpus) == 0
    assert json.loads(capsys.readouterr().out)["latency"] is None


@pytest.mark.parametrize("extra, message", [
    (["--measure-latency", "--latency-tokens", "300"], "positions; the model has 256"),
    (["--latency-repeats", "3"], "need --measure-latency"),
])
def test_latency_options_that_cannot_be_measured_exit_2(model_folder, capsys, extra, message):
    plan_path, corpus = model_folder
    assert _evaluate(plan_path, corpus, *extra) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--latency-tokens", "0"), ("--latency-repeats", "101"),
                                           ("--latency-tokens", "9" * 400)])
def test_out_of_range_latency_numbers_are_argparse_errors(option, value, capsys):
    from lems_core.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--plan", "p.json", "--measure-latency", option, value])
    assert exit_info.value.code == 2 and f"error: argument {option}" in capsys.readouterr().err
