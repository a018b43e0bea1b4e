"""Timing a whole model, dense against compressed: prefill and decode, taking turns.

The device profile predicts the time of the compressible Linears alone; what a user
waits for is the whole model. ``time_dense_and_compressed`` swaps the compressed
modules in and out of one model and times, on its device:

- **prefill**: one forward of batch 1 x ``tokens`` prompt tokens (no KV cache kept);
- **decode**: ``decode_steps`` new tokens, one at a time, after a KV cache of ``tokens``
  prompt tokens (each sample starts from a fresh copy of the prompt's cache, copied
  before the clock starts, so every sample sees the same cache lengths); seconds per token.

Dense and compressed take turns (dense, compressed, then compressed, dense: the order
is reversed every other repeat, so neither always follows the other), after one
warm-up each, with ``torch.cuda.synchronize`` around every sample on CUDA; the
statistic is the median over ``repeats`` in wall time. ``ModelTiming`` is the record
(``EvalResult.latency``); ``predicted_fractions`` adds what the cost model predicted
for the plan's compressible Linears, so the two can be compared (``comparison_rows``).
"""
from __future__ import annotations

import copy
import inspect
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from .device_profile import WORKLOAD_KINDS, DeviceProfileError, Workload

PROMPT_TOKENS = 256  # the prefill length and the decode KV cache: Workload.named's prefill default
REPEATS = 5
DECODE_STEPS = 4  # new tokens per decode sample: one token alone is a few milliseconds on small models
MAX_TOKENS = 1 << 20  # beyond any model's positions: the model's own limit is checked by ``check_fits``
MAX_REPEATS = 100
MAX_DECODE_STEPS = 64
SPEEDUP_TOLERANCE = 1e-6  # relative: a stored speedup must be dense_s / compressed_s
PREDICTION_SOURCES = ("plan", "device profile")


class ModelTimingError(ValueError):
    """Timing settings that cannot be measured, or a malformed latency record."""


@dataclass(frozen=True)
class TimingSettings:
    """How the dense and the compressed model are timed: prompt length, repeats, decode tokens per sample."""

    tokens: int = PROMPT_TOKENS
    repeats: int = REPEATS
    decode_steps: int = DECODE_STEPS

    def __post_init__(self):
        for name, value, high in (("tokens", self.tokens, MAX_TOKENS), ("repeats", self.repeats, MAX_REPEATS),
                                  ("decode_steps", self.decode_steps, MAX_DECODE_STEPS)):
            if not _integer(value) or not 1 <= value <= high:
                raise ModelTimingError(f"latency timing {name} must be an integer in [1, {high}], got {value!r}")


@dataclass(frozen=True)
class WorkloadTiming:
    """Median seconds of one workload, dense and compressed; speedup = dense_s / compressed_s."""

    dense_s: float
    compressed_s: float

    @property
    def speedup(self) -> float:
        return self.dense_s / self.compressed_s

    def to_dict(self) -> dict:
        return {"dense_s": self.dense_s, "compressed_s": self.compressed_s, "speedup": self.speedup}

    @staticmethod
    def from_dict(raw, where: str) -> "WorkloadTiming":
        if not isinstance(raw, dict) or set(raw) != {"dense_s", "compressed_s", "speedup"}:
            raise ModelTimingError(f"{where} must be an object {{dense_s, compressed_s, speedup}}, got {raw!r}")
        for name in ("dense_s", "compressed_s", "speedup"):
            if not _positive(raw[name]):
                raise ModelTimingError(f"{where}.{name} must be a finite number > 0, got {raw[name]!r}")
        timing = WorkloadTiming(float(raw["dense_s"]), float(raw["compressed_s"]))
        if not math.isclose(raw["speedup"], timing.speedup, rel_tol=SPEEDUP_TOLERANCE):
            raise ModelTimingError(f"{where}.speedup {raw['speedup']!r} is not dense_s / compressed_s "
                                   f"({timing.speedup:.6g})")
        return timing


