"""Several GPUs or machines through torch.distributed (launched with torchrun).

A profile build splits its per-layer work across ranks: rank r decomposes and
measures the KL of every layer whose index i has i % world == r (round robin, so
each rank gets a mix of small attention and large MLP layers). Every rank runs the
same forward/backward calibration passes, so no Gram or factor crosses the network:
rank 0 gathers the spectra and KL values (``merge_at_main``) and writes the one
profile, equal to a single-process build to float tolerance.

The bias fit is the one step that needs every layer's factors in one process: after
the merge, ``gather_factors_at_main`` sends each rank's factors to rank 0 once,
point-to-point and layer by layer, and rank 0 writes them to one complete factor
folder (the single-process build's, which a later evaluation then reuses).

Backend: NCCL when CUDA is present (each rank on ``cuda:LOCAL_RANK``), gloo on CPU.

Timeouts: a collective where every rank arrives after a similar share of work (the
merge, the factor gather, the start-up broadcast) gives up after ``LEMS_DIST_TIMEOUT_S``
seconds (default 30 min; ``context(timeout=...)``), so a rank that died, hangs or was
stopped is reported within that time, naming the ranks this one waited for, instead
of keeping the others waiting for hours. The two waits that are uneven by design,
the other ranks' wait while rank 0 alone runs the bias fit and writes the profile and
the gather of plan evaluations, go through a second (gloo, CPU) group with the patient
timeout ``LEMS_DIST_SOLO_TIMEOUT_S`` (default 6 h). A failed or timed-out collective is
a :class:`DistributedError`.
Nothing here runs unless torchrun set WORLD_SIZE > 1 (or a process group exists).
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .decompositions.base import Factorization
from .factor_store import FactorShards, finish, is_complete, write_block
from .model import LayerInfo

DEFAULT_TIMEOUT_S = 30 * 60  # a collective: the ranks' shares of a step differ by minutes at most
DEFAULT_SOLO_TIMEOUT_S = 6 * 3600  # rank 0 alone: the bias fit of a large model, one plan's evaluation
TIMEOUT_ENV, SOLO_TIMEOUT_ENV = "LEMS_DIST_TIMEOUT_S", "LEMS_DIST_SOLO_TIMEOUT_S"
MAX_TIMEOUT_S = 7 * 24 * 3600


class DistributedError(RuntimeError):
    """A collective failed or timed out; the message names this rank, the ranks it waited for and what to check."""


@dataclass(frozen=True)
class _Waits:
    """The timeouts this process's groups were created with, and the patient group (None: the default group)."""

    timeout: timedelta
    solo_timeout: timedelta
    patient_group: object = None


_WAITS: _Waits | None = None


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


def context(timeout: float | timedelta | None = None) -> DistContext:
    """The current job's context; initialises the process group from torchrun's env on first use.

    ``timeout`` (seconds or a timedelta; default ``LEMS_DIST_TIMEOUT_S``) bounds every
    collective of the group created here; it only matters on the first call.
    """
    global _WAITS
    if not dist.is_available():
        return DistContext()
    if not dist.is_initialized():
        if not launched():
            return DistContext()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")  # a timeout raises here instead of aborting
        limit = process_group_timeout() if timeout is None else _as_timedelta(timeout, "timeout")
        dist.init_process_group(backend, timeout=limit)
        solo = solo_timeout()
        _WAITS = _Waits(limit, solo, dist.new_group(backend="gloo", timeout=solo))
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def process_group_timeout() -> timedelta:
    """How long a rank waits in a collective: ``LEMS_DIST_TIMEOUT_S`` seconds, default DEFAULT_TIMEOUT_S."""
    return _env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def solo_timeout() -> timedelta:
    """How long the other ranks wait while rank 0 works alone: ``LEMS_DIST_SOLO_TIMEOUT_S``, default 6 h."""
    return _env_seconds(SOLO_TIMEOUT_ENV, DEFAULT_SOLO_TIMEOUT_S)


