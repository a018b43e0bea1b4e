"""The models this process has loaded, and the lock every job holds while it runs one.

Loading is slow (the demo takes ~30 s on a CPU), so one model is kept per process
(``get_model``). Compression (``compressed``), ARS training and the profile's KL sweep
swap the shared model's Linears in place, so every job that runs a model holds that
model's lock for as long as it uses it (``hold_model``). The other pipeline modules call the
loader as ``models.get_model``, so it is swapped in one place (tests put a tiny model there).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator

import torch

from ..model import LoadedModel, check_device, default_device, load_model
from ..offload import OffloadSpec, load_with
from ..run import DEFAULT_RUN, Run

LOADED_MODELS: dict[tuple, LoadedModel] = {}  # (source, device, offload) -> the one model kept
LOCK_POLL_SECONDS = 0.2

_LOADING = threading.Lock()
_LOCKS_GUARD = threading.Lock()
_MODEL_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()


def get_model(source: str, device: str | None = None, offload: OffloadSpec | None = None) -> LoadedModel:
    """The model ``source`` on ``device``, loaded once per process; loading another drops the one kept.

    ``offload`` loads it with accelerate, partly in CPU RAM / on disk (``offload.py``).
    """
    key = (source, check_device(device or default_device()), offload)
    with _LOADING:
        if key not in LOADED_MODELS:
            LOADED_MODELS.clear()
            LOADED_MODELS[key] = load_with(offload, source, key[1]) if offload else load_model(source, device=key[1])
        return LOADED_MODELS[key]


def model_lock(loaded: LoadedModel) -> threading.RLock:
    """The lock of ``loaded``'s model (one per model object, created on first use).

    Re-entrant: a job that allocates on the model and then evaluates holds it once for both.
    """
    with _LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(loaded.model)
        if lock is None:
            lock = _MODEL_LOCKS[loaded.model] = threading.RLock()
        return lock


@contextlib.contextmanager
def hold_model(loaded: LoadedModel, *, run: Run = DEFAULT_RUN) -> Iterator[LoadedModel]:
    """Hold ``loaded``'s model lock for a `with` block: no other job sees its weights modified.

    Waits for a job already using the model (reporting "waiting" through the run's
    progress), and stays cancellable while waiting.
    """
    lock = model_lock(loaded)
    waited = False
    while not lock.acquire(timeout=LOCK_POLL_SECONDS):
        run.check_cancel()
        if not waited:
            run.report(0.0, "waiting for another job that is using this model")
        waited = True
    try:
        yield loaded
    finally:
        lock.release()