@dataclass(frozen=True)
class PredictedFraction:
    """The cost model's predicted latency of the plan's compressible Linears, compressed / dense, in one workload.

    It covers those Linears only, not attention, norms, embeddings or the lm_head.
    ``source``: "plan" (the latency budget it was allocated under, ``meta.cost``) or
    "device profile" (this machine's cached profile applied to a parameter plan);
    ``tokens``: the profile's tokens per call (its prefill length; 1 for decode).
    """

    workload: str
    fraction: float
    source: str
    profile_id: str | None = None
    tokens: int | None = None

    @property
    def speedup(self) -> float:
        return 1.0 / self.fraction

    def to_dict(self) -> dict:
        return {"fraction": self.fraction, "speedup": self.speedup, "source": self.source,
                "profile_id": self.profile_id, "tokens": self.tokens}

    @staticmethod
    def from_dict(workload: str, raw, where: str) -> "PredictedFraction":
        fields = {"fraction", "speedup", "source", "profile_id", "tokens"}
        if not isinstance(raw, dict) or set(raw) != fields:
            raise ModelTimingError(f"{where} must be an object {{{', '.join(sorted(fields))}}}, got {raw!r}")
        if not _positive(raw["fraction"]) or not _positive(raw["speedup"]) \
                or not math.isclose(raw["speedup"] * raw["fraction"], 1.0, rel_tol=SPEEDUP_TOLERANCE):
            raise ModelTimingError(f"{where}: fraction must be > 0 and speedup 1 / fraction, got "
                                   f"{raw['fraction']!r} and {raw['speedup']!r}")
        if raw["source"] not in PREDICTION_SOURCES:
            raise ModelTimingError(f"{where}.source must be one of {PREDICTION_SOURCES}, got {raw['source']!r}")
        if raw["profile_id"] is not None and not isinstance(raw["profile_id"], str):
            raise ModelTimingError(f"{where}.profile_id must be a string or null, got {raw['profile_id']!r}")
        if raw["tokens"] is not None and (not _integer(raw["tokens"]) or raw["tokens"] < 1):
            raise ModelTimingError(f"{where}.tokens must be a positive integer or null, got {raw['tokens']!r}")
        return PredictedFraction(workload, float(raw["fraction"]), raw["source"], raw["profile_id"], raw["tokens"])


@dataclass(frozen=True)
class ModelTiming:
    """Measured prefill and decode of the dense and the compressed model, and the conditions of the measurement.

    ``load_average``: the 1-minute load when timing ended (None where the platform has none);
    ``predicted``: per workload, what the cost model predicted (absent: no prediction).
    """

    prefill: WorkloadTiming
    decode: WorkloadTiming
    threads: int
    load_average: float | None
    device: str
    repeats: int
    tokens: int
    decode_steps: int
    predicted: Mapping[str, PredictedFraction] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"prefill": self.prefill.to_dict(), "decode": self.decode.to_dict(), "threads": self.threads,
                "load_average": self.load_average, "device": self.device, "repeats": self.repeats,
                "tokens": self.tokens, "decode_steps": self.decode_steps,
                "predicted": {kind: p.to_dict() for kind, p in self.predicted.items()}}

    @staticmethod
    def from_dict(raw, where: str = "latency") -> "ModelTiming":
        """Validate a stored record; ModelTimingError names the field at fault."""
        names = {"prefill", "decode", "threads", "load_average", "device", "repeats", "tokens", "decode_steps",
                 "predicted"}
        if not isinstance(raw, dict) or set(raw) != names:
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise ModelTimingError(f"{where} must be an object with fields {sorted(names)}, got {got}")
        for name in ("threads", "repeats", "tokens", "decode_steps"):
            if not _integer(raw[name]) or raw[name] < 1:
                raise ModelTimingError(f"{where}.{name} must be a positive integer, got {raw[name]!r}")
        load = raw["load_average"]
        if load is not None and (not _finite(load) or load < 0):
            raise ModelTimingError(f"{where}.load_average must be a number >= 0 or null, got {load!r}")
        if not isinstance(raw["device"], str) or not raw["device"]:
            raise ModelTimingError(f"{where}.device must be a non-empty string, got {raw['device']!r}")
        predicted = raw["predicted"]
        if not isinstance(predicted, dict) or not set(predicted) <= set(WORKLOAD_KINDS):
            raise ModelTimingError(f"{where}.predicted must be an object keyed by {WORKLOAD_KINDS}, got {predicted!r}")
        return ModelTiming(
            WorkloadTiming.from_dict(raw["prefill"], f"{where}.prefill"),
            WorkloadTiming.from_dict(raw["decode"], f"{where}.decode"), raw["threads"],
            None if load is None else float(load), raw["device"], raw["repeats"], raw["tokens"], raw["decode_steps"],
            {kind: PredictedFraction.from_dict(kind, value, f"{where}.predicted.{kind}")
             for kind, value in predicted.items()})


