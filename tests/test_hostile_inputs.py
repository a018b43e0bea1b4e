"""Hostile inputs (issue #12): every hole the hostile test found, as a test.

Each test asserts the specific message (and, for the CLI, exit code 2) and that
nothing was read, lost or half-written. Tiny random models only; nothing is downloaded.
"""
import json
import os
import shutil
import sqlite3
import threading
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import lems_core.pipeline as pipeline
from lems_core.calibration import CalibrationConfig, untrusted_calibration
from lems_core.cli import main
from lems_core.evaluation import Cancelled, EvalProtocol
from lems_core.model import compressible_layers
from lems_core.plan import PlanError, RankPlan, from_loadconfig, plan_file_name
from lems_core.profile import CHECKSUM_FIELD, PROFILE_JSON, Profile, ProfileError, synthetic_profile
from lems_core.run import Run

from helpers import error_within, tiny_loaded, word_corpus

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture()
def corpus(tmp_path):
    return word_corpus(tmp_path / "corpus.txt", 300)


@pytest.fixture()
def loaded():
    return tiny_loaded(8)


@pytest.fixture()
def served(loaded, tmp_path, monkeypatch):
    """get_model returns the tiny model and records every source it is asked for; cache in tmp_path."""
    asked = []

    def fake_get_model(source, device=None, offload=None):
        asked.append(source)
        return loaded

    for where in (pipeline, pipeline.models):  # the CLI's own loads, and the pipeline's
        monkeypatch.setattr(where, "get_model", fake_get_model)
    monkeypatch.setenv("LEMS_CACHE_DIR", str(tmp_path / "cache"))
    return loaded, asked


def _plan(loaded, corpus=None, keep=0.5, source="tiny-llama", **meta) -> RankPlan:
    layers = compressible_layers(loaded.model)
    cfg = CalibrationConfig(dataset=str(corpus), split="train", n_samples=2, seq_len=32, seed=1, n_search=1) \
        if corpus else None
    meta = ({"calibration": cfg.to_dict()} if cfg else {}) | meta
    return from_loadconfig({l.name: keep for l in layers}, layers, source, loaded.fingerprint, method="uniform",
                           decomposition="svd", meta=meta)


def _profile_for(loaded, corpus) -> Profile:
    """A profile of the tiny model whose calibration is the corpus (what the server built)."""
    layers = compressible_layers(loaded.model)
    cfg = CalibrationConfig(dataset=str(corpus), split="train", n_samples=2, seq_len=32, seed=1, n_search=1)
    spectra = {l.name: np.linspace(2.0, 0.1, min(l.out_features, l.in_features)) for l in layers}
    return Profile("tiny-llama", loaded.fingerprint, "svd", cfg.to_dict(), layers, spectra,
                   kl_ref=np.full(len(layers), 0.01))


def _cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the CLI; argparse's own errors count as exit codes too."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------ 1. an uploaded plan never makes the server read files
def test_uploaded_plan_calibration_path_is_never_opened(served, corpus, tmp_path, monkeypatch):
    loaded, asked = served
    opened = []
    for where in (pipeline.artefacts, pipeline.evaluation):
        monkeypatch.setattr(where, "load_text", lambda *a, **k: opened.append(a) or ("", None))
    profile = _profile_for(loaded, corpus)
    hostile = _plan(loaded)
    hostile.meta["calibration"] = {"dataset": "/etc/passwd", "split": "train", "n_samples": 2, "seq_len": 8}
    with pytest.raises(ValueError, match=r"'/etc/passwd' is not a known dataset name .*never opened"):
        pipeline.evaluate_and_store(hostile, profile=profile, run=Run(cache_dir=tmp_path / "cache"),
                                    datasets=["wikitext2"])
    assert opened == [] and asked == []  # nothing read, no model loaded
    assert not (tmp_path / "cache" / "tensors").exists()  # no statistics cached from it


def test_uploaded_plan_model_source_is_replaced_by_the_profiles(served, corpus, tmp_path):
    loaded, asked = served
    profile = _profile_for(loaded, corpus)
    hostile = _plan(loaded, source="/etc/shadow")
    hostile.meta["calibration"] = profile.calibration  # the profile's own config: used as the profile's
    plan, calibration = pipeline.plan_for_profile(hostile, profile)
    assert plan.model_source == "tiny-llama" and calibration.dataset == str(corpus)
    result = pipeline.evaluate_and_store(hostile, profile=profile, run=Run(cache_dir=tmp_path / "cache"),
                                         datasets=[str(corpus)], protocol=EvalProtocol(32, 1), with_kl=False)
    assert set(asked) == {"tiny-llama"} and result["model_source"] == "tiny-llama"


