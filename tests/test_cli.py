import json

import pytest

from lems_core.cli import main
from lems_core.plan import RankPlan
from lems_core.profile import Profile, synthetic_profile


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
