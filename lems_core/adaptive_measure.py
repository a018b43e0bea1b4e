"""Single-layer KL at arbitrary (layer, rank) pairs: the measurement behind ``lems_adaptive``.

The same suffix measurement as ``sensitivity.layer_kl_sweep`` (dense block inputs kept,
only blocks b..B-1 and the head rerun per layer), but each layer at its own ranks
rather than every layer at every ratio; and, optionally, the KL floor: the dense model
against its own bf16-cached reference logits (one head-only run), which no
single-layer KL can go below (``lems_mp`` module docstring).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .blocks import advance, capture_block_inputs
from .compression import LowRankLinear, set_module
from .decompositions import Factorization, check_finite_factors
from .model import LayerInfo, decoder_blocks
from .pipeline.artefacts import profile_model
from .profile import Profile
from .run import DEFAULT_RUN, Run
from .sensitivity import dense_reference, kl_suffix


def layer_kl_at_ranks(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    factorization_of: Callable[[LayerInfo], Factorization],
    windows: torch.Tensor,
    requests: Sequence[tuple[str, int]],
    batch_size: int = 4,
    with_floor: bool = False,
) -> tuple[list[float], float | None]:
    """(KL with only that layer at that rank, for each request; the KL floor or None)."""
    by_name = {l.name: l for l in layers}
    unknown = [n for n, _ in requests if n not in by_name]
    if unknown:
        raise KeyError(f"unknown layer(s) {unknown[:3]}")
    blocks = decoder_blocks(model)
    items = capture_block_inputs(model, windows, batch_size)
    ref = dense_reference(model, items, windows, batch_size)
    out = [float("nan")] * len(requests)
    last = max([by_name[n].block for n, _ in requests] + ([len(blocks) - 1] if with_floor else [0]))
    for b in range(last + 1):
        for k, (name, rank) in enumerate(requests):
            layer = by_name[name]
            if layer.block != b:
                continue
            original = model.get_submodule(name)
            factors = factorization_of(layer)
            left, right = factors.factors(min(int(rank), factors.max_rank))
            check_finite_factors(name, left, right, f"single-layer KL at rank {rank}")
            set_module(model, name, LowRankLinear.from_factors(left, right, original.bias, original))
            try:
                out[k] = kl_suffix(model, b, items, ref)
            finally:
                set_module(model, name, original)
        if b < last:
            items = advance(blocks[b], items)
    floor = kl_suffix(model, len(blocks) - 1, items, ref) if with_floor else None
    return out, floor


def model_measure(profile: Profile, batch_size: int = 4, *, run: Run = DEFAULT_RUN):
    """A ``lems_adaptive.MeasureFn`` on the profile's own model, search windows and factors,
    and the measured KL floor. Returns (measure, floor, counter) where counter["runs"]
    counts single-layer suffix runs made."""
    loaded, search_ids, factors = profile_model(profile, run=run)
    counter = {"runs": 0, "calls": 0}
    _, floor = layer_kl_at_ranks(loaded.model, profile.layers, lambda l: factors[l.name], search_ids, [],
                                 batch_size, with_floor=True)

    def measure(requests):
        values, _ = layer_kl_at_ranks(loaded.model, profile.layers, lambda l: factors[l.name], search_ids,
                                      list(requests), batch_size)
        counter["runs"] += len(requests)
        counter["calls"] += 1
        return np.asarray(values)

    return measure, float(floor), counter