def test_uploaded_plan_for_another_model_or_other_layers_is_refused(served, corpus):
    loaded, _ = served
    profile = _profile_for(loaded, corpus)
    other = replace(_plan(loaded), fingerprint="0123456789abcdef")
    with pytest.raises(PlanError, match="plan is for model '0123456789abcdef'"):
        pipeline.plan_for_profile(other, profile)
    dropped = _plan(loaded)
    dropped.layers = dropped.layers[1:]
    with pytest.raises(PlanError, match="plan has no entry for model layer"):
        pipeline.plan_for_profile(dropped, profile)


@pytest.mark.parametrize("calibration, message", [
    ({"dataset": "../../etc/passwd"}, "not a known dataset name"),
    ({"dataset": "wikitext2", "split": "/etc"}, "split '/etc' is not one of"),
    ({"dataset": "wikitext2", "n_samples": 10**6}, "n_samples=1000000 exceeds the limit"),
    ({"dataset": "wikitext2", "seq_len": 0}, "seq_len must be a positive integer"),
    ({"dataset": "wikitext2", "n_samples": "8"}, "n_samples must be a positive integer"),
    ([1, 2], "calibration must be an object"),
])
def test_untrusted_calibration_allows_known_names_only(calibration, message):
    with pytest.raises(ValueError, match=message):
        untrusted_calibration(calibration)
    assert untrusted_calibration({"dataset": "Wiki", "split": "test"}).dataset == "wikitext2"


def test_cli_refuses_paths_named_by_a_plan_unless_given_as_arguments(served, corpus, tmp_path, capsys):
    loaded, asked = served
    path = _plan(loaded, corpus).save(tmp_path / "plan.json")
    code, _, err = _cli(capsys, "evaluate", "--plan", path, "--datasets", corpus, "--seq-len", 32, "--max-windows", 1)
    assert code == 2 and "is not a known dataset name" in err and asked == []
    local = _plan(loaded, corpus, source=str(tmp_path)).save(tmp_path / "local.json")
    code, _, err = _cli(capsys, "evaluate", "--plan", local, "--datasets", corpus, "--calib-dataset", corpus)
    assert code == 2 and "names its model by a local path" in err and f"--model {tmp_path}" in err and asked == []
    code, out, err = _cli(capsys, "evaluate", "--plan", local, "--model", "tiny-llama", "--datasets", corpus,
                        "--calib-dataset", corpus, "--seq-len", 32, "--max-windows", 1, "--device", "cpu")
    assert code == 0, err
    assert asked == ["tiny-llama"] and json.loads(out)["model_source"] == "tiny-llama"


def test_the_app_listens_on_localhost_by_default():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "localhost"
    security = (ROOT / "docs" / "security.md").read_text()
    assert "# Security and robustness" in security and "--server.address 0.0.0.0" in security
    assert "docs/security.md" in (ROOT / "README.md").read_text()


# ------------------------------------------------ 2. jobs that use one model never see each other's weights
def _slow_perplexity(monkeypatch):
    """Widen the window in which an unlocked second job would see compressed weights."""
    import time

    real = pipeline.evaluation.perplexity

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return real(*args, **kwargs)
    monkeypatch.setattr(pipeline.evaluation, "perplexity", slow)


def _run_in_threads(fn, n: int, timeout: float) -> list[Exception]:
    """Run fn(0) .. fn(n-1) on n threads at once; the exceptions they raised (empty: none)."""
    errors = []

    def guarded(i):
        try:
            fn(i)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors


def test_two_evaluations_at_once_get_the_clean_numbers(served, corpus, tmp_path, monkeypatch):
    loaded, _ = served
    plans = [_plan(loaded, corpus, keep=0.3), _plan(loaded, corpus, keep=0.6)]
    kwargs = dict(datasets=[str(corpus)], protocol=EvalProtocol(32, 2), with_kl=True)
    alone = [pipeline.evaluate_plan(p, run=Run(cache_dir=tmp_path / f"alone{i}"), **kwargs) for i, p in enumerate(plans)]
    _slow_perplexity(monkeypatch)
    barrier, together = threading.Barrier(2), [None, None]

    def run(i):
        barrier.wait()
        together[i] = pipeline.evaluate_plan(plans[i], run=Run(cache_dir=tmp_path / f"together{i}"), **kwargs)
    assert not _run_in_threads(run, 2, timeout=120)
    for a, b in zip(alone, together):
        assert b.dense_ppl == a.dense_ppl and b.ppl == a.ppl and b.kl == pytest.approx(a.kl, rel=1e-6)
    # the model is dense again
    fresh = tiny_loaded(8).model
    assert all(torch.equal(p, q) for p, q in zip(loaded.model.state_dict().values(), fresh.state_dict().values()))


