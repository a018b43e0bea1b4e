"""Background jobs for the app: a small thread-based registry, no streamlit import.

A job runs ``fn(*args, progress=..., cancel=..., **kwargs)`` in a daemon thread:

- ``progress(fraction, message)`` records how far it is (fraction clipped to [0, 1])
  and raises :class:`JobCancelled` once a cancel was asked for, so any function that
  reports progress also stops promptly; the snapshot's ``seconds_left`` extrapolates
  the time per fraction into an estimate, and ``status_line`` shows it;
- ``cancel`` is a ``threading.Event`` the function may poll between steps.

The page that started a job polls :meth:`Job.snapshot` (e.g. from a
``st.fragment(run_every=1)``); exceptions are captured with their traceback and
shown, never lost. The registry is meant to be held by ``st.cache_resource`` so it
survives reruns; it is thread-safe. It runs at most ``max_active`` jobs at a time
(queued or running, a cancelled one until it has stopped): one more is a
:class:`JobLimitError`, so a client cannot pile up threads that each load a model.
"""
from __future__ import annotations

import itertools
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


class JobCancelled(Exception):
    """Raised inside a job by its progress callback once cancel was requested."""


class JobLimitError(RuntimeError):
    """Raised by :meth:`JobRegistry.submit` while ``max_active`` jobs have not finished yet."""


MAX_ACTIVE_JOBS = 4  # one build, one ARS training, one evaluation, and one to spare


@dataclass(frozen=True)
class JobState:
    """An immutable snapshot of a job, safe to read from the script thread."""

    id: str
    name: str
    status: str
    fraction: float
    message: str
    started: float
    finished: float | None
    result: Any = None
    error: str | None = None
    traceback: str | None = None
    meta: dict = field(default_factory=dict)
    reported: float | None = None  # when the fraction last moved (time.time())

    @property
    def done(self) -> bool:
        return self.status in FINISHED

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started

    @property
    def seconds_left(self) -> float | None:
        """Estimated seconds to go: the time the reported fraction took, extrapolated linearly.

        None while there is too little to go on (under ``ETA_MIN_FRACTION`` done or under
        ``ETA_MIN_SECONDS`` spent) and once the job ended. Jobs weight their progress steps
        by their expected share of the time (``pipeline.EVAL_WEIGHTS``), which is what makes
        the line straight.
        """
        if self.done or self.reported is None or self.fraction < ETA_MIN_FRACTION:
            return None
        spent = self.reported - self.started
        if spent < ETA_MIN_SECONDS:
            return None
        return max(0.0, spent * (1.0 - self.fraction) / self.fraction - (time.time() - self.reported))

    @property
    def status_line(self) -> str:
        """"<message> (<elapsed> s, about <left> left)": what a progress bar shows.

        Until the reported progress allows an extrapolation (the first minute of a model
        load), an estimate made before the start, ``meta["estimate_s"]``, is shown instead.
        """
        left = self.seconds_left
        if left is not None:
            estimate = f", about {format_seconds(left)} left"
        elif isinstance(self.meta.get("estimate_s"), (int, float)) and not self.done:
            estimate = f", estimated {format_seconds(self.meta['estimate_s'])} in all"
        else:
            estimate = ""
        return f"{self.message} ({self.elapsed:.0f} s{estimate})"


ETA_MIN_FRACTION, ETA_MIN_SECONDS = 0.02, 3.0


