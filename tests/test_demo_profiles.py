"""The committed demo profiles load under the current schema and are self-consistent."""
import numpy as np
import pytest

from lems_core.allocators import allocate
from lems_core.cache import demo_profile_dirs, list_profiles
from lems_core.profile import PROFILE_SCHEMA, Profile

DIRS = demo_profile_dirs()


def test_demo_profiles_are_committed():
    names = {d.name for d in DIRS}
    assert {"smollm2-135m-kfac", "smollm2-135m-svd-llm"} <= names


@pytest.mark.parametrize("folder", DIRS, ids=lambda d: d.name)
def test_demo_profile_matches_schema(folder):
    profile = Profile.load(folder)  # checks schema, checksum, shapes
    assert profile.schema == PROFILE_SCHEMA
    assert len(profile.layers) == 210 and profile.num_blocks == 30
    assert profile.kl_ref is not None and np.all(profile.kl_ref > 0)
    assert profile.model_source == "demo"
    for ratio in (0.8, 0.6):
        alloc = allocate(profile, "lems", ratio)
        assert alloc.info["realised_ratio"] <= ratio + 1e-9
    assert any(e.is_demo and e.path == folder for e in list_profiles())


@pytest.mark.parametrize("folder", DIRS, ids=lambda d: d.name)
def test_demo_profiles_carry_the_bias_fit_and_the_kl_floor(folder):
    """Fitted while the profile was built (the rebuilt KFAC one), or added afterwards by
    scripts/add_bias_fit.py without re-measuring the stored KL values (the SVD-LLM one)."""
    profile = Profile.load(folder)
    fit = profile.bias_fit
    assert fit is not None and set(fit["ratios"]) == {"0.6", "0.8"} and fit["seed"] == 42
    for key, entry in fit["ratios"].items():
        scores = [t["score"] for t in entry["trials"]]
        assert len(scores) == 10 and entry["score"] == min(scores)
        assert all(0 <= t["alpha"] <= 3 and 0 <= t["gamma"] <= 7 for t in entry["trials"])
        alloc = allocate(profile, "lems", float(key))
        assert alloc.info["bias_source"] == f"profile fit at {key}"
        assert alloc.info["error_model"]["alpha"] == entry["alpha"]
    floor = profile.kl_floor
    if floor["reference_precision"] == "fp32":  # rebuilt with the reference defaults (issue #11)
        assert floor["kl"] < 1e-9 and profile.calibration.get("sampling") == "reference"
        assert np.min(profile.kl_ref) > 0  # no layer sits on a rounding floor any more
    else:  # built before: bf16 reference, its floor measured afterwards by scripts/add_bias_fit.py
        assert floor["kl_fp32"] < 1e-9 < floor["kl_bf16"]
        # the floor the issue saw: the least sensitive layers sit on it
        assert np.min(profile.kl_ref) < 3 * floor["kl_bf16"]


@pytest.mark.parametrize("ratio", [0.8, 0.6])
def test_committed_ars_plans_serve_the_demo_profile(ratio, tmp_path):
    """The ARS plans beside the KFAC demo profile validate and are used without training."""
    from lems_core.allocators import ars

    profile = Profile.load(next(d for d in DIRS if d.name == "smollm2-135m-kfac"))
    assert ars.committed_plan_path(profile, ratio).is_file()
    plan = ars.cached_ars_plan(profile, ratio, cache_dir=tmp_path)  # empty index: the committed file
    assert plan is not None and plan.method == "ars" and plan.fingerprint == profile.fingerprint
    assert plan.summary["realised_ratio"] <= ratio + 1e-9
    alloc = allocate(profile, "ars", ratio, cache_dir=tmp_path)  # no model given: must not train
    assert alloc.ranks == plan.ranks()
