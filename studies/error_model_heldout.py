"""Held-out check of the error models on the committed KFAC demo profile (no model run).

The profile holds measured single-layer KL at the reference ratio 0.1 and at 0.4-0.9
for all 210 layers. Each model is fitted on some ratios and asked for the KL at the
others; the table gives Spearman's rank correlation between predicted and measured KL
over the 210 layers at each held-out ratio, the pooled correlation over every held-out
(layer, ratio) pair, and the median |log10(predicted / measured)|.

    python -m studies.error_model_heldout [--out studies/results/error_model_heldout.md]

Models: ``lems`` = one-point LEMS, kl_ref * S(r) (docs/reference/methods.md §1.2); ``lems+floor`` = the same
shape applied to the excess over the profile's KL floor (LEMS-MP with the reference
point only); ``lems_mp {..}`` = LEMS-MP fitted on those ratios. The depth bias is not
part of a single-layer KL, so no model applies it here.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from lems_core.allocators.lems_mp import fit_multipoint, measured_rank
from lems_core.cache import DEMO_DIR
from lems_core.error_model import ErrorModelParams, spectral_shape
from lems_core.profile import Profile

SPLITS = [  # (fitted measured ratios besides 0.1, held-out ratios)
    ((0.5, 0.9), (0.4, 0.6, 0.7, 0.8)),
    ((0.9,), (0.4, 0.5, 0.6, 0.7, 0.8)),
    ((0.5,), (0.4, 0.6, 0.7, 0.8, 0.9)),
    ((0.4, 0.6, 0.8), (0.5, 0.7, 0.9)),
]


def lems_prediction(profile: Profile, ratio: float, params: ErrorModelParams) -> np.ndarray:
    """One-point LEMS at ``ratio`` without the depth bias: kl_ref * S_l(r)."""
    return np.array([profile.kl_ref[i] * spectral_shape(profile.spectra[l.name], np.array([measured_rank(l, ratio)]),
                                                        l.eq_rank, params)[0] for i, l in enumerate(profile.layers)])


def mp_prediction(profile: Profile, ratio: float, fit_ratios) -> np.ndarray:
    model = fit_multipoint(profile, ErrorModelParams(), fit_ratios)
    return np.array([model.predicted_kl(profile, i, [measured_rank(l, ratio)])[0] for i, l in enumerate(profile.layers)])


def scores(predict, profile: Profile, held: tuple[float, ...]) -> list[str]:
    """Per held-out ratio Spearman, pooled Spearman, median |log10 error|."""
    preds = {r: predict(r) for r in held}
    per = [spearmanr(preds[r], profile.measured[r]).statistic for r in held]
    pooled_p = np.concatenate([preds[r] for r in held])
    pooled_m = np.concatenate([profile.measured[r] for r in held])
    log_err = np.median(np.abs(np.log10(pooled_p / pooled_m)))
    return [f"{s:.3f}" for s in per] + [f"{spearmanr(pooled_p, pooled_m).statistic:.3f}", f"{log_err:.3f}"]


def run() -> list[str]:
    profile = Profile.load(DEMO_DIR / "smollm2-135m-kfac")
    params = ErrorModelParams()
    lines = [f"Held-out single-layer KL, demo KFAC profile ({len(profile.layers)} layers); "
             f"KL floor {fit_multipoint(profile, params, ()).floor:.3e}", ""]
    for fitted, held in SPLITS:
        lines += [f"**fit on {{0.1, {', '.join(map(str, fitted))}}}, held out {{{', '.join(map(str, held))}}}**", "",
                  "| model | " + " | ".join(f"rho@{r}" for r in held) + " | rho pooled | median abs log10 err |",
                  "|---|" + "---|" * (len(held) + 2)]
        rows = [("lems (0.1 only)", lambda r: lems_prediction(profile, r, params)),
                ("lems+floor (0.1 only)", lambda r: mp_prediction(profile, r, ())),
                (f"lems_mp {{0.1, {', '.join(map(str, fitted))}}}", lambda r, f=fitted: mp_prediction(profile, r, f))]
        lines += [f"| {name} | " + " | ".join(scores(fn, profile, held)) + " |" for name, fn in rows]
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="studies/results/error_model_heldout.md")
    args = parser.parse_args()
    lines = run()
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