def _env_seconds(name: str, default: float) -> timedelta:
    text = os.environ.get(name, "").strip()
    if not text:
        return timedelta(seconds=default)
    try:
        seconds = float(text[:32])
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {text[:32]!r}") from None
    return _as_timedelta(seconds, name)


def _as_timedelta(value: float | timedelta, name: str) -> timedelta:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT_S):
        raise ValueError(f"{name} must be a number of seconds in (0, {MAX_TIMEOUT_S}] (7 days), got {value!r}")
    return timedelta(seconds=seconds)


@contextmanager
def _collective(ctx: DistContext, what: str, waits_for: str, solo: bool = False):
    """Turn a failed or timed-out collective into a DistributedError that says who waited for whom."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError, DistNetworkError and gloo's timeouts are RuntimeErrors
        env = SOLO_TIMEOUT_ENV if solo else TIMEOUT_ENV
        limit = None if _WAITS is None else (_WAITS.solo_timeout if solo else _WAITS.timeout)
        after = f"after at most {limit.total_seconds():g} s" if limit else "within the process group's timeout"
        raise DistributedError(
            f"rank {ctx.rank} of {ctx.world}: {what} failed or timed out ({after}, {env}) waiting for {waits_for}. "
            f"Check in torchrun's output whether {waits_for} died (an exception, out of memory, killed) or hangs or "
            f"was stopped, that every rank reaches MASTER_ADDR:MASTER_PORT and the others (NCCL_SOCKET_IFNAME / "
            f"GLOO_SOCKET_IFNAME on several machines), or raise {env} for a slower machine. Cause: {exc}"
        ) from exc


def _others(ctx: DistContext) -> str:
    """The ranks rank 0 waits for in a gather, or rank 0 itself from any other rank."""
    if not ctx.main:
        return "rank 0"
    return "rank 1" if ctx.world == 2 else f"ranks 1-{ctx.world - 1}"


def _patient_group():
    return None if _WAITS is None else _WAITS.patient_group


def owned_layers(layers: Sequence[LayerInfo], ctx: DistContext) -> set[str] | None:
    """Names of the layers this rank handles (None when there is one process: all of them)."""
    if ctx.world <= 1:
        return None
    return {l.name for i, l in enumerate(layers) if i % ctx.world == ctx.rank}


def merge_at_main(ctx: DistContext, spectra: dict[str, np.ndarray], sweep: dict[float, np.ndarray]):
    """Gather every rank's spectra and per-layer arrays at rank 0; there return the merged pair, elsewhere None.

    ``sweep`` maps any key (a ratio's KL, or ``("nll", ratio)`` for the single-layer NLL
    the profile keeps) to an array over all layers. Each layer's value comes from the one
    rank that measured it (the others hold NaN there); a layer measured twice is an error.
    """
    parts = [None] * ctx.world if ctx.main else None
    with _collective(ctx, "the merge of spectra and KL values at rank 0", _others(ctx)):
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
            raise RuntimeError(f"sweep entry {ratio} measured by several ranks")
        merged_sweep[ratio] = np.where(counts > 0, np.nansum(np.where(np.isfinite(stack), stack, 0.0), 0), np.nan)
    return merged_spectra, merged_sweep


def barrier(ctx: DistContext) -> None:
    """Wait for rank 0's work alone (the bias fit, writing the profile): the patient timeout applies."""
    if ctx.world > 1:
        with _collective(ctx, "the wait for rank 0's bias fit and profile", _others(ctx), solo=True):
            dist.barrier(group=_patient_group())


def broadcast_object(ctx: DistContext, obj):
    """Rank 0's ``obj`` on every rank (e.g. the profile folder it wrote)."""
    if ctx.world <= 1:
        return obj
    box = [obj if ctx.main else None]
    with _collective(ctx, "a broadcast from rank 0", "every other rank" if ctx.main else "rank 0"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: Sequence, ctx: DistContext) -> list:
    """This rank's items, round robin (e.g. the plans of an evaluation batch)."""
    return list(items[ctx.rank :: ctx.world]) if ctx.world > 1 else list(items)