# ------------------------------------------------------------------ timing
def check_fits(model: nn.Module, settings: TimingSettings) -> None:
    """The prompt and its decode tokens must fit the model's positions (ModelTimingError otherwise)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    needed = settings.tokens + settings.decode_steps
    if _integer(limit) and needed > limit:
        raise ModelTimingError(f"latency timing needs {settings.tokens} prompt + {settings.decode_steps} decode "
                               f"tokens = {needed} positions; the model has {limit}: choose fewer tokens")


@torch.inference_mode()
def time_dense_and_compressed(model: nn.Module, dense: Mapping[str, nn.Module], compressed: Mapping[str, nn.Module],
                              settings: TimingSettings | None = None, device: str | torch.device | None = None,
                              check_cancel: Callable[[], None] = lambda: None) -> ModelTiming:
    """Median prefill and decode seconds of ``model`` with the ``dense`` and with the ``compressed`` modules.

    Both map the same module names; each turn puts one set in place. The model is left
    with the modules it had on entry. ``check_cancel`` is called between samples.
    """
    settings = settings or TimingSettings()
    if set(dense) != set(compressed):
        raise ModelTimingError("the dense and the compressed modules must name the same layers")
    check_fits(model, settings)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prompt = _prompt(model, settings.tokens, device)
    turns = {"dense": dense, "compressed": compressed}
    entry = {name: model.get_submodule(name) for name in dense}
    samples = {(kind, workload): [] for kind in turns for workload in WORKLOAD_KINDS}
    try:
        cache = _filled_cache(model, prompt)
        for kind, modules in turns.items():  # warm-up: allocations, kernels, first-call costs
            _install(model, modules)
            _time_prefill(model, prompt, sync)
            _time_decode(model, cache, prompt, settings, sync)
        for repeat in range(settings.repeats):
            for kind in (list(turns) if repeat % 2 == 0 else list(turns)[::-1]):
                check_cancel()
                _install(model, turns[kind])
                samples[(kind, "prefill")].append(_time_prefill(model, prompt, sync))
                samples[(kind, "decode")].append(_time_decode(model, cache, prompt, settings, sync))
    finally:
        _install(model, entry)
    median = {key: statistics.median(values) for key, values in samples.items()}
    return ModelTiming(*(WorkloadTiming(median[("dense", w)], median[("compressed", w)]) for w in WORKLOAD_KINDS),
                       threads=torch.get_num_threads(), load_average=_load_average(), device=str(device),
                       repeats=settings.repeats, tokens=settings.tokens, decode_steps=settings.decode_steps)


def _prompt(model: nn.Module, tokens: int, device: torch.device) -> torch.Tensor:
    """Seeded random token ids, batch 1 x ``tokens`` (their values do not change the time)."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 2)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, tokens), generator=generator).to(device)


def _filled_cache(model: nn.Module, prompt: torch.Tensor):
    """The KV cache of ``prompt`` (its values do not change the time, so one serves both turns)."""
    out = model(prompt, use_cache=True)
    cache = out["cache"] if "cache" in out else out.get("past_key_values")
    if cache is None:
        raise ModelTimingError(f"{type(model).__name__} returned no KV cache: its decode cannot be timed")
    return cache


