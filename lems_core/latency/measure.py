"""Measuring a device profile, and the cache that measures it only once.

For every distinct layer shape (shapes shared by many layers are measured once), the
dense Linear and the low-rank pair are timed on a grid of ranks (multiples of the rank
step, ``rank_grid``). All configurations of one shape are timed round-robin (one sample
of each in turn, ``median_times``), so a load change on a shared machine shifts them
alike; the statistic is the median over repeats after warm-up, each sample averaging
enough calls to last about a millisecond, with ``torch.cuda.synchronize`` around
samples on CUDA. The medians are then fitted monotone in rank (``isotonic``).

A low-rank pair is timed as a Hugging Face export runs it after loading
(``fused.prepare_modules``: the second factor stored column-major, both factors called
directly), because that is the model a latency budget is for; the plain two-module pair
reads its second factor in short rows and is far slower on a one-token step.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..cache import default_cache_dir, key_of
from ..compression import LowRankLinear
from ..fused import prepare_modules
from .device_profile import DeviceProfile, DeviceProfileError, ProfileKey, Shape, ShapeTimes, Workload

log = logging.getLogger(__name__)

Thunk = Callable[[], object]
Timer = Callable[[Sequence[Thunk]], list[float]]  # thunks -> median seconds per call of each
GRID_POINTS = 12  # grid ranks per shape: enough for a smooth curve, few enough to measure in a minute
SAMPLE_SECONDS = 1e-3  # each timed sample repeats its call until it lasts about this long
MAX_COPIES = 512  # weight copies a configuration cycles through (see ``measure_device_profile``)
PAIR_PATH = "export"  # how a low-rank pair runs when timed (part of a cached profile's key): see the module docstring


def device_name(device: str) -> str:
    """The CPU model name (/proc/cpuinfo) or the CUDA device name: what times depend on."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown cpu"


def current_key(workload: Workload, device: str = "cpu", dtype: str = "float32") -> ProfileKey:
    """The key of a profile measured here, now: this device, dtype, torch build and thread count."""
    _torch_dtype(dtype)
    return ProfileKey(device_name(device), torch.device(device).type, dtype, torch.__version__,
                      torch.get_num_threads(), workload)


def rank_grid(out_features: int, in_features: int, rank_step: int = 8, points: int = GRID_POINTS) -> list[int]:
    """Ranks to time for one shape: ``rank_step``, then about ``points`` multiples of the step up to
    the first multiple at or above the break-even rank (capped at min(m, n))."""
    if rank_step < 1 or points < 1:
        raise ValueError(f"rank_step and points must be >= 1, got {rank_step} and {points}")
    limit = min(out_features, in_features)
    eq = (out_features * in_features) // (out_features + in_features)
    step = min(rank_step, limit)
    top = min(limit, max(step, math.ceil(eq / step) * step))
    spacing = step * max(1, math.ceil(top / (step * points)))
    return sorted({step, top, *range(spacing, top + 1, spacing)})


def isotonic(values: Sequence[float]) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return np.concatenate([np.full(int(c), s / c) for s, c in blocks])


