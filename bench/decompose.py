"""Time decomposing all 210 Linears of the demo model with each method.

Statistics are those of the demo profiles (16 x 512 calibration tokens), read from
the cache when `scripts/build_demo_profiles.py` has run, else computed once. Prints
seconds per method and the ratio to the 60 s goal.

    python -m bench.decompose [--methods svd_llm,kfac] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from lems_core.calibration import demo_calibration
from lems_core.decompositions import METHODS, Decomposer
from lems_core.model import compressible_layers
from lems_core.pipeline import calibration_windows, get_model, statistics_for

GOAL_SECONDS = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = get_model("demo", "cpu")
    print(f"load demo model: {time.perf_counter() - t0:.1f} s")
    config = demo_calibration()
    calib, _ = calibration_windows(loaded, config)
    layers = compressible_layers(loaded.model)
    t0 = time.perf_counter()
    stats = {m: statistics_for(loaded, calib, config, m) for m in ("kfac", "fwsvd")}
    inputs, grads, fisher = stats["kfac"].inputs, stats["kfac"].grad_gram, stats["fwsvd"].fisher
    print(f"statistics ({calib.shape[0]}x{calib.shape[1]} tokens, cached after the first run): {time.perf_counter() - t0:.1f} s")
    print(f"{'method':<12} {'seconds':>8} {'layers':>7}  vs 60 s goal")
    for method in args.methods.split(","):
        decomposer = Decomposer(method)
        t0 = time.perf_counter()
        for layer in layers:
            weight = loaded.model.get_submodule(layer.name).weight
            decomposer(layer, weight, inputs[layer.name], grads[layer.name], fisher[layer.name])
        seconds = time.perf_counter() - t0
        print(f"{method:<12} {seconds:8.1f} {len(layers):7d}  {seconds / GOAL_SECONDS:.2f}x")


if __name__ == "__main__":
    main()