def gather_lists(ctx: DistContext, mine: list) -> list | None:
    """All ranks' lists concatenated at rank 0 (None elsewhere).

    The ranks' shares (e.g. plan evaluations) may differ by a whole item, so the patient
    timeout applies.
    """
    if ctx.world <= 1:
        return list(mine)
    parts = [None] * ctx.world if ctx.main else None
    with _collective(ctx, "the gather of every rank's results at rank 0", _others(ctx), solo=True):
        dist.gather_object(mine, parts, dst=0, group=_patient_group())
    return [x for p in parts for x in p] if ctx.main else None


# ------------------------------------------------------------------ every layer's factors at rank 0
def _comm_device(ctx: DistContext) -> torch.device:
    """Where point-to-point tensors must live: the rank's GPU under NCCL, the CPU under gloo."""
    return torch.device(ctx.device) if dist.get_backend() == "nccl" else torch.device("cpu")


def _send_factors(factors: Factorization, comm: torch.device) -> None:
    """Shape, left and right of one layer to rank 0 (``_receive_factors`` there)."""
    left, right = factors.left.detach(), factors.right.detach()
    dist.send(torch.tensor([*left.shape, *right.shape], dtype=torch.int64, device=comm), dst=0)
    dist.send(left.to(comm, torch.float32).contiguous(), dst=0)
    dist.send(right.to(comm, torch.float32).contiguous(), dst=0)


def _receive_factors(source: int, comm: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = torch.empty(4, dtype=torch.int64, device=comm)
    dist.recv(shape, src=source)
    m, k, k2, n = (int(x) for x in shape.tolist())
    left, right = torch.empty(m, k, device=comm), torch.empty(k2, n, device=comm)
    dist.recv(left, src=source)
    dist.recv(right, src=source)
    return left.cpu(), right.cpu()


def gather_factors_at_main(ctx: DistContext, layers: Sequence[LayerInfo], factors: Mapping[str, Factorization],
                           spectra: Mapping[str, "np.ndarray"] | None, folder: Path, factor_dtype: str = "fp32",
                           device: str | torch.device = "cpu") -> FactorShards | None:
    """Every layer's factors in one complete ``folder`` at rank 0 (a ``FactorShards``); None on the other ranks.

    ``factors`` hold this rank's own layers (``owned_layers``), ``spectra`` rank 0's
    merged spectra. Layer by layer in order, the owner sends shape, left and right to
    rank 0 (point-to-point; ranks may be on other nodes, with their own disks), and
    rank 0 writes each block's file as soon as its last layer is in, so it holds one
    block's factors at a time. A folder already complete and intact at rank 0 is
    reused: nothing is sent.
    """
    ready = broadcast_object(ctx, bool(ctx.main and is_complete(folder) and FactorShards(folder).verify()))
    if not ready:
        comm = _comm_device(ctx)
        pending: dict[str, Factorization] = {}
        for i, layer in enumerate(layers):
            owner = i % ctx.world
            if ctx.main:
                with _collective(ctx, f"receiving the factors of {layer.name}", f"rank {owner}"):
                    left, right = ((factors[layer.name].left.cpu(), factors[layer.name].right.cpu()) if owner == 0
                                   else _receive_factors(owner, comm))
                pending[layer.name] = Factorization(np.asarray(spectra[layer.name]), left, right)
                if i + 1 == len(layers) or layers[i + 1].block != layer.block:
                    write_block(folder, layer.block, pending, factor_dtype)
                    pending = {}
            elif ctx.rank == owner:
                with _collective(ctx, f"sending the factors of {layer.name}", "rank 0"):
                    _send_factors(factors[layer.name], comm)
        if ctx.main:
            finish(folder, {l.name: l.block for l in layers}, factor_dtype, {"gathered_from_ranks": ctx.world})
    return FactorShards(folder, device) if ctx.main else None