@pytest.mark.parametrize("job", ["build", "ars", "evaluate"])
def test_model_jobs_wait_for_the_model_lock_and_stay_cancellable(job, served, corpus, tmp_path):
    loaded, _ = served
    profile_dir = _profile_for(loaded, corpus).save(tmp_path / "profile")
    cancel, messages, outcome = threading.Event(), [], []
    cfg = CalibrationConfig.from_dict(Profile.load(profile_dir).calibration)
    calls = {
        "build": lambda: pipeline.build_profile(loaded, "svd", cfg, run=Run(cache_dir=tmp_path / "c",
                                                                             progress=progress, cancel=cancel)),
        "ars": lambda: pipeline.run_ars_job(profile_dir, [0.6], "cpu-small", run=Run(cache_dir=tmp_path / "c"),
                                            progress=progress, cancel=cancel),
        "evaluate": lambda: pipeline.evaluate_plan(_plan(loaded, corpus), [str(corpus)], EvalProtocol(32, 1),
                                                   run=Run(cache_dir=tmp_path / "c", progress=progress, cancel=cancel)),
    }

    def progress(fraction, message):
        messages.append(message)

    def run():
        try:
            calls[job]()
        except Exception as exc:  # noqa: BLE001
            outcome.append(exc)
    with pipeline.hold_model(loaded):  # another job is using the model
        worker = threading.Thread(target=run)
        worker.start()
        worker.join(1.0)
        assert worker.is_alive() and "waiting for another job that is using this model" in messages
        cancel.set()
        worker.join(30)
    assert not worker.is_alive() and len(outcome) == 1 and isinstance(outcome[0], Cancelled)


def test_a_running_job_is_seen_and_cancellable_from_a_new_session(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from app_pages import common
    from lems_core.jobs import CANCELLED

    cache = tmp_path / "cache"
    folder = synthetic_profile().save(cache / "profiles" / "synthetic-test")
    monkeypatch.setenv("LEMS_CACHE_DIR", str(cache))
    monkeypatch.setenv("LEMS_PROFILE_DIR", str(folder))
    started = threading.Event()

    def long_job(progress=None, cancel=None):
        progress(0.25, "evaluating plan 1")
        started.set()
        cancel.wait(30)
        progress(0.3, "stopping")

    job = common.job_registry().submit("evaluate 1 plan(s)", long_job, meta={"kind": "eval"})
    assert started.wait(10)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30).run()  # a new tab: no job id in its session
    at.switch_page("app_pages/compress.py").run()
    assert not at.exception
    cancel = at.button(key="cancel_eval_job_id")
    assert cancel.label == "Cancel evaluation"
    cancel.click().run()
    assert job.wait(10).status == CANCELLED


# ------------------------------------------------ 3. every entry point checks the plan against the model's layers
def _layer_variants(loaded):
    plan = _plan(loaded)
    names = [l.name for l in plan.layers]
    none = replace(plan, layers=[])
    one = replace(plan, layers=plan.layers[:1])
    dropped = replace(plan, layers=plan.layers[:-1])
    shape = replace(plan, layers=[replace(plan.layers[0], out_features=plan.layers[0].out_features + 1,
                                          rank=None), *plan.layers[1:]])
    renamed = replace(plan, layers=[replace(plan.layers[0], name="model.layers.0.self_attn.q_pröj"),
                                    *plan.layers[1:]])
    return {
        "no layers": (none, "plan has no layers"),
        "one layer": (one, "plan has no entry for model layer"),
        "dropped layer": (dropped, f"plan has no entry for model layer\\(s\\): {names[-1]}"),
        "wrong shape": (shape, "does not match the model's"),
        "unicode name": (renamed, "plan names layer\\(s\\) the model does not have: model.layers.0.self_attn.q_pröj"),
    }


