"""Carry the extra single-layer KL points of an older profile into a rebuilt one.

The KFAC demo profile was rebuilt with the reference defaults (offset rule, float32
reference logits, bias fit). Its calibration and search windows are *the same* as the
old profile's: with seed 42 / 1042 the two offset rules draw the same offsets from
``random.Random`` here (both upper bounds have the same bit length and no draw falls
between them), which this script checks. Re-measuring ASVD's six points (1260 suffix
runs, about an hour of these 2 CPUs) was not affordable in the session, so the old
points are copied, and the profile says so (``meta["carried_points"]``): they were
measured against a bf16 reference and include its floor (``kl_bf16`` of the old profile).

    python scripts/carry_measured_points.py OLD_PROFILE_DIR NEW_PROFILE_DIR

``--nll`` carries the other way round: the single-layer search NLL that a rebuild in
another cache measured at ASVD's points (``profile --extra-ratios``) goes into the
shipped profile, whose KL points stay as they are (``lems_mp`` and the held-out study
read them). NLL depends on the factors, so the two profiles' spectra must agree to
float32 summation round-off as well as their windows; ``meta["nll_points"]`` says where they came from.

    python scripts/carry_measured_points.py --nll REBUILT_PROFILE_DIR SHIPPED_PROFILE_DIR
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

from lems_core.calibration import SEARCH_SEED_OFFSET, CalibrationConfig
from lems_core.data import load_text
from lems_core.profile import Profile


def _offsets(cfg: CalibrationConfig, text: str, seed: int, draws: int) -> list[int]:
    """The first character offsets ``calibration.sample_windows`` draws (no short draw here)."""
    upper = len(text) - (cfg.seq_len if cfg.sampling == "reference" else 10 * cfg.seq_len) - 1
    rng = random.Random(seed)
    return [rng.randint(0, upper) for _ in range(draws)]


def same_windows(old: CalibrationConfig, new: CalibrationConfig) -> bool:
    """Whether both configs draw the same calibration and search offsets on their text."""
    rest = lambda c: (c.dataset, c.split, c.n_samples, c.n_search, c.seq_len, c.seed)
    if rest(old) != rest(new):
        return False
    text, _ = load_text(new.dataset, new.split)
    return all(_offsets(old, text, seed, n + 4) == _offsets(new, text, seed, n + 4)
               for seed, n in ((new.seed, new.n_samples), (new.seed + SEARCH_SEED_OFFSET, new.n_search)))


def spectra_gap(a: Profile, b: Profile) -> float:
    """The largest difference between the two profiles' singular values, relative to each layer's largest."""
    gaps = []
    for layer in a.layers:
        x, y = np.asarray(a.spectra[layer.name], np.float64), np.asarray(b.spectra[layer.name], np.float64)
        if x.shape != y.shape:
            return float("inf")
        gaps.append(float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(x))), np.finfo(np.float64).tiny)))
    return max(gaps, default=0.0)


def carry_nll(source: Profile, target: Profile) -> list[float]:
    """Copy ``source``'s NLL points that ``target`` lacks into it; returns their ratios."""
    # The spectra come from float64 factorisations of float32 Grams, each a sum over the calibration tokens: two
    # builds that add them in another order agree to the float32 summation bound, tokens x eps (relative to the
    # largest singular value); a different decomposition or calibration is off by far more.
    cfg = CalibrationConfig.from_dict(target.calibration)
    gap, tolerance = spectra_gap(source, target), cfg.n_samples * cfg.seq_len * float(np.finfo(np.float32).eps)
    if gap > tolerance:
        sys.exit(f"the profiles' spectra differ by {gap:.2e} of the largest singular value (more than {tolerance:.1e}): "
                 "their factors differ, so the NLL does not carry")
    carried = sorted(set(source.measured_nll) - set(target.measured_nll))
    target.measured_nll.update({r: source.measured_nll[r] for r in carried})
    target.meta["nll_points"] = {
        "ratios": carried, "from_profile_created": source.meta.get("created"), "spectra_gap": gap,
        "note": "single-layer search NLL measured by a rebuild of this profile in another cache (profile "
                "--extra-ratios, same windows, spectra equal to float32 summation round-off, spectra_gap); the KL "
                "points here are unchanged",
    }
    return carried


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--nll", action="store_true", help="carry OLD's NLL points into NEW (see above)")
    args = parser.parse_args()
    old, new = Profile.load(args.old), Profile.load(args.new)
    if (old.fingerprint, old.decomposition, [l.name for l in old.layers]) != \
            (new.fingerprint, new.decomposition, [l.name for l in new.layers]):
        sys.exit("the profiles are not of the same model, decomposition and layers")
    if not same_windows(CalibrationConfig.from_dict(old.calibration), CalibrationConfig.from_dict(new.calibration)):
        sys.exit("the profiles' calibration windows differ: measure the points instead (pipeline.add_measured_points)")
    if args.nll:
        carried = carry_nll(old, new)
        new.save(args.new)
        print(f"carried the NLL at {carried} into {args.new}")
        return
    carried = sorted(set(old.measured) - set(new.measured))
    new.measured.update({r: old.measured[r] for r in carried})
    new.meta["carried_points"] = {
        "ratios": carried, "from_profile_created": old.meta.get("created"),
        "reference_precision": (old.kl_floor or {}).get("reference_precision", "bf16"),
        "kl_floor_of_source": (old.kl_floor or {}).get("kl_bf16"),
        "note": "single-layer KL at these ratios copied from the profile built before the reference defaults "
                "(same calibration and search windows); measured against a bf16 reference, so they include its "
                "floor, and no single-layer NLL (ASVD's reference ranking falls back to KL)",
    }
    new.save(args.new)
    print(f"carried {carried} into {args.new}")


if __name__ == "__main__":
    main()
