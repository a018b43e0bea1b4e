import json

import pytest

from lems_core.cli import main
from lems_core.plan import RankPlan
from lems_core.profile import Profile, synthetic_profile

from helpers import tiny_loaded


@pytest.fixture()
def profile_dir(tmp_path):
    return synthetic_profile(num_blocks=6).save(tmp_path / "profile")


@pytest.mark.parametrize("method", ["lems", "uniform", "svdllm_v2", "mrcs"])
def test_allocate_writes_a_valid_plan_within_budget(profile_dir, tmp_path, method, capsys):
    out, cfg = tmp_path / "plan.json", tmp_path / "loadconfig.json"
    assert main(["allocate", "--profile", str(profile_dir), "--method", method, "--ratio", "0.7",
                 "-o", str(out), "--loadconfig", str(cfg)]) == 0
    profile = Profile.load(profile_dir)
    plan = RankPlan.load(out, layers=profile.layers, fingerprint=profile.fingerprint)
    assert plan.method == method and plan.summary["realised_ratio"] <= 0.7 + 1e-9
    assert set(json.loads(cfg.read_text())) == {l.name for l in profile.layers}
    assert "realised" in capsys.readouterr().out


def test_allocate_reports_bad_input_without_traceback(profile_dir, tmp_path, capsys):
    assert main(["allocate", "--profile", str(profile_dir), "--method", "nope", "--ratio", "0.7",
                 "-o", str(tmp_path / "p.json")]) == 2
    assert "unknown allocation method" in capsys.readouterr().err
    assert main(["allocate", "--profile", str(profile_dir), "--ratio", "0.01", "-o", str(tmp_path / "p.json")]) == 2
    assert not (tmp_path / "p.json").exists()
    assert main(["allocate", "--profile", str(tmp_path), "--ratio", "0.5", "-o", str(tmp_path / "p.json")]) == 2
    assert "not a profile folder" in capsys.readouterr().err