@pytest.mark.parametrize("case", ["no layers", "one layer", "dropped layer", "wrong shape", "unicode name"])
@pytest.mark.parametrize("command", ["evaluate", "compress"])
def test_cli_checks_the_plan_against_the_models_layers(case, command, served, corpus, tmp_path, capsys):
    loaded, _ = served
    plan, message = _layer_variants(loaded)[case]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.to_dict()))
    out = tmp_path / "out"
    extra = ["-o", out] if command == "compress" else ["--datasets", corpus, "--seq-len", 32, "--max-windows", 1]
    code, stdout, err = _cli(capsys, command, "--plan", path, "--calib-dataset", corpus, "--device", "cpu", *extra)
    assert code == 2 and stdout == ""
    assert __import__("re").search(message, err), err
    assert not out.exists()  # nothing half-written
    with pytest.raises(PlanError, match=message):
        pipeline.evaluate_plan(plan, [str(corpus)], EvalProtocol(32, 1), calibration=CalibrationConfig.from_dict(
            {"dataset": str(corpus), "split": "train", "n_samples": 2, "seq_len": 32}),
            run=Run(cache_dir=tmp_path / "c"))


# ------------------------------------------------ 4. saved plans never overwrite each other
def test_plans_differing_only_in_ranks_get_different_file_names(loaded):
    a, b = _plan(loaded, keep=0.5), _plan(loaded, keep=0.4)
    b.budget = a.budget  # same method, budget and fingerprint
    name_a = plan_file_name(a.method, a.budget, a.fingerprint, a.content_hash)
    name_b = plan_file_name(b.method, b.budget, b.fingerprint, b.content_hash)
    assert name_a != name_b and name_a.startswith(f"uniform_r{a.budget:.3f}_{a.fingerprint[:8]}_")
    assert a.content_hash == RankPlan.from_json(a.to_json()).content_hash  # stable across a round trip


def test_save_plan_to_cache_keeps_both_plans(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    cache = tmp_path / "cache"
    folder = synthetic_profile().save(cache / "profiles" / "synthetic-test")
    monkeypatch.setenv("LEMS_CACHE_DIR", str(cache))
    monkeypatch.setenv("LEMS_PROFILE_DIR", str(folder))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30).run()
    at.switch_page("app_pages/allocate.py").run()
    at.button(key="save_plan").click().run()
    at.slider(key="em_gamma").set_value(0.0).run()  # another LEMS plan at the same budget
    at.button(key="save_plan").click().run()
    assert not at.exception
    saved = sorted((cache / "plans").glob("lems_r0.800_*.json"))
    assert len(saved) == 2
    ranks = [RankPlan.load(p).ranks() for p in saved]
    assert ranks[0] != ranks[1]


# ------------------------------------------------ 5. one bad cache file never takes the app down
def _good_entries(cache: Path, loaded_profile: Profile) -> dict:
    """A good saved plan and a good stored result beside the bad entry: they must survive."""
    from lems_core.results import ResultStore

    plan = RankPlan.from_json(json.dumps(_synthetic_plan_doc(loaded_profile)))
    plan_path = plan.save(cache / "plans" / "good.json")
    ResultStore(cache).add({"method": "lems", "fingerprint": loaded_profile.fingerprint, "budget": 0.8,
                            "realised_ratio": 0.8, "ppl": {"wikitext2": 12.0}, "dense_ppl": {"wikitext2": 10.0}})
    return {"plan": plan_path}


def _synthetic_plan_doc(profile: Profile) -> dict:
    from lems_core.plan import plan_from_ranks

    return plan_from_ranks(profile, {l.name: None for l in profile.layers}, "uniform").to_dict()


def _corrupt(kind: str, cache: Path) -> None:
    index_db = cache / "index" / "cache.db"
    if kind == "profile.json is a list":
        bad = synthetic_profile(seed=3).save(cache / "profiles" / "bad")
        (bad / PROFILE_JSON).write_text("[1, 2, 3]")
    elif kind == "garbage index database":
        for f in index_db.parent.iterdir():
            f.unlink()
        index_db.write_bytes(b"this is not a database" * 50)
    elif kind == "corrupt value row":
        from lems_core.results import ResultStore

        ResultStore(cache).add({"method": "bad", "fingerprint": "x", "ppl": {}})
        with sqlite3.connect(index_db) as con:
            con.execute("UPDATE Cache SET value = ? WHERE rowid = (SELECT max(rowid) FROM Cache)", (b"garbage",))
    elif kind == "dangling symlink in plans":
        os.symlink(cache / "nowhere.json", cache / "plans" / "dangling.json")
    elif kind == "folder named *.json in plans":
        (cache / "plans" / "folder.json").mkdir()


