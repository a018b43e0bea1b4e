"""Time decomposing all 210 Linears of the demo model with each method (issue #2).

Statistics come from a small calibration set (their size does not change the
decomposition cost, which depends only on the matrix shapes). Prints seconds per
method and the ratio to the 60 s goal for SVD-LLM.

    python bench/decompose.py [--methods svd_llm,kfac] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lems_core.calibration import calibration_batches, preset
from lems_core.decomposition import METHODS, Decomposer
from lems_core.model import DEMO_SOURCE, compressible_layers, load_model
from lems_core.statistics import collect_fisher_rows, collect_grad_grams, collect_input_stats

GOAL_SECONDS = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load_model(DEMO_SOURCE, device="cpu")
    print(f"load demo model: {time.perf_counter() - t0:.1f} s")
    calib, _ = calibration_batches(loaded.tokenizer, preset("cpu-tiny"))
    layers = compressible_layers(loaded.model)
    t0 = time.perf_counter()
    inputs = collect_input_stats(loaded.model, calib)
    grads = collect_grad_grams(loaded.model, calib)
    fisher = collect_fisher_rows(loaded.model, calib)
    print(f"statistics ({calib.shape[0]}x{calib.shape[1]} tokens): {time.perf_counter() - t0:.1f} s")
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
