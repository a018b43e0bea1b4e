from lems_core.pipeline import EvalResult
from lems_core.results import ResultStore


def _result(method, ppl):
    return EvalResult(method, "kfac", 0.8, 0.79, {"wikitext2": ppl}, {"wikitext2": 20.0}, 0.1, 79, 100, 1.0,
                      "cpu", "demo", "abc", {"seq_len": 512})


def test_results_persist_across_store_instances(tmp_path):
    store = ResultStore(tmp_path)
    store.add(_result("lems", 30.0))
    store.add(_result("uniform", 60.0))
    records = ResultStore(tmp_path).all()
    assert [r["method"] for r in records] == ["lems", "uniform"]
    assert records[0]["ppl"] == {"wikitext2": 30.0}


def test_remove_and_non_json_rejected(tmp_path):
    store = ResultStore(tmp_path)
    key = store.add(_result("lems", 30.0))
    store.remove(key)
    assert store.all() == []
    import pytest
    with pytest.raises(TypeError):
        store.add({"bad": object()})
    assert store.all() == []


# ------------------------------------------------------------------ shipped results (#13)
import json  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402

from shipped_fixture import fixture_records, write_shipped  # noqa: E402

from lems_core.profile import synthetic_profile  # noqa: E402
from lems_core.results import (RESULTS_SCHEMA, SHIPPED, STORED, ResultsFileError, read_results_file,  # noqa: E402
                               shipped_results, shipped_results_path)


@pytest.fixture(scope="module")
def records():
    return fixture_records(synthetic_profile(), methods=("lems", "uniform"), budgets=(0.6, 0.8))


@pytest.fixture
def shipped(tmp_path, records):
    return write_shipped(tmp_path / "demo" / "results.json", records)


def test_shipped_results_join_the_stored_ones_marked_and_read_only(tmp_path, shipped, records):
    store = ResultStore(tmp_path / "cache", shipped_path=shipped)
    store.add(_result("mine", 40.0))
    before = shipped.read_bytes(), shipped.stat().st_mtime_ns
    merged = store.merged()
    assert merged.problems == ()
    assert [r["source"] for r in merged.records] == [STORED] + [SHIPPED] * len(records)
    assert [r["method"] for r in merged.records[1:]] == [r["method"] for r in records]
    assert merged.records[1]["ranks"] == records[0]["ranks"]
    assert [r["method"] for r in store.all()] == ["mine"]  # the store itself holds only its own
    with pytest.raises(ValueError, match="read-only"):
        store.add(merged.records[1])
    with pytest.raises(ValueError, match="read-only"):
        store.remove("shipped:0")
    merged.records[1]["ranks"].clear()  # a caller's copy: the next read is intact
    assert store.merged().records[1]["ranks"] == records[0]["ranks"]
    assert (shipped.read_bytes(), shipped.stat().st_mtime_ns) == before


def test_a_stored_copy_of_a_shipped_result_shows_once_as_shipped(tmp_path, shipped, records):
    store = ResultStore(tmp_path / "cache", shipped_path=shipped)
    store.add(records[0])  # the machine that measured the study stored it too
    merged = store.merged().records
    assert len(merged) == len(records) and all(r["source"] == SHIPPED for r in merged)


def test_the_default_shipped_file_is_the_demo_folders_or_the_environments(tmp_path, monkeypatch, records):
    monkeypatch.delenv("LEMS_SHIPPED_RESULTS", raising=False)
    monkeypatch.setattr("lems_core.cache.DEMO_DIR", tmp_path / "demo")
    assert shipped_results_path() == tmp_path / "demo" / "results.json"
    assert shipped_results() == [] and ResultStore(tmp_path / "cache").merged() == ([], ())
    write_shipped(tmp_path / "demo" / "results.json", records)
    assert len(ResultStore(tmp_path / "cache").merged().records) == len(records)
    other = write_shipped(tmp_path / "elsewhere.json", records[:1])
    monkeypatch.setenv("LEMS_SHIPPED_RESULTS", str(other))
    assert [r["source"] for r in shipped_results()] == [SHIPPED]


