"""Per-layer KL sweep: block-suffix runs vs naive full forwards (target <= 0.6x).

One layer per block (kinds rotating, 30 layers over the whole depth) is measured
both ways on the demo model with the same search windows; prints both times,
their ratio and the largest relative difference between the two KL values.

    python -m bench.sensitivity [--windows 2] [--seq-len 256]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lems_core.calibration import preset
from lems_core.decompositions import Decomposer
from lems_core.evaluation import model_logits
from lems_core.model import KINDS, compressible_layers
from lems_core.pipeline import calibration_windows, get_model
from lems_core.sensitivity import SweepOptions, layer_kl_sweep, naive_layer_kl

TARGET = 0.6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = get_model("demo", "cpu")
    _, search = calibration_windows(loaded, preset("cpu", seq_len=args.seq_len, n_search=args.windows))
    layers = [l for l in compressible_layers(loaded.model) if l.kind == KINDS[l.block % len(KINDS)]]
    svd = Decomposer("svd")
    factors = {l.name: svd(l, loaded.model.get_submodule(l.name).weight) for l in layers}

    t0 = time.perf_counter()
    swept = layer_kl_sweep(loaded.model, layers, lambda l: factors[l.name], search, [0.1],
                           SweepOptions(batch_size=args.windows))
    sweep, ref = swept.kl, swept.reference
    suffix_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model_logits(loaded.model, search, batch_size=args.windows)  # the naive sweep needs its dense reference too
    naive = np.array([naive_layer_kl(loaded.model, l, factors[l.name], search, 0.1, ref, batch_size=args.windows) for l in layers])
    naive_s = time.perf_counter() - t0
    rel = np.max(np.abs(sweep[0.1] - naive) / np.maximum(naive, 1e-12))
    print(f"{len(layers)} layers, {args.windows} x {args.seq_len} search tokens")
    print(f"block-suffix sweep: {suffix_s:7.1f} s (includes one dense reference pass)")
    print(f"naive full forward: {naive_s:7.1f} s (includes one dense reference pass)")
    print(f"ratio suffix/naive: {suffix_s / naive_s:.2f}x  (target <= {TARGET}x)")
    print(f"max relative KL difference: {rel:.2e}")


if __name__ == "__main__":
    main()
