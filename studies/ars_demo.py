"""Train ARS (docs/reference/methods.md §4.6) on the demo model for a demo profile and write the committed plans.

For each ratio this trains the hypernetwork with the given preset (default
"cpu-small") on the profile's calibration windows, prints the time taken, and
writes cache/demo/ars/<profile-fingerprint>-<decomposition>-<ratio>.json, which
the ``ars`` allocator then serves without training. The full factors are
computed once (from the pipeline's cached statistics) and shared by all ratios.

    nice python -m studies.ars_demo --profile cache/demo/smollm2-135m-kfac [--ratios 0.8,0.6] [--preset cpu-small]

"cpu-small" trains under the reference rule (whole-model budget, two-sided penalty with
the lambda band, early stop on the 100-step mean: 101-200 steps); "cpu-small-legacy"
reproduces the committed legacy-rule plans (80 fixed steps, the one-sided penalty).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lems_core import pipeline
from lems_core.allocators import ars
from lems_core.pipeline import get_model
from lems_core.profile import Profile
from lems_core.run import Run


def printer(started: float, every: float = 0.05):
    """A progress callback printing at most every ``every`` of the bar."""
    last = [-1.0]

    def progress(fraction: float, message: str) -> None:
        if fraction - last[0] >= every or fraction >= 1.0:
            last[0] = fraction
            print(f"[{time.perf_counter() - started:7.1f}s] {100 * fraction:5.1f}% {message}", flush=True)
    return progress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", required=True, help="demo profile folder, e.g. cache/demo/smollm2-135m-kfac")
    parser.add_argument("--ratios", default="0.8,0.6", help="kept fractions, comma separated")
    parser.add_argument("--preset", default="cpu-small", choices=sorted(ars.PRESETS))
    parser.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 measured ~5x faster than 2 per step on the shared 2-core CPU")
    parser.add_argument("--out-dir", default=str(ars.COMMITTED_DIR))
    parser.add_argument("--cache-dir", default=None, help="statistics / index cache (default ./cache)")
    parser.add_argument("--force", action="store_true", help="retrain even when the index has this result")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    profile = Profile.load(args.profile)
    config = ars.preset(args.preset, **({"steps": args.steps} if args.steps else {}))
    print(f"profile {args.profile}: {profile.decomposition}, {len(profile.layers)} layers; config {config.to_dict()}")

    started = time.perf_counter()
    loaded = get_model(profile.model_source, "cpu")
    if loaded.fingerprint != profile.fingerprint:
        raise SystemExit(f"profile is for model {profile.fingerprint}, {profile.model_source} loads as {loaded.fingerprint}")
    print(f"model loaded in {time.perf_counter() - started:.1f} s", flush=True)

    started = time.perf_counter()
    calib = pipeline.calibration_ids(loaded, profile)
    factors = pipeline.full_factorizations(loaded, profile, calib,
                                           run=Run(cache_dir=cache_dir, progress=printer(started, 0.25)))
    print(f"full factors in {time.perf_counter() - started:.1f} s "
          f"(spectrum mismatch vs profile {ars.spectrum_mismatch(profile, factors):.2e})", flush=True)

    out_dir = Path(args.out_dir)
    for ratio in (float(r) for r in args.ratios.split(",")):
        started = time.perf_counter()
        alloc = pipeline.train_ars(loaded, profile, ratio, config, factors=factors, windows=calib, force=args.force,
                                   run=Run(cache_dir=cache_dir, progress=printer(started)))
        plan = ars.allocation_to_plan(profile, alloc)
        path = plan.save(out_dir / ars.committed_plan_path(profile, ratio).name)
        info, s = alloc.info, plan.summary
        curve = info.get("loss_curve") or []
        ce = f"CE {curve[0]['ce']:.3f} -> {curve[-1]['ce']:.3f}, " if curve else ""
        steps = info.get("steps_run", len(curve))
        target = f", whole-model target {info['budget_model']:.4f}" if "budget_model" in info else ""
        print(f"ratio {ratio:g}: {time.perf_counter() - started:.1f} s ({info.get('train_seconds', 0):.1f} s training, "
              f"{steps} of at most {config.steps} steps, {info.get('rule', 'legacy')} rule{target}); "
              f"{ce}learned {info['learned_ratio']:.4f}, rounded {info['rounded_ratio']:.4f}, "
              f"{info['repair_cuts']} cuts + {info['fill_adds']} adds -> realised {s['realised_ratio']:.4f}, "
              f"{s['dense_layers']} dense -> {path}", flush=True)


if __name__ == "__main__":
    main()