def median_times(thunks: Sequence[Thunk], repeats: int = 15, warmup: int = 3,
                 sync: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Median seconds per call of each thunk: warm-up, then ``repeats`` round-robin samples.

    Each sample times ``calls`` back-to-back calls (set once per thunk so a sample lasts
    about SAMPLE_SECONDS) between two ``sync()`` calls and divides by ``calls``.
    """
    for thunk in thunks:
        for _ in range(warmup):
            thunk()
    calls = [_calls_per_sample(t, sync, clock) for t in thunks]
    samples = [[] for _ in thunks]
    for _ in range(repeats):
        for i, thunk in enumerate(thunks):
            sync()
            start = clock()
            for _ in range(calls[i]):
                thunk()
            sync()
            samples[i].append((clock() - start) / calls[i])
    return [float(np.median(s)) for s in samples]


def _calls_per_sample(thunk: Thunk, sync: Callable[[], None], clock: Callable[[], float]) -> int:
    sync()
    start = clock()
    thunk()
    sync()
    once = max(clock() - start, 1e-7)
    return max(1, min(1000, round(SAMPLE_SECONDS / once)))


@dataclass(frozen=True)
class MeasureSettings:
    """How a device profile is measured: the rank grid, the repeats and the clock.

    ``clock``: "wall" (elapsed time, what a user waits) or "cpu" (the process's CPU time: on
    a shared, oversubscribed CPU it leaves out the time other jobs hold the core; one thread
    only). ``cold_bytes``: weight copies each configuration cycles through (default twice the
    last-level cache), so every call reads its weights from memory, as a forward over a model
    larger than the cache does.
    """

    rank_step: int = 8
    points: int = GRID_POINTS
    repeats: int = 15
    warmup: int = 3
    clock: str = "wall"
    cold_bytes: int | None = None


def measure_device_profile(shapes: Iterable[Shape], workload: Workload, device: str = "cpu", dtype: str = "float32",
                           timer: Timer | None = None, settings: MeasureSettings | None = None,
                           **options) -> DeviceProfile:
    """Time every distinct shape once (dense and the low-rank grid) and return the profile.

    ``settings`` (or its fields as keywords, ``repeats=2``) say how; see ``MeasureSettings``.

    ``timer`` (default ``median_times`` with the settings' clock) takes thunks and returns
    median seconds per call.
    """
    settings = settings or MeasureSettings(**options)
    rank_step, points, repeats, warmup = settings.rank_step, settings.points, settings.repeats, settings.warmup
    clock, cold_bytes = settings.clock, settings.cold_bytes
    distinct = sorted({(int(m), int(n)) for m, n in shapes})
    if not distinct:
        raise ValueError("no layer shapes to measure")
    injected = timer is not None
    if timer is None:
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        timer = partial(median_times, repeats=repeats, warmup=warmup, sync=sync, clock=clock_of(clock, device))
    cold_bytes = last_level_cache_bytes(device) * 2 if cold_bytes is None else int(cold_bytes)
    measured = {}
    with torch.inference_mode():
        for shape in distinct:
            measured[shape] = _measure_shape(shape, workload, device, _torch_dtype(dtype), rank_grid(*shape, rank_step, points),
                                             timer, cold_bytes)
    settings = {"repeats": repeats, "warmup": warmup, "statistic": "median", "rank_step": rank_step,
                "grid_points": points, "fit": "isotonic in rank", "clock": clock, "cold_bytes": cold_bytes,
                "timer": "injected" if injected else "median_times", "pair": PAIR_PATH}
    return DeviceProfile(current_key(workload, device, dtype), measured, settings)


def clock_of(name: str, device: str) -> Callable[[], float]:
    """The clock called ``name``: "wall" (perf_counter) or "cpu" (process CPU time; CPU and one thread only)."""
    if name == "wall":
        return time.perf_counter
    if name != "cpu":
        raise DeviceProfileError(f"clock must be 'wall' or 'cpu', got {name!r}")
    if torch.device(device).type != "cpu" or torch.get_num_threads() != 1:
        raise DeviceProfileError("the cpu clock measures one thread on the CPU only: use clock='wall', or "
                                 "torch.set_num_threads(1) on a CPU device")
    return time.process_time


def last_level_cache_bytes(device: str) -> int:
    """The device's last-level cache (CPU L3 from sysfs, CUDA L2), 32 MiB when unknown."""
    if torch.device(device).type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 0) or 32 << 20)
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip().upper()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