CORRUPTIONS = ["profile.json is a list", "garbage index database", "corrupt value row", "dangling symlink in plans",
               "folder named *.json in plans"]
APP_PAGES = ["app_pages/home.py", "app_pages/spectra.py", "app_pages/sensitivity.py", "app_pages/allocate.py",
             "app_pages/compress.py"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_every_page_survives_a_bad_cache_entry_and_offers_to_remove_it(kind, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from lems_core.cache import saved_plans
    from lems_core.health import cache_problems
    from lems_core.results import ResultStore

    cache = tmp_path / "cache"
    profile = synthetic_profile()
    folder = profile.save(cache / "profiles" / "synthetic-test")
    monkeypatch.setenv("LEMS_CACHE_DIR", str(cache))
    monkeypatch.delenv("LEMS_PROFILE_DIR", raising=False)
    good = _good_entries(cache, profile)
    _corrupt(kind, cache)
    problems = cache_problems(cache)
    assert len(problems) == 1, problems
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30).run()
    for page in APP_PAGES:
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert at.title, f"{page} drew nothing"
        assert any(str(problems[0].path) in m.value for m in at.sidebar.markdown), page
    at.sidebar.button(key="remove_cache_problem_0").click().run()
    assert not at.exception
    assert cache_problems(cache) == []
    assert Profile.load(folder).key == profile.key  # the rest is untouched
    if kind != "garbage index database":  # the index itself was the bad entry there
        assert any(r.get("method") == "lems" for r in ResultStore(cache).all())
    assert good["plan"] in saved_plans(cache)
    if problems[0].rowid is None:
        assert any((cache / "quarantine").iterdir())  # set aside, not deleted


def test_a_garbage_index_is_a_clear_error_not_a_crash(tmp_path):
    from lems_core.cache import CacheIndexError, index
    from lems_core.results import ResultStore

    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "cache.db").write_bytes(b"garbage" * 100)
    with pytest.raises(CacheIndexError, match="cache index .*cache.db cannot be opened"):
        index(tmp_path)
    with pytest.raises(CacheIndexError):
        ResultStore(tmp_path).all()


def test_index_rows_never_unpickle(tmp_path):
    """A row switched to diskcache's pickle mode reads as missing (JSONDisk never writes one)."""
    import pickle

    from lems_core.cache import index

    with index(tmp_path) as store:
        store["a"] = {"x": 1}
    with sqlite3.connect(tmp_path / "index" / "cache.db") as con:
        con.execute("UPDATE Cache SET mode = 4, value = ?", (pickle.dumps({"x": 2}),))
    with index(tmp_path) as store:
        assert store.get("a") is None


# ------------------------------------------------ 6. compress -o, sizes, profile checksums
def test_compress_refuses_the_source_folder_and_non_empty_folders(served, corpus, tmp_path, capsys):
    loaded, _ = served
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"original weights")
    path = _plan(loaded, corpus).save(tmp_path / "plan.json")
    base = ["compress", "--plan", path, "--calib-dataset", corpus, "--device", "cpu", "--model", source]
    code, _, err = _cli(capsys, *base, "-o", source, "--force")
    assert code == 2 and "is the model's source folder" in err
    assert (source / "model.safetensors").read_bytes() == b"original weights"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, _, err = _cli(capsys, *base, "-o", busy)
    assert code == 2 and "is not empty; pass --force" in err and sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    code, _, err = _cli(capsys, *base, "-o", busy, "--force")  # --force replaces a whole folder: only an export
    assert code == 2 and "holds files that are not a compressed model" in err
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    export = tmp_path / "export"
    for extra in ((), ("--force",)):
        code, out, _ = _cli(capsys, *base, "-o", export, *extra)
        assert code == 0 and "saved" in out


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--plan", "p.json", "--max-windows", "-1"], "must be a positive integer or 'all' (every window), got -1"),
    (["evaluate", "--plan", "p.json", "--max-windows", "0"], "must be a positive integer or 'all' (every window), got 0"),
    (["ppl", "--max-windows", "0"], "must be a positive integer or 'all' (every window), got 0"),
    (["evaluate", "--plan", "p.json", "--seq-len", "0"], "must be a positive integer, got 0"),
    (["ppl", "--seq-len", "-5"], "must be a positive integer, got -5"),
    (["profile", "--n-samples", "0"], "must be a positive integer, got 0"),
    (["profile", "--n-search", "0"], "must be a positive integer, got 0"),
    (["profile", "--seq-len", "0"], "must be a positive integer, got 0"),
    (["allocate", "--profile", "x", "--ratio", "0.5", "--gamma", "nan", "-o", "p.json"], "must be a finite number, got 'nan'"),
    (["allocate", "--profile", "x", "--ratio", "inf", "-o", "p.json"], "must be a finite number, got 'inf'"),
])
def test_cli_rejects_zero_negative_and_non_finite_sizes(argv, message, capsys):
    code, _, err = _cli(capsys, *argv)
    assert code == 2 and message in err