# ---------------------------------------------------------------- evaluate / compress with --decomposition
@pytest.fixture()
def tiny_plan(tmp_path, monkeypatch):
    """A uniform keep-0.5 svd_llm plan for a tiny llama that pipeline.get_model returns; cache in tmp_path."""
    import numpy as np

    import lems_core.pipeline as pipeline
    from lems_core.calibration import CalibrationConfig
    from lems_core.model import compressible_layers
    from lems_core.plan import from_loadconfig

    loaded = tiny_loaded(8)
    model = loaded.model
    for where in (pipeline, pipeline.models):  # the CLI's own loads, and the pipeline's
        monkeypatch.setattr(where, "get_model", lambda source, device=None, offload=None: loaded)
    monkeypatch.setenv("LEMS_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "model", "rank", "layer", "the", "of", "and"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(300)))
    cfg = CalibrationConfig(dataset=str(corpus), split="train", n_samples=3, seq_len=48, seed=1, n_search=2)
    layers = compressible_layers(model)
    plan = from_loadconfig({l.name: 0.5 for l in layers}, layers, "tiny-llama", loaded.fingerprint, method="uniform",
                           decomposition="svd_llm", meta={"calibration": cfg.to_dict()})
    return plan.save(tmp_path / "plan.json"), corpus


def _evaluate(plan_path, corpus, capsys, *extra) -> dict:
    assert main(["evaluate", "--plan", str(plan_path), "--datasets", str(corpus), "--seq-len", "32",
                 "--max-windows", "2", "--device", "cpu", "--calib-dataset", str(corpus), *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_factorises_with_another_decomposition(tiny_plan, capsys):
    plan_path, corpus = tiny_plan
    own = _evaluate(plan_path, corpus, capsys)
    erc = _evaluate(plan_path, corpus, capsys, "--decomposition", "erc")
    assert own["decomposition"] == "svd_llm" and erc["decomposition"] == "erc"
    assert erc["settings"]["plan_decomposition"] == "svd_llm"
    assert erc["realised_ratio"] == own["realised_ratio"]  # same ranks ...
    assert erc["kl"] != pytest.approx(own["kl"], rel=1e-6)  # ... other factors


def test_compress_records_the_decomposition_and_rejects_unknown_names(tiny_plan, tmp_path, capsys):
    plan_path, corpus = tiny_plan
    out = tmp_path / "compressed"
    assert main(["compress", "--plan", str(plan_path), "-o", str(out), "--decomposition", "erc",
                 "--calib-dataset", str(corpus)]) == 0
    from lems_core.compression import RANKS_FILE

    meta = json.loads((out / RANKS_FILE).read_text())["meta"]
    assert meta["decomposition"] == "erc" and meta["plan"]["decomposition"] == "svd_llm"
    assert "factorised with erc" in capsys.readouterr().out
    assert main(["evaluate", "--plan", str(plan_path), "--decomposition", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown decomposition 'nope'" in err and "saes" in err and "kfac" in err


def test_cli_help_lists_seed_decompositions_and_model_scored_allocators():
    from lems_core.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    evaluate_help, allocate_help = sub["evaluate"].format_help(), sub["allocate"].format_help()
    for name in ("saes", "erc", "lcsvd", "svd_llm_v2"):
        assert name in evaluate_help and name in sub["compress"].format_help()
    for name in ("atp", "erc_plc", "lcsvd_search"):
        assert name in allocate_help


@pytest.mark.parametrize("method, kind", [("atp", "ppl"), ("erc_plc", "kl"), ("lcsvd_search", "ppl")])
def test_model_scored_allocators_use_the_pipeline_scorer(profile_dir, tmp_path, monkeypatch, method, kind):
    import lems_core.pipeline as pipeline

    asked, scored = [], []

    def fake_score_function(profile, score_kind, run=None):
        asked.append((profile.fingerprint, score_kind, run.device))
        return lambda ranks: scored.append(ranks) or float(sum(r or 0 for r in ranks.values()) % 7)

    monkeypatch.setattr(pipeline, "score_function", fake_score_function)
    out = tmp_path / "plan.json"
    assert main(["allocate", "--profile", str(profile_dir), "--method", method, "--ratio", "0.7",
                 "--device", "cpu", "-o", str(out)]) == 0
    profile = Profile.load(profile_dir)
    assert asked == [(profile.fingerprint, kind, "cpu")] and scored
    plan = RankPlan.load(out, layers=profile.layers, fingerprint=profile.fingerprint)
    assert plan.method == method and plan.summary["realised_ratio"] <= 0.7 + 1e-9


def test_cli_ars_subcommand_trains_through_run_ars_job(monkeypatch, tmp_path, capsys):
    """`python -m lems_core ars` is wired in: ratios parsed, the job called, one plan file per ratio."""
    from lems_core import pipeline

    calls = []

    def fake_job(profile, ratios, preset_name, progress=None, cancel=None, run=None):
        calls.append((profile, ratios, preset_name))
        run.report(1.0, "done")
        return [{"summary": {"realised_ratio": r - 0.01},
                 "meta": {"ars": {"learned_ratio": r, "repair_cuts": 0, "seconds": 1.0}}} for r in ratios]

    monkeypatch.setattr(pipeline, "run_ars_job", fake_job)
    out = tmp_path / "ars-{ratio}.json"
    code = main(["ars", "--profile", str(tmp_path), "--ratio", "0.8,0.6", "-o", str(out)])
    assert code == 0
    assert calls == [(str(tmp_path), [0.8, 0.6], "cpu-small")]
    assert json.loads((tmp_path / "ars-0.6.json").read_text())["summary"]["realised_ratio"] == pytest.approx(0.59)
    assert "ARS at 0.8" in capsys.readouterr().out


@pytest.mark.parametrize("extra, expected", [
    ([], (None, 2048)), (["--quick"], (8, 512)), (["--quick", "--max-windows", "all"], (None, 512)),
    (["--seq-len", "1024"], (None, 1024)),
])
def test_evaluate_defaults_to_the_reference_protocol(tiny_plan, monkeypatch, capsys, extra, expected):
    import lems_core.pipeline as pipeline

    seen = {}

    class Result:
        def to_dict(self):
            return {"ok": True}

    def fake(plan, datasets, protocol, **kw):
        seen["args"] = (protocol.max_windows, protocol.seq_len)
        return Result()

    from lems_core.calibration import CalibrationConfig

    monkeypatch.setattr(pipeline, "evaluate_plan", fake)
    plan_path, _ = tiny_plan
    doc = json.loads(plan_path.read_text())
    doc["meta"]["calibration"] = CalibrationConfig().to_dict()  # a known dataset name: never read by the fake
    plan_path.write_text(json.dumps(doc))
    assert main(["evaluate", "--plan", str(plan_path), *extra]) == 0
    assert seen["args"] == expected


def test_evaluate_records_protocol_and_splits(tiny_plan, capsys):
    plan_path, corpus = tiny_plan
    result = _evaluate(plan_path, corpus, capsys)
    assert result["settings"]["protocol"] == {"name": "custom", "seq_len": 32, "max_windows": 2}
    assert result["settings"]["splits"] == {str(corpus): "test"}


@pytest.mark.parametrize("extra, expected", [([], (0.6, 0.8)), (["--bias-fit-ratios", "0.7"], (0.7,)),
                                             (["--bias-fit-ratios", "none"], ())])
def test_profile_runs_the_bias_fit_by_default(monkeypatch, tmp_path, capsys, extra, expected):
    import lems_core.pipeline as pipeline

    seen = {}

    def fake_build(source, decomposition, calibration, settings, **kw):
        seen.update(kw, calibration=calibration, bias_fit_ratios=settings.bias_fit_ratios)
        return tmp_path

    monkeypatch.setattr(pipeline, "build_profile", fake_build)
    assert main(["profile", "--model", "demo", "--device", "cpu", *extra]) == 0
    assert seen["bias_fit_ratios"] == expected
    assert seen["calibration"].n_samples == 16 and seen["calibration"].sampling == "reference"  # cpu preset on CPU


def test_allocate_lems_uses_the_profiles_bias_fit_and_lems_fixed_the_fixed_bias(tmp_path, capsys):
    profile = synthetic_profile(num_blocks=6)
    profile.bias_fit = {"ratios": {"0.6": {"alpha": 0.25, "gamma": 1.5}, "0.8": {"alpha": 2.5, "gamma": 6.5}}}
    folder = profile.save(tmp_path / "profile")
    lems, fixed = tmp_path / "lems.json", tmp_path / "fixed.json"
    assert main(["allocate", "--profile", str(folder), "--method", "lems", "--ratio", "0.75", "-o", str(lems)]) == 0
    assert "bias fitted in the profile at 0.8" in capsys.readouterr().err
    em = RankPlan.load(lems).error_model
    assert (em["alpha"], em["gamma"], em["bias_form"]) == (2.5, 6.5, "harmonic")
    assert main(["allocate", "--profile", str(folder), "--method", "lems_fixed", "--ratio", "0.75",
                 "-o", str(fixed)]) == 0
    doc = RankPlan.load(fixed)
    assert doc.method == "lems_fixed" and (doc.error_model["alpha"], doc.error_model["gamma"]) == (0.0, 5.0)
    assert main(["allocate", "--profile", str(folder), "--method", "lems", "--gamma", "3", "--ratio", "0.75",
                 "-o", str(fixed)]) == 2
    assert "lems_fixed" in capsys.readouterr().err


NINES = "0." + "9" * 400  # a float rounds it to 1.0 without a word
HUGE = "9" * 400  # an int Python holds, but no float, C int or tensor size does


@pytest.mark.parametrize("argv, option", [
    (["allocate", "--ratio", NINES], "--ratio"),
    (["allocate", "--ratio", "1e400"], "--ratio"),
    (["allocate", "--ratio", HUGE], "--ratio"),
    (["allocate", "--ratio", "1.5"], "--ratio"),
    (["allocate", "--ratio", "0.5", "--trials", HUGE], "--trials"),
    (["allocate", "--ratio", "0.5", "--energy-power", HUGE], "--energy-power"),
    (["allocate", "--ratio", "0.5", "--rank-multiple", HUGE], "--rank-multiple"),
    (["ars", "--ratio", f"0.8,{NINES}"], "--ratio"),
    (["ars", "--ratio", "0.8,1e400"], "--ratio"),
    (["profile", "--seq-len", HUGE], "--seq-len"),
    (["profile", "--seed", HUGE], "--seed"),
    (["profile", "--n-samples", "0"], "--n-samples"),
    (["profile", "--extra-ratios", f"0.4,{NINES}"], "--extra-ratios"),
    (["profile", "--bias-fit-ratios", HUGE], "--bias-fit-ratios"),
    (["profile", "--max-memory", HUGE + "GB"], "--max-memory"),
    (["profile", "--max-memory", "1" * 30 + "GB"], "--max-memory"),
    (["ppl", "--max-windows", HUGE], "--max-windows"),
    (["evaluate", "--plan", "p.json", "--task-limit", HUGE], "--task-limit"),
])
def test_oversized_or_out_of_range_numbers_are_argparse_errors(argv, option, profile_dir, tmp_path, capsys):
    """Exit 2 with one line naming the option, before anything is loaded: never an OverflowError traceback."""
    extra = ["--profile", str(profile_dir), "-o", str(tmp_path / "p.json")] if argv[0] in ("allocate", "ars") else []
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"error: argument {option}" in err and "Traceback" not in err and "OverflowError" not in err
    assert len(err.splitlines()[-1]) < 300  # the 400 digits are not echoed back


def test_sensible_numbers_still_parse(profile_dir, tmp_path):
    from lems_core.cli import build_parser

    args = build_parser().parse_args(["profile", "--seq-len", "2048", "--seed", "0", "--extra-ratios", "0.4, 0.5",
                                      "--bias-fit-ratios", "0.8,0.6,0.6", "--max-memory", "1.5GB"])
    assert (args.seq_len, args.seed, args.extra_ratios, args.bias_fit_ratios) == (2048, 0, [0.4, 0.5], (0.6, 0.8))
    assert args.max_memory == int(1.5 * 2**30)
    args = build_parser().parse_args(["ars", "--profile", "p", "--ratio", "0.8,0.6"])
    assert args.ratio == [0.8, 0.6]
    assert main(["allocate", "--profile", str(profile_dir), "--ratio", "1", "-o", str(tmp_path / "p.json")]) == 0


def test_a_budget_too_long_or_too_large_for_a_float_is_a_value_error_wherever_it_is_read():
    """budget.check_ratio (every allocator) and plan.parse_budgets (the app's budget fields) name the bad value."""
    from lems_core.budget import check_ratio
    from lems_core.plan import parse_budgets

    for bad in (NINES, HUGE, 10**400):
        with pytest.raises(ValueError, match="too long to be a number|must be a number in"):
            check_ratio(bad)
    with pytest.raises(ValueError, match="too long to be a number"):
        parse_budgets(f"0.6, {NINES}")
    assert check_ratio("0.75") == 0.75 and parse_budgets("0.6 0.999") == [0.6, 0.999]


def test_a_plan_with_a_predicted_error_too_large_for_a_float_is_a_plan_error(profile_dir):
    from lems_core.plan import PlanError

    profile = Profile.load(profile_dir)
    main_args = ["allocate", "--profile", str(profile_dir), "--method", "uniform", "--ratio", "0.7", "-o"]
    out = profile_dir.parent / "plan.json"
    assert main([*main_args, str(out)]) == 0
    doc = json.loads(out.read_text())
    doc["layers"][0]["predicted_error"] = 10**400
    with pytest.raises(PlanError, match="predicted_error must be a finite number"):
        RankPlan.from_json(json.dumps(doc), layers=profile.layers, fingerprint=profile.fingerprint)


def test_version_prints_lems_and_the_package_version():
    """`python -m lems_core --version` (what the `lems` script runs) prints `lems <version>`, exit 0."""
    import subprocess
    import sys

    import lems_core

    done = subprocess.run([sys.executable, "-m", "lems_core", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"lems {lems_core.__version__}"


def test_help_imports_neither_torch_nor_the_pipeline():
    """`-h` builds only the command list: no command's heavy imports, so it answers at once."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\nfrom lems_core.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    main(['-h'])\n"
            "print(sorted({'torch', 'transformers', 'lems_core.pipeline'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_option_of_every_command_has_a_help_string():
    from lems_core.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    undocumented = [f"{name or 'lems'} {'/'.join(action.option_strings)}"
                    for name, sub in {"": parser, **commands}.items() for action in sub._actions
                    if action.option_strings and not (action.help or "").strip()]
    assert commands and not undocumented
