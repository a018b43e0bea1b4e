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