def test_library_rejects_zero_windows_and_sizes(loaded):
    from lems_core.error_model import ErrorModelParams
    from lems_core.evaluation import token_windows

    with pytest.raises(ValueError, match="max_windows must be a positive integer or None"):
        token_windows(loaded.tokenizer, "abc " * 100, 8, 0)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        token_windows(loaded.tokenizer, "abc " * 100, 0)
    with pytest.raises(ValueError, match="calibration n_samples must be a positive integer, got 0"):
        CalibrationConfig(n_samples=0)
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        ErrorModelParams(gamma=float("nan"))


def test_ppl_max_windows_all_measures_every_window_never_infinity(served, corpus, capsys):
    code, out, _ = _cli(capsys, "ppl", "--datasets", corpus, "--seq-len", 32, "--max-windows", "all", "--device", "cpu")
    assert code == 0 and "inf" not in out.lower()
    windows = int(out.split(" over ")[1].split()[0])
    assert windows > 1


def _edit(folder: Path, change) -> None:
    doc = json.loads((folder / PROFILE_JSON).read_text())
    change(doc)
    (folder / PROFILE_JSON).write_text(json.dumps(doc))


def test_hand_edited_profile_json_is_detected(tmp_path):
    folder = synthetic_profile().save(tmp_path / "p")
    before = (folder / PROFILE_JSON).read_bytes()
    _edit(folder, lambda d: d["kl_ref"].__setitem__(0, -1.0))
    with pytest.raises(ProfileError, match=f"does not match its {CHECKSUM_FIELD}"):
        Profile.load(folder)
    _edit(folder, lambda d: d["meta"].__setitem__("kl_floor", 1e-6))  # any field, also one added later
    with pytest.raises(ProfileError, match=f"does not match its {CHECKSUM_FIELD}"):
        Profile.load(folder)
    (folder / PROFILE_JSON).write_bytes(before)
    assert Profile.load(folder).key == synthetic_profile().key


@pytest.mark.parametrize("change, message", [
    (lambda d: d["kl_ref"].__setitem__(0, -0.5), "negative or not finite"),
    (lambda d: d["kl_ref"].__setitem__(0, float("nan")), "negative or not finite"),
    (lambda d: d["layers"].append(dict(d["layers"][0])), "more than once"),
    (lambda d: d["layers"][0].__setitem__("kind", "lm_head"), "unknown kind"),
    (lambda d: d.__setitem__("ref_ratio", 3), "ref_ratio must lie in"),
    (lambda d: d.__setitem__("dense", [1]), "'dense' must be an object"),
])
def test_profile_without_checksum_is_still_schema_validated(change, message, tmp_path):
    folder = synthetic_profile().save(tmp_path / "p")
    _edit(folder, lambda d: (d.pop(CHECKSUM_FIELD), change(d)))
    with pytest.raises(ProfileError, match=message):
        Profile.load(folder)


def test_old_profile_without_checksum_loads_and_gets_one_on_save(tmp_path):
    folder = synthetic_profile().save(tmp_path / "p")
    _edit(folder, lambda d: d.pop(CHECKSUM_FIELD))
    profile = Profile.load(folder)
    profile.save(folder)
    assert CHECKSUM_FIELD in json.loads((folder / PROFILE_JSON).read_text())
    assert Profile.load(folder).key == profile.key
    assert sorted(p.name for p in folder.iterdir()) == [PROFILE_JSON, "spectra.safetensors"]  # no temp files


