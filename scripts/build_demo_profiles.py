"""Build the committed demo profiles for SmolLM2-135M-Instruct (KFAC-SVD and SVD-LLM).

Runs on CPU in tens of minutes (most of it the per-layer KL sweep); the result
is copied to cache/demo/<name>/ so the app opens instantly on a fresh machine.

    python scripts/build_demo_profiles.py [--only kfac]
"""
from __future__ import annotations

import argparse
import shutil
import time

from lems_core.cache import DEMO_DIR
from lems_core.calibration import demo_calibration
from lems_core.pipeline import ProfileSettings, Run, add_measured_points, build_profile, get_model

# Extra measured point to validate the error model; --asvd-points adds ASVD's 0.4..0.9.
DEMO_RATIOS = {"kfac": (0.5,), "svd_llm": ()}
ASVD_POINTS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=None)
    parser.add_argument("--asvd-points", action="store_true", help="also measure ASVD's ratios 0.4..0.9 (slow)")
    args = parser.parse_args()
    loaded = get_model("demo", "cpu")
    for decomposition, ratios in DEMO_RATIOS.items():
        if args.only and decomposition != args.only:
            continue
        started = time.perf_counter()
        last = [0.0]

        def progress(fraction: float, message: str) -> None:
            if fraction - last[0] >= 0.01 or fraction >= 1.0:
                last[0] = fraction
                print(f"[{time.perf_counter() - started:7.1f}s] {100 * fraction:5.1f}% {message}", flush=True)

        run = Run(progress=progress)
        folder = build_profile(loaded, decomposition, demo_calibration(), ProfileSettings(extra_ratios=ratios), run=run)
        if args.asvd_points:
            add_measured_points(folder, ASVD_POINTS, run=run)
        target = DEMO_DIR / f"smollm2-135m-{decomposition.replace('_', '-')}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)
        print(f"{decomposition}: {time.perf_counter() - started:.0f} s -> {target}", flush=True)


if __name__ == "__main__":
    main()