def _measure_shape(shape: Shape, workload: Workload, device: str, dtype: torch.dtype, ranks: list[int],
                   timer: Timer, cold_bytes: int) -> ShapeTimes:
    out_f, in_f = shape
    x = torch.randn(workload.batch, workload.tokens, in_f, device=device, dtype=dtype)
    item = torch.finfo(dtype).bits // 8

    def copies(params: int) -> int:
        return max(1, min(MAX_COPIES, math.ceil(cold_bytes / (params * item))))

    dense = _linear_pool(in_f, out_f, copies(out_f * in_f), device, dtype)
    thunks = [_cycling([lambda lin=lin: lin(x) for lin in dense])]
    for r in ranks:
        n = copies(r * (out_f + in_f))
        pairs = [_deployed_pair(a, b) for a, b in zip(_linear_pool(in_f, r, n, device, dtype),
                                                      _linear_pool(r, out_f, n, device, dtype))]
        thunks.append(_cycling([lambda pair=pair: pair(x) for pair in pairs]))
    seconds = timer(thunks)
    if len(seconds) != len(thunks):
        raise ValueError(f"the timer returned {len(seconds)} times for {len(thunks)} thunks")
    measured = tuple(float(s) for s in seconds[1:])
    return ShapeTimes(out_f, in_f, float(seconds[0]), tuple(ranks), tuple(float(t) for t in isotonic(measured)),
                      measured)


def _linear_pool(in_f: int, out_f: int, copies: int, device: str, dtype: torch.dtype) -> list[nn.Linear]:
    """``copies`` bias-free Linears whose weights lie back to back in one buffer (every page written)."""
    weights = torch.full((copies, out_f, in_f), 0.01, device=device, dtype=dtype)
    pool = []
    for w in weights:
        linear = nn.Linear(in_f, out_f, bias=False, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        pool.append(linear)
    return pool


def _deployed_pair(a: nn.Linear, b: nn.Linear) -> LowRankLinear:
    """``a`` then ``b`` as the low-rank module an export runs: second factor column-major, factors called directly."""
    pair = LowRankLinear(a.in_features, b.out_features, a.out_features, False, device="meta")
    pair.a, pair.b = a, b
    prepare_modules(pair, [pair])
    return pair


def _cycling(calls: list[Thunk]) -> Thunk:
    """One thunk that runs the next of ``calls`` each time (a different copy of the weights)."""
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DeviceProfileError(f"dtype must be a torch floating-point dtype name such as float32, got {name!r}")
    return dtype


def cache_path(key: ProfileKey, shapes: Iterable[Shape], rank_step: int, points: int, clock: str = "wall",
               cache_dir: Path | None = None) -> Path:
    """Where the profile of ``key`` over these shapes, this grid and this clock is cached."""
    digest = key_of(key.to_dict(), sorted({tuple(s) for s in shapes}), rank_step, points, clock, PAIR_PATH)
    return (cache_dir or default_cache_dir()) / "latency" / f"{key.workload.kind}-{digest}.json"


def device_profile_for(shapes: Iterable[Shape], workload: Workload, device: str = "cpu", dtype: str = "float32",
                       cache_dir: Path | None = None, timer: Timer | None = None, refresh: bool = False,
                       settings: MeasureSettings | None = None, **options) -> DeviceProfile:
    """The device profile for ``shapes`` here: read from the cache, else measured and cached.

    ``settings`` (or its fields as keywords) say how it is measured; see ``MeasureSettings``.

    A cached file that no longer validates (or matches) is measured again, with a warning.
    """
    shapes = sorted({(int(m), int(n)) for m, n in shapes})
    settings = settings or MeasureSettings(**options)
    key = current_key(workload, device, dtype)
    path = cache_path(key, shapes, settings.rank_step, settings.points, settings.clock, cache_dir)
    if path.is_file() and not refresh:
        try:
            found = DeviceProfile.load(path)
            found.check_key(key)
            found.check_covers(shapes)
            return found
        except DeviceProfileError as exc:
            log.warning("cached device profile %s is unusable (%s); measuring again", path, exc)
    found = measure_device_profile(shapes, workload, device, dtype, timer, settings)
    found.save(path)
    return found
