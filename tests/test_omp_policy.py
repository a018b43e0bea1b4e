"""lems_core sets passive OpenMP waiting before torch loads, unless the user chose a policy."""
import os
import subprocess
import sys

PROBE = "import lems_core, os; print(os.environ.get('OMP_WAIT_POLICY'))"


def _policy(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env_extra
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_importing_lems_core_makes_openmp_threads_wait_passively():
    assert _policy({}) == "PASSIVE"


def test_a_policy_the_user_set_is_kept():
    assert _policy({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
