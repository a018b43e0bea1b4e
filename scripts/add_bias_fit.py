"""Add the reference LEMS's bias fit and the measured KL floor to existing profiles.

Rebuilding the committed demo profiles (``cache/demo/``) took ~1.6 h of CPU for the
KFAC one, so this script does not rebuild them: it loads each profile's own model,
search windows and factors (``pipeline.profile_model``: the calibration recorded in
the profile, so the same windows the measurements were made on), and

1. measures the KL floor: the dense model against its own cached reference through
   the sweep's code path, with the bf16 reference the stored measurements were made
   against, and with the float32 one new profiles use;
2. runs ``allocators.lems.profile_bias_fit`` (10 seeded trials per ratio, scored by
   KL on the search windows, float32 reference) at ``--ratios``;

then saves the profile in place (its key, spectra and measurements unchanged) and
prints what it did. The KL measurements already stored are *not* re-measured: they
keep the bf16 floor recorded in ``kl_floor["kl_bf16"]``.

    .venv/bin/python -m scripts.add_bias_fit cache/demo/smollm2-135m-kfac cache/demo/smollm2-135m-svd-llm
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lems_core import pipeline
from lems_core.allocators import BIAS_FIT_RATIOS, profile_bias_fit
from lems_core.blocks import capture_block_inputs
from lems_core.profile import Profile
from lems_core.sensitivity import dense_reference, kl_floor


def measure_floors(loaded, search_ids, batch_size: int = 4) -> dict:
    """KL of the dense model against its own bf16 and float32 cached references."""
    items = capture_block_inputs(loaded.model, search_ids, batch_size)
    out = {}
    for precision in ("bf16", "fp32"):
        ref = dense_reference(loaded.model, items, search_ids, batch_size, precision=precision)
        out[precision] = kl_floor(loaded.model, items, ref)
    return out


def add_to(folder: Path, ratios: tuple[float, ...], device: str | None) -> dict:
    started = time.perf_counter()
    profile = Profile.load(folder)
    key = profile.key
    loaded, search_ids, factors = pipeline.profile_model(profile, run=pipeline.Run(device=device))
    with pipeline.hold_model(loaded):
        floors = measure_floors(loaded, search_ids)
        scorer = pipeline.make_kl_scorer(loaded, factors, search_ids)
        profile.bias_fit = profile_bias_fit(profile, scorer, ratios)
    profile.kl_floor = {
        "kl": floors["bf16"], "reference_precision": "bf16", "kl_bf16": floors["bf16"], "kl_fp32": floors["fp32"],
        "search_windows": int(search_ids.shape[0]), "seq_len": int(search_ids.shape[1]),
        "note": "measured afterwards by scripts/add_bias_fit.py; the stored KL values were measured against a "
                "bf16 reference and include kl_bf16",
    }
    profile.bias_fit["added_by"] = "scripts/add_bias_fit.py"
    assert profile.key == key
    profile.save(folder)
    seconds = round(time.perf_counter() - started, 1)
    return {"folder": str(folder), "seconds": seconds, "kl_floor": profile.kl_floor,
            "fit": {r: {k: e[k] for k in ("alpha", "gamma", "score", "trial")}
                    for r, e in profile.bias_fit["ratios"].items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--ratios", default=",".join(f"{r:g}" for r in BIAS_FIT_RATIOS))
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    ratios = tuple(float(x) for x in args.ratios.split(","))
    for folder in args.folders:
        print(json.dumps(add_to(folder, ratios, args.device), indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