def _cache_keyword(model: nn.Module) -> str:
    """The forward's name of the KV cache argument: ``cache`` (newer transformers) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _install(model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    from ..compression import set_module

    for name, module in modules.items():
        set_module(model, name, module)


def _time_prefill(model: nn.Module, prompt: torch.Tensor, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    model(prompt, use_cache=False)
    sync()
    return time.perf_counter() - start


def _time_decode(model: nn.Module, cache, prompt: torch.Tensor, settings: TimingSettings,
                 sync: Callable[[], None]) -> float:
    """Seconds per new token after the prompt, on a copy of the prompt's KV cache (made before the clock starts)."""
    token, grown = prompt[:, -1:], {_cache_keyword(model): copy.deepcopy(cache)}
    sync()
    start = time.perf_counter()
    for _ in range(settings.decode_steps):
        model(token, use_cache=True, **grown)
    sync()
    return (time.perf_counter() - start) / settings.decode_steps


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# ------------------------------------------------------------------ what the cost model predicted
def predicted_fractions(plan, layers: list, device: str = "cpu", cache_dir: Path | None = None,
                        dtype: str = "float32") -> dict[str, PredictedFraction]:
    """Per workload, the predicted latency fraction of ``plan``'s compressible Linears.

    A plan allocated under a latency budget predicts its own workload (``meta.cost``);
    any other workload, and every workload of a parameter plan, is predicted from this
    machine's device profile for the layers' shapes when one is cached (the one the
    Allocate page measures: rank step 8, the default grid, wall clock), else left out.
    Nothing is measured here.
    """
    from ..plan_cost import plan_cost

    found = {}
    cost = plan_cost(plan)
    if cost.kind == "latency" and cost.workload.get("kind") in WORKLOAD_KINDS:
        kind = cost.workload["kind"]
        found[kind] = PredictedFraction(kind, cost.predicted_fraction, "plan", (cost.device_profile or {}).get("id"),
                                        cost.workload.get("tokens"))
    for kind in WORKLOAD_KINDS:
        if kind not in found:
            cached = _cached_cost(kind, layers, device, dtype, cache_dir)
            if cached is not None:
                found[kind] = PredictedFraction(kind, cached.fraction(layers, plan.ranks()), "device profile",
                                                cached.device_profile.profile_id, cached.workload.tokens)
    return found


def _cached_cost(kind: str, layers: list, device: str, dtype: str, cache_dir: Path | None):
    """This machine's cached LatencyCost of workload ``kind`` for ``layers``, None when none is cached or usable."""
    from .cost import latency_cost
    from .measure import GRID_POINTS, cache_path, current_key

    workload = Workload.named(kind)
    key = current_key(workload, device, dtype)
    path = cache_path(key, [(l.out_features, l.in_features) for l in layers], 8, GRID_POINTS, cache_dir=cache_dir)
    if not path.is_file():
        return None
    try:
        found = latency_cost(layers, workload, path)
        found.device_profile.check_key(key)
    except (DeviceProfileError, OSError):
        return None
    return found


# ------------------------------------------------------------------ the comparison table
def comparison_rows(timing: ModelTiming) -> list[dict]:
    """One row per workload: dense and compressed ms, the measured whole-model fraction and speedup, the predicted
    fraction and speedup of the compressible Linears ("n/a" without a prediction) and the error of the
    predicted speedup against the measured one, in percent."""
    rows = []
    for kind in WORKLOAD_KINDS:
        measured, predicted = getattr(timing, kind), timing.predicted.get(kind)
        label = (f"prefill 1x{timing.tokens}" if kind == "prefill"
                 else f"decode per token, after {timing.tokens} ({timing.decode_steps} new)")
        rows.append({
            "workload": label, "dense ms": measured.dense_s * 1e3, "compressed ms": measured.compressed_s * 1e3,
            "measured fraction (whole model)": 1.0 / measured.speedup, "measured speedup": measured.speedup,
            "predicted fraction (compressible Linears)": predicted.fraction if predicted else "n/a",
            "predicted speedup": predicted.speedup if predicted else "n/a",
            "error %": 100 * (predicted.speedup - measured.speedup) / measured.speedup if predicted else "n/a",
            "predicted from": _prediction_source(predicted)})
    return rows


def _prediction_source(predicted: PredictedFraction | None) -> str:
    if predicted is None:
        return "no latency plan or cached device profile"
    where = "the plan's latency budget" if predicted.source == "plan" else "this machine's cached device profile"
    return f"{where} ({predicted.workload} 1x{predicted.tokens})" if predicted.tokens else where


def _integer(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def _finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _positive(value) -> bool:
    return _finite(value) and value > 0
