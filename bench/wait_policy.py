"""Benchmark: what the OpenMP wait policy costs the demo's statistics pass and forward, spinning against passive.

Run as `python -m bench.wait_policy` (about 3 minutes). Each policy runs in a process of
its own (the policy is read once, when OpenMP starts), taking turns, ``--rounds`` times:
the first-run plan's statistics pass (KFAC, the LEMS @ 0.8 plan's 88 layers, 4 calibration
windows of 512 tokens) and four 1 x 512 dense forwards, at ``--threads`` torch threads.
`import lems_core` sets PASSIVE unless the environment sets a policy (docs/benchmarks.md);
run it on an idle machine for the idle cost, beside other jobs for the contention cost.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(threads: int) -> None:
    """One measurement under this process's $OMP_WAIT_POLICY."""
    import torch

    from bench.first_run import DEMO, app_plan
    from lems_core import pipeline
    from lems_core.calibration import CalibrationConfig
    from lems_core.compression import is_dense_rank
    from lems_core.model import compressible_layers
    from lems_core.pipeline.artefacts import calibration_windows
    from lems_core.profile import Profile
    from lems_core.statistics import collect_kfac_statistics

    torch.set_num_threads(threads)
    profile = Profile.load(DEMO)
    ranks = app_plan(profile)[0].ranks()
    loaded = pipeline.get_model("demo", "cpu")
    calib, _ = calibration_windows(loaded, CalibrationConfig.from_dict(profile.calibration))
    layers = [l for l in compressible_layers(loaded.model) if l.name in ranks and not is_dense_rank(l, ranks[l.name])]
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    collect_kfac_statistics(loaded.model, calib[:4], layers)
    stats = time.perf_counter() - wall, time.process_time() - cpu
    with torch.no_grad():
        loaded.model(calib[:1], use_cache=False)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(4):
            loaded.model(calib[:1], use_cache=False)
    forward = (time.perf_counter() - wall) / 4, (time.process_time() - cpu) / 4
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}: statistics, 4 windows {stats[0]:.1f} s (CPU "
          f"{stats[1]:.1f}); forward 1 x 512 {forward[0]:.2f} s (CPU {forward[1]:.2f}); load average {load:.2f} -> "
          f"{os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.threads)
        return
    print(f"# bench/wait_policy.py: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start")
    for _ in range(args.rounds):
        for policy in ("ACTIVE", "PASSIVE"):
            out = subprocess.run([sys.executable, "-m", "bench.wait_policy", "--child", "--threads", str(args.threads)],
                                 env={**os.environ, "OMP_WAIT_POLICY": policy}, cwd=ROOT, check=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            print(out.stdout, end="", flush=True)


if __name__ == "__main__":
    main()