def test_an_edited_shipped_file_is_read_again(tmp_path, records):
    path = write_shipped(tmp_path / "results.json", records)
    assert len(shipped_results(path)) == len(records)
    write_shipped(path, records[:1])
    os.utime(path, ns=(1, 1))  # a different version even within the file system's time resolution
    assert len(shipped_results(path)) == 1


def _edited(records, index=0, **fields):
    out = [dict(r) for r in records]
    out[index].update(fields)
    return out


def _doc(records):
    return {"schema": RESULTS_SCHEMA, "note": "n", "results": records}


def _bad_ranks(records):
    ranks = dict(records[1]["ranks"])
    ranks[next(iter(ranks))] = 0
    return ranks


# (id, the file's content: text, a document, or (field, value) set on record 1 of the fixture, message)
BAD_FILES = [
    ("text", "not json", "not valid JSON"),
    ("list", [1, 2], "must hold a JSON object, got list"),
    ("schema", {"schema": "lems-results/9", "results": []}, "schema 'lems-results/9'"),
    ("results", {"schema": RESULTS_SCHEMA, "results": {}}, "'results' must be a list"),
    ("note", {"schema": RESULTS_SCHEMA, "note": 3, "results": []}, "'note' must be a string"),
    ("record", _doc([5]), "record 0 must be an object"),
    ("method", ("method", ""), "'method' must be a non-empty string"),
    ("budget", ("budget", 1.5), "'budget' must be a kept fraction"),
    ("kl", ("kl", -0.1), "'kl' must be a finite number >= 0 or null"),
    ("ppl", ("ppl", {"wikitext2": 0}), "ppl['wikitext2'] must be a perplexity > 0"),
    ("ranks", ("ranks", _bad_ranks), "must be an integer >= 1 or null"),
    ("params", ("params_kept", 10**12), "'params_kept' and 'params_total'"),
    ("settings", ("settings", None), "'settings' must be an object"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_malformed_shipped_file_is_a_specific_error_and_the_stored_results_stay(tmp_path, records, name, content,
                                                                                  message):
    import re

    if isinstance(content, tuple):
        field, value = content
        content = _doc(_edited(records, 1, **{field: value(records) if callable(value) else value}))
    path = tmp_path / "results.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ResultsFileError, match=re.escape(message)):
        read_results_file(path)
    store = ResultStore(tmp_path / "cache", shipped_path=path)
    store.add(_result("mine", 40.0))
    merged = store.merged()
    assert [r["method"] for r in merged.records] == ["mine"]
    assert len(merged.problems) == 1 and "results.json" in merged.problems[0]
    if name in ("kl", "ppl", "ranks", "budget"):
        assert "record 1 ('lems' @" in merged.problems[0]  # the record at fault is named


def test_an_unreadable_index_still_shows_the_shipped_results(tmp_path, shipped, records):
    (tmp_path / "cache" / "index").mkdir(parents=True)
    (tmp_path / "cache" / "index" / "cache.db").write_bytes(b"garbage" * 100)
    merged = ResultStore(tmp_path / "cache", shipped_path=shipped).merged()
    assert len(merged.records) == len(records)
    assert len(merged.problems) == 1 and "Stored results cannot be shown" in merged.problems[0]


def test_health_lists_a_malformed_shipped_file_and_never_moves_it(tmp_path, monkeypatch, records):
    from lems_core.health import SHIPPED_RESULTS, cache_problems, remove_problem

    path = write_shipped(tmp_path / "results.json", _edited(records, 0, kl="high"))
    monkeypatch.setenv("LEMS_SHIPPED_RESULTS", str(path))
    problems = cache_problems(tmp_path / "cache")
    assert [p.kind for p in problems] == [SHIPPED_RESULTS] and "'kl'" in problems[0].reason
    assert not problems[0].removable
    with pytest.raises(ValueError, match="read-only"):
        remove_problem(problems[0], tmp_path / "cache")
    assert path.is_file() and not (tmp_path / "cache" / "quarantine").exists()
    write_shipped(path, records)
    assert cache_problems(tmp_path / "cache") == []
