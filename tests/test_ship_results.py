"""studies/ship_results.py: a long run resumes (finished cells are not measured again) and keeps
each protocol and decomposition apart, without running a model (the evaluation is faked)."""
from __future__ import annotations

import argparse
import copy
import json

import pytest
from shipped_fixture import fixture_record, write_shipped

from lems_core.evaluation import QUICK_EVAL, REFERENCE_EVAL
from lems_core.profile import synthetic_profile
from studies import ship_results


@pytest.fixture
def profile_dir(tmp_path):
    return synthetic_profile().save(tmp_path / "profile")


def _with_protocol(record: dict, protocol, ppl: float, decomposition: str | None = None) -> dict:
    record = copy.deepcopy(record)
    record["settings"]["protocol"] = protocol.to_dict()
    record["ppl"] = {"wikitext2": ppl}
    record["decomposition"] = decomposition or record["decomposition"]
    return record


def _args(profile_dir, out, **kw):
    base = dict(profile=profile_dir, cache_dir=None, methods=["uniform", "lems"], ratios=[0.8], out=str(out),
                protocol="reference", datasets=["wikitext2"], decomposition=None, log_every=0.0)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def fake_eval(monkeypatch):
    """Replace the model evaluation with a record of its calls; ppl 10 x (call number)."""
    calls = []

    def evaluate(plan, *, profile, run, decomposition, datasets, protocol):
        calls.append((plan.method, plan.budget, decomposition, protocol.name, tuple(datasets)))
        record = _with_protocol(fixture_record(profile, plan.method, plan.budget), protocol, 0.0, decomposition)
        record["ppl"] = record["dense_ppl"] = {d: 10.0 * len(calls) for d in datasets}
        record["settings"]["splits"] = {d: "split" for d in datasets}
        return record

    monkeypatch.setattr(ship_results, "evaluate_and_store", evaluate)
    return calls


def test_finished_cells_are_skipped_and_each_new_one_is_written(tmp_path, profile_dir, fake_eval):
    profile = synthetic_profile()
    quick = _with_protocol(fixture_record(profile, "uniform", 0.8), QUICK_EVAL, 100.0)
    done = _with_protocol(fixture_record(profile, "uniform", 0.8), REFERENCE_EVAL, 80.0)
    out = write_shipped(tmp_path / "results.json", [quick, done])
    ship_results.run(_args(profile_dir, out))
    assert fake_eval == [("lems", 0.8, None, "reference", ("wikitext2",))]  # uniform 0.8 reference was there already
    records = json.loads(out.read_text())["results"]
    assert [(r["method"], r["settings"]["protocol"]["name"]) for r in records] == [
        ("uniform", "quick"), ("uniform", "reference"), ("lems", "reference")]
    ship_results.run(_args(profile_dir, out))  # a second run finds everything measured
    assert len(fake_eval) == 1


def test_another_decomposition_is_its_own_cell_and_row(tmp_path, profile_dir, fake_eval):
    profile = synthetic_profile()
    out = write_shipped(tmp_path / "results.json", [
        _with_protocol(fixture_record(profile, "lems", 0.8), QUICK_EVAL, 50.0),
        _with_protocol(fixture_record(profile, "lems", 0.8), REFERENCE_EVAL, 40.0)])
    ship_results.run(_args(profile_dir, out, methods=["lems"], protocol="quick", decomposition="saes"))
    assert fake_eval == [("lems", 0.8, "saes", "quick", ("wikitext2",))]
    table = ship_results.protocol_table(out)
    assert "| lems | 0.8 | 50.00 | 40.00 | 0.800 |" in table  # the SAES record does not replace the KFAC one
    assert "lems [saes]" in ship_results.table(out)


def test_a_dataset_a_cell_lacks_is_measured_alone_and_added(tmp_path, profile_dir, fake_eval):
    profile = synthetic_profile()
    done = _with_protocol(fixture_record(profile, "lems", 0.8), REFERENCE_EVAL, 40.0)
    done["settings"]["splits"] = {"wikitext2": "test"}
    out = write_shipped(tmp_path / "results.json", [done])
    ship_results.run(_args(profile_dir, out, methods=["lems"], datasets=["wikitext2", "ptb"]))
    assert fake_eval == [("lems", 0.8, None, "reference", ("ptb",))]
    (record,) = json.loads(out.read_text())["results"]
    assert record["ppl"] == {"wikitext2": 40.0, "ptb": 10.0}
    assert record["settings"]["splits"] == {"wikitext2": "test", "ptb": "split"}
    assert record["seconds"] == done["seconds"] * 2  # the fixture's seconds, once per run


def test_a_record_another_run_stores_meanwhile_is_kept(tmp_path, profile_dir, fake_eval, monkeypatch):
    """Two runs writing one file: each re-reads it before writing, so neither drops the other's cells."""
    profile = synthetic_profile()
    out = write_shipped(tmp_path / "results.json", [_with_protocol(fixture_record(profile, "lems", 0.8), QUICK_EVAL, 50.0)])
    evaluate = ship_results.evaluate_and_store

    def evaluate_while_another_run_writes(plan, **kw):
        other = _with_protocol(fixture_record(profile, "lems", 0.6), QUICK_EVAL, 70.0)
        ship_results._store(out, other, "another run")  # lands while this cell is being measured
        return evaluate(plan, **kw)

    monkeypatch.setattr(ship_results, "evaluate_and_store", evaluate_while_another_run_writes)
    ship_results.run(_args(profile_dir, out, methods=["uniform"]))
    cells = [(r["method"], r["budget"], r["settings"]["protocol"]["name"]) for r in json.loads(out.read_text())["results"]]
    assert cells == [("lems", 0.8, "quick"), ("lems", 0.6, "quick"), ("uniform", 0.8, "reference")]
