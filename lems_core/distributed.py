"""Several GPUs or machines through torch.distributed (launched with torchrun).

A profile build splits its per-layer work across ranks: rank r decomposes and
measures the KL of every layer whose index i has i % world == r (round robin, so
each rank gets a mix of small attention and large MLP layers). Every rank runs the
same forward/backward calibration passes, so no Gram or factor crosses the network:
rank 0 gathers the spectra and KL values (``merge_at_main``) and writes the one
profile, equal to a single-process build to float tolerance.

Backend: NCCL when CUDA is present (each rank on ``cuda:LOCAL_RANK``), gloo on CPU.
Nothing here runs unless torchrun set WORLD_SIZE > 1 (or a process group exists).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from .model import LayerInfo


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank, world size, rank on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str:
        """The device this rank computes on: its node-local GPU, else the CPU."""
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"


def launched() -> bool:
    """True when torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def context() -> DistContext:
    """The current job's context; initialises the process group from torchrun's env on first use."""
    if not dist.is_available():
        return DistContext()
    if not dist.is_initialized():
        if not launched():
            return DistContext()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def owned_layers(layers: Sequence[LayerInfo], ctx: DistContext) -> set[str] | None:
    """Names of the layers this rank handles (None when there is one process: all of them)."""
    if ctx.world <= 1:
        return None
    return {l.name for i, l in enumerate(layers) if i % ctx.world == ctx.rank}


def merge_at_main(ctx: DistContext, spectra: dict[str, np.ndarray], sweep: dict[float, np.ndarray]):
    """Gather every rank's spectra and KL arrays at rank 0; there return the merged pair, elsewhere None.

    Each layer's KL values come from the one rank that measured it (the others hold
    NaN there); a layer measured twice or by nobody is an error.
    """
    parts = [None] * ctx.world if ctx.main else None
    dist.gather_object({"spectra": spectra, "sweep": sweep}, parts, dst=0)
    if not ctx.main:
        return None
    merged_spectra: dict[str, np.ndarray] = {}
    for part in parts:
        merged_spectra.update(part["spectra"])
    merged_sweep = {}
    for ratio in sweep:
        stack = np.stack([np.asarray(p["sweep"][ratio], dtype=float) for p in parts])
        counts = np.isfinite(stack).sum(0)
        if np.any(counts > 1):
            raise RuntimeError(f"KL at ratio {ratio} measured by several ranks")
        merged_sweep[ratio] = np.where(counts > 0, np.nansum(np.where(np.isfinite(stack), stack, 0.0), 0), np.nan)
    return merged_spectra, merged_sweep


def barrier(ctx: DistContext) -> None:
    if ctx.world > 1:
        dist.barrier()


def broadcast_object(ctx: DistContext, obj):
    """Rank 0's ``obj`` on every rank (e.g. the profile folder it wrote)."""
    if ctx.world <= 1:
        return obj
    box = [obj if ctx.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: Sequence, ctx: DistContext) -> list:
    """This rank's items, round robin (e.g. the plans of an evaluation batch)."""
    return list(items[ctx.rank :: ctx.world]) if ctx.world > 1 else list(items)


def gather_lists(ctx: DistContext, mine: list) -> list | None:
    """All ranks' lists concatenated at rank 0 (None elsewhere)."""
    if ctx.world <= 1:
        return list(mine)
    parts = [None] * ctx.world if ctx.main else None
    dist.gather_object(mine, parts, dst=0)
    return [x for p in parts for x in p] if ctx.main else None
