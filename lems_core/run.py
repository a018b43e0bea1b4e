"""The run context: the options every stage of a job shares, carried as one object.

A profile build, an evaluation or an export all need the same handful of things besides
their own inputs: where the cache lives, which device to use, how much memory the
statistics may hold, how factors are stored, whether the model is offloaded, how to
report progress and how to notice a cancel. `Run` holds them once, frozen, so a function
takes `run` instead of threading six keyword arguments through every call below it.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # only for the annotation: offload imports the model layer
    from .offload import OffloadSpec

Progress = Callable[[float, str], None]
FACTOR_DTYPES = ("fp32", "fp16")


class Cancelled(RuntimeError):
    """The user cancelled the job; raised at the next check."""


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise `Cancelled` once `cancel` is set (a no-op without an event)."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")


def map_progress(progress: Progress | None, lo: float, hi: float) -> Progress | None:
    """Map a sub-step's 0..1 progress into [lo, hi] of the caller's bar."""
    if progress is None:
        return None
    return lambda f, msg: progress(lo + (hi - lo) * min(max(f, 0.0), 1.0), msg)


@dataclass(frozen=True)
class Run:
    """Options shared by every stage of one job.

    cache_dir: the cache root (None: the default `cache/`); device: "cpu", "cuda", ...
    (None: CUDA when present); max_memory: bytes for statistics and decomposition on top of
    the model (None: the classic path when everything fits); factor_dtype: how streamed
    factors are stored on disk; offload: accelerate placement of a model larger than the
    device; progress: a callback (fraction 0..1, message); cancel: set it to stop the job.
    """

    cache_dir: Path | None = None
    device: str | None = None
    max_memory: int | None = None
    factor_dtype: str = "fp32"
    offload: OffloadSpec | None = None
    progress: Progress | None = None
    cancel: threading.Event | None = None

    def __post_init__(self):
        if self.factor_dtype not in FACTOR_DTYPES:
            raise ValueError(f"factor_dtype must be one of {FACTOR_DTYPES}, not {self.factor_dtype!r}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError(f"max_memory must be a positive number of bytes, not {self.max_memory}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))

    def report(self, fraction: float, message: str) -> None:
        """Tell the progress callback, if any, how far the job is."""
        if self.progress is not None:
            self.progress(fraction, message)

    def check_cancel(self) -> None:
        """Raise `Cancelled` if the user cancelled the job."""
        check_cancel(self.cancel)

    def stage(self, lo: float, hi: float) -> Run:
        """The same run, with its progress mapped into [lo, hi] of this run's bar."""
        return dataclasses.replace(self, progress=map_progress(self.progress, lo, hi))

    def but(self, **changes) -> Run:
        """A copy with some fields changed (e.g. `run.but(device="cpu")`)."""
        return dataclasses.replace(self, **changes)


DEFAULT_RUN = Run()
