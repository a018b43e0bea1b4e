"""``ars``: train ARS (learned rank selection) for a profile at one or more budgets."""
from __future__ import annotations

import json
from pathlib import Path

from .common import run_from_args
from .types import kept_fractions

NAME = "ars"
HELP = "train ARS (learned rank selection) for a profile; results are cached"  # its line in `-h`


def add_parser(subparsers):
    """The ``ars`` subparser, with all its options."""
    from ..allocators.ars import PRESETS as ARS_PRESETS

    sp = subparsers.add_parser(NAME, help=HELP)
    sp.add_argument("--profile", required=True, help="profile folder (contains profile.json)")
    sp.add_argument("--ratio", type=kept_fractions, required=True, help="kept fraction(s), comma separated, e.g. 0.8,0.6")
    sp.add_argument("--preset", default="cpu-small", choices=sorted(ARS_PRESETS),
                    help="cpu-small (default: 101-200 steps, reference rule) | reference (at most 2000 steps) | "
                         "<name>-legacy: the earlier rule (fixed steps, one-sided penalty, compressible only, "
                         "one-way GRU)")
    sp.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    sp.add_argument("--cache-dir", default=None, help="cache folder of the trained plans (default ./cache, or "
                                                      "$LEMS_CACHE_DIR)")
    sp.add_argument("-o", "--output", default=None, help="write the plan here ({ratio} is replaced)")
    sp.set_defaults(fn=run)
    return sp


def run(args) -> int:
    """Train ARS for a profile at each ratio (cached), print the budget bookkeeping, write the plans."""
    from .. import pipeline

    ratios = list(args.ratio)
    plans = pipeline.run_ars_job(args.profile, ratios, args.preset, run=run_from_args(
        args, progress=lambda f, m: print(f"\r{100 * f:5.1f}% {m[-70:]:<70}", end="", flush=True)))
    print()
    for ratio, doc in zip(ratios, plans):
        _report(ratio, doc)
        if args.output:
            _write_plan(args.output, ratio, doc)
    return 0


def _report(ratio: float, doc: dict) -> None:
    """The budget bookkeeping of one trained plan: learned and realised ratios, repair cuts, steps."""
    s = doc["summary"]
    info = doc["meta"]["ars"]
    print(f"ARS at {ratio:g}: learned {info['learned_ratio']:.4f}, realised {s['realised_ratio']:.4f} "
          f"after {info['repair_cuts']} repair cuts, {info['seconds']:.0f} s")
    if "budget_model" in info:  # the reference rule trains against the whole model's kept fraction
        print(f"  {info.get('rule')} rule: {info['steps_run']} steps{' (early stop)' if info['stopped_early'] else ''}, "
              f"whole-model target {info['budget_model']:.4f}, realised {info['realised_model_ratio']:.4f}")


def _write_plan(pattern: str, ratio: float, doc: dict) -> None:
    """Write one plan to ``pattern`` with {ratio} replaced, creating its folder."""
    out = Path(pattern.replace("{ratio}", f"{ratio:g}"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"  plan -> {out}")

