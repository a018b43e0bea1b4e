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