def test_committed_demo_profiles_carry_a_checksum():
    from lems_core.cache import demo_profile_dirs

    for folder in demo_profile_dirs():
        assert json.loads((folder / PROFILE_JSON).read_text()).get(CHECKSUM_FIELD)


# ------------------------------------------------ 9. exit 2 with a message, not a traceback
def test_deeply_nested_json_is_a_plan_and_profile_error(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    code, _, err = _cli(capsys, "evaluate", "--plan", deep)
    assert code == 2 and "nested too deeply" in err
    folder = synthetic_profile().save(tmp_path / "p")
    shutil.copy(deep, folder / PROFILE_JSON)
    with pytest.raises(ProfileError, match="nested too deeply"):
        Profile.load(folder)


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "folder"])
def test_plan_that_is_not_a_regular_file_is_refused_without_reading(target, tmp_path, capsys):
    if target == "fifo":
        path = tmp_path / "plan.fifo"
        os.mkfifo(path)
    elif target == "folder":
        path = tmp_path / "plan.json"
        path.mkdir()
    else:
        path = Path(target)
    code, _, err = _cli(capsys, "evaluate", "--plan", path)
    assert code == 2 and "is not a regular file" in err


@pytest.mark.parametrize("setup, message", [
    (lambda tmp: "/nonexistent/model", "model folder not found: /nonexistent/model"),
    (lambda tmp: str(_touch(tmp / "notamodel" / "tokenizer.model")), "is a folder but not a model folder (no config.json"),
    (lambda tmp: str(_truncated_gguf(tmp)), "cannot load a model from"),
])
def test_bad_model_sources_are_exit_2_with_the_reason(setup, message, tmp_path, capsys):
    code, _, err = _cli(capsys, "layers", "--model", setup(tmp_path), "--device", "cpu")
    assert code == 2 and message in err and "Traceback" not in err


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00")
    return path.parent


def _truncated_gguf(tmp: Path) -> Path:
    path = tmp / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 7)
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_exit_2(capsys):
    code, _, err = _cli(capsys, "layers", "--device", "cuda")
    assert code == 2 and "CUDA is not available here: use --device cpu" in err


def test_concurrent_cache_writers_never_lose_the_race(tmp_path):
    from lems_core.cache import load_tensors, save_tensors

    path = tmp_path / "tensors" / "x.safetensors"

    def write(seed):
        for _ in range(10):
            save_tensors(path, {"w": torch.full((64,), float(seed))})
            synthetic_profile(num_blocks=1).save(tmp_path / "profile")
    assert _run_in_threads(write, 3, timeout=60) == []
    assert load_tensors(path) is not None and Profile.load(tmp_path / "profile")
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind


def test_c4_is_evaluated_on_its_local_validation_file(tmp_path, monkeypatch):
    from lems_core.data import evaluation_split, load_text

    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4-validation.json").write_text(json.dumps([{"text": f"document {i}"} for i in range(5)]))
    monkeypatch.setenv("LEMS_DATA_DIR", str(tmp_path))
    split = evaluation_split("c4")
    text, source = load_text("c4", split)
    assert split == "validation" and source.origin.endswith("c4-validation.json") and "document 4" in text


# ------------------------------------------------ 10. every file read is a regular file read with a cap
def _special(kind: str, tmp_path: Path) -> Path:
    """A path that is not a regular file: a FIFO nobody writes to, /dev/zero, or a folder."""
    if kind == "fifo":
        os.mkfifo(tmp_path / "pipe.json")
        return tmp_path / "pipe.json"
    if kind == "folder":
        (tmp_path / "dir.json").mkdir()
        return tmp_path / "dir.json"
    return Path("/dev/zero")


@pytest.mark.parametrize("kind, words", [("fifo", "a named pipe"), ("zero", "a device"), ("folder", "a folder")])
def test_the_capped_reader_refuses_pipes_devices_and_folders_at_once(kind, words, tmp_path):
    from lems_core.safe_io import read_json_capped

    path = _special(kind, tmp_path)
    error = error_within(1.0, lambda: read_json_capped(path, 1024, PlanError, "a rank plan"))
    assert isinstance(error, PlanError) and f"{path} is not a regular file ({words}): not a rank plan" in str(error)