def format_seconds(seconds: float) -> str:
    """"45 s", "3 min", "1 h 05 min": a time estimate at the precision it deserves."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{5 * round(seconds / 5):.0f} s" if seconds >= 10 else f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Job:
    """One background call with progress, cancel and captured outcome."""

    def __init__(self, job_id: str, name: str, fn: Callable, args: tuple, kwargs: dict, meta: dict | None = None):
        self.id, self.name, self.meta = job_id, name, dict(meta or {})
        self.cancel_event = threading.Event()
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self._lock = threading.Lock()
        self._status, self._fraction, self._message = QUEUED, 0.0, "queued"
        self._result = self._error = self._traceback = None
        self._started, self._finished, self._reported = time.time(), None, None
        self._thread = threading.Thread(target=self._run, name=f"job-{job_id}", daemon=True)

    def start(self) -> "Job":
        self._thread.start()
        return self

    def report(self, fraction: float, message: str = "") -> None:
        """Progress callback handed to the job function; raises JobCancelled after cancel()."""
        with self._lock:
            fraction = min(1.0, max(0.0, float(fraction)))
            if fraction != self._fraction:
                self._reported = time.time()
            self._fraction = fraction
            if message:
                self._message = str(message)
        if self.cancel_event.is_set():
            raise JobCancelled("cancelled")

    def cancel(self) -> None:
        """Ask the job to stop; it stops at its next progress report or cancel check."""
        self.cancel_event.set()
        with self._lock:
            if self._status in (QUEUED, RUNNING):
                self._message = "cancelling…"

    def wait(self, timeout: float | None = None) -> JobState:
        self._thread.join(timeout)
        return self.snapshot()

    def snapshot(self) -> JobState:
        with self._lock:
            return JobState(
                self.id, self.name, self._status, self._fraction, self._message, self._started,
                self._finished, self._result, self._error, self._traceback, dict(self.meta), self._reported,
            )

    def _run(self) -> None:
        with self._lock:
            self._status, self._message = RUNNING, "started"
        try:
            result = self._fn(*self._args, progress=self.report, cancel=self.cancel_event, **self._kwargs)
        except BaseException as exc:  # noqa: BLE001 - everything is reported to the page
            self._finish(CANCELLED if self.cancel_event.is_set() else FAILED, error=exc)
        else:
            self._finish(CANCELLED if self.cancel_event.is_set() else DONE, result=result)

    def _finish(self, status: str, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            self._status, self._result, self._finished = status, result, time.time()
            if status == DONE:
                self._fraction, self._message = 1.0, "done"
            elif status == CANCELLED:
                self._message = "cancelled"
            if error is not None and status == FAILED:
                self._error = f"{type(error).__name__}: {error}"
                self._traceback = "".join(traceback.format_exception(error))
                self._message = self._error


def for_each(fn: Callable, items: list, progress: Callable[[float, str], None], cancel: threading.Event) -> list:
    """Run ``fn(item, progress=, cancel=)`` for every item in turn, as one job.

    Each item gets an equal slice of the progress bar and its messages are prefixed
    with "k/n"; the list of results is returned. Submit it as
    ``registry.submit(name, for_each, fn, items)``.
    """
    results, n = [], max(1, len(items))
    for k, item in enumerate(items):
        if cancel.is_set():
            raise JobCancelled("cancelled")

        def step(fraction: float, message: str = "", k: int = k) -> None:
            progress((k + min(1.0, max(0.0, fraction))) / n, f"{k + 1}/{n}: {message}")

        results.append(fn(item, progress=step, cancel=cancel))
    return results


class JobRegistry:
    """Starts jobs, at most ``max_active`` unfinished at a time, and keeps them (newest first) until cleared."""

    def __init__(self, keep: int = 50, max_active: int = MAX_ACTIVE_JOBS):
        if max_active < 1:
            raise ValueError(f"max_active must be at least 1, got {max_active}")
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._keep, self._max_active = keep, max_active

    def submit(self, name: str, fn: Callable, *args, meta: dict | None = None, **kwargs) -> Job:
        """Start ``fn(*args, progress=, cancel=, **kwargs)`` in a thread and return its Job.

        Raises :class:`JobLimitError` (and starts nothing) while ``max_active`` jobs are unfinished.
        """
        with self._lock:
            self._check_room()
            job = Job(f"{next(self._ids)}", name, fn, args, kwargs, meta)
            self._jobs[job.id] = job
            self._forget_old()
        return job.start()

    def get(self, job_id: str | None) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id) if job_id else None

    def jobs(self, kind: str | None = None) -> list[Job]:
        """All kept jobs, newest first; ``kind`` filters on ``meta["kind"]``."""
        with self._lock:
            found = list(self._jobs.values())[::-1]
        return [j for j in found if kind is None or j.meta.get("kind") == kind]

    def active(self, kind: str | None = None) -> list[Job]:
        return [j for j in self.jobs(kind) if not j.snapshot().done]

    def clear_finished(self) -> int:
        """Drop finished jobs; returns how many were dropped."""
        with self._lock:
            gone = [k for k, j in self._jobs.items() if j.snapshot().done]
            for k in gone:
                del self._jobs[k]
        return len(gone)

    def _check_room(self) -> None:
        unfinished = sum(not j.snapshot().done for j in self._jobs.values())
        if unfinished >= self._max_active:
            raise JobLimitError(f"{unfinished} jobs are already queued or running, the most this server runs at once: "
                                "wait for one to finish, or cancel one")

    def _forget_old(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.snapshot().done]
        for k in finished[: max(0, len(self._jobs) - self._keep)]:
            del self._jobs[k]