def test_the_cap_is_on_the_bytes_read(tmp_path):
    from lems_core.safe_io import read_bytes_capped

    path = tmp_path / "f.json"
    path.write_bytes(b"1" * 100)
    assert read_bytes_capped(path, 100, PlanError, "x") == b"1" * 100
    with pytest.raises(PlanError, match=r"too large \(more than 99 bytes\): not x"):
        read_bytes_capped(path, 99, PlanError, "x")


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_pipe_or_device_as_the_shipped_results_is_a_quick_error(kind, tmp_path, monkeypatch):
    from lems_core.results import ResultsFileError, ResultStore, shipped_results

    monkeypatch.setenv("LEMS_SHIPPED_RESULTS", str(_special(kind, tmp_path)))
    error = error_within(1.0, shipped_results)
    assert isinstance(error, ResultsFileError) and "is not a regular file" in str(error)
    merged = ResultStore(tmp_path / "cache").merged()  # what the app's sidebar shows on every page
    assert merged.records == [] and len(merged.problems) == 1 and "is not a regular file" in merged.problems[0]


# ------------------------------------------------ 11. corpus files go through the capped reader
@pytest.mark.parametrize("kind, words", [("fifo", "a named pipe"), ("zero", "a device"), ("folder", "a folder")])
def test_a_pipe_device_or_folder_as_calibration_corpus_is_exit_2_at_once(kind, words, served, corpus, tmp_path,
                                                                          capsys):
    loaded, _ = served
    plan = _plan(loaded, corpus).save(tmp_path / "plan.json")
    path = _special(kind, tmp_path)
    outcome = {}
    error = error_within(1.0, lambda: outcome.update(result=_cli(
        capsys, "evaluate", "--plan", plan, "--calib-dataset", path, "--datasets", corpus, "--seq-len", 32,
        "--max-windows", 1, "--device", "cpu")))
    assert error is None
    code, _, err = outcome["result"]
    assert code == 2 and f"{path} is not a regular file ({words}): not a text corpus" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_pipe_or_device_as_perplexity_dataset_is_exit_2_at_once(kind, served, tmp_path, capsys):
    path = _special(kind, tmp_path)
    outcome = {}
    error = error_within(1.0, lambda: outcome.update(result=_cli(capsys, "ppl", "--datasets", path, "--device", "cpu")))
    assert error is None
    code, _, err = outcome["result"]
    assert code == 2 and f"{path} is not a regular file" in err


def test_a_corpus_over_the_cap_is_refused_before_it_is_used(tmp_path, monkeypatch):
    import lems_core.data as data

    big = word_corpus(tmp_path / "big.txt", 50)
    monkeypatch.setattr(data, "MAX_CORPUS_BYTES", big.stat().st_size - 1)
    with pytest.raises(data.CorpusFileError, match=r"too large .*not a text corpus"):
        data.load_text(str(big), "train")
    monkeypatch.setattr(data, "MAX_CORPUS_BYTES", big.stat().st_size)
    assert data.load_text(str(big), "train")[0].count("\n\n") == 49


def test_corpus_files_keep_universal_newlines_and_name_bad_json_rows(tmp_path):
    from lems_core.data import CorpusFileError, load_text

    crlf, lf = tmp_path / "wiki.crlf.raw", tmp_path / "wiki.lf.raw"
    crlf.write_bytes(b" a\r\n\r\n b\r\n")
    lf.write_bytes(b" a\n\n b\n")
    assert load_text(str(crlf))[0] == load_text(str(lf))[0] == " a\n" + "\n\n" + "" + "\n\n" + " b\n"
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(CorpusFileError, match=r'record 1 has no "text" string'):
        load_text(str(rows))


# ------------------------------------------------ 12. a failed torchrun collective is one line, its own exit code
def test_a_distributed_error_is_one_line_and_exit_3(monkeypatch, capsys):
    import lems_core.cli.layers as layers
    from lems_core.cli.common import EXIT_DISTRIBUTED
    from lems_core.distributed import DistributedError

    def dead_rank(args):
        raise DistributedError("rank 0 of 2: the merge failed or timed out waiting for rank 1. Cause: gloo\nline two")

    monkeypatch.setattr(layers, "run", dead_rank)
    code, _, err = _cli(capsys, "layers")
    assert code == EXIT_DISTRIBUTED == 3 and "Traceback" not in err
    assert err == "error: rank 0 of 2: the merge failed or timed out waiting for rank 1. Cause: gloo line two\n"


def test_other_runtime_errors_still_raise(monkeypatch, capsys):
    import lems_core.cli.layers as layers

    monkeypatch.setattr(layers, "run", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["layers"])
