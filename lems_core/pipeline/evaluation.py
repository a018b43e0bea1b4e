"""A plan measured on its model: compressed in place, perplexity (and KL, zero-shot), restored.

``evaluate_plan`` is the one entry: it loads the plan's model, holds its lock, gets the
plan's factors (``plan_factors``), measures, and returns an ``EvalResult``. The dense
model's numbers it compares with are cached (``dense_perplexity``, ``dense_zero_shot``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Iterator

import numpy as np
import torch

from ..blocks import TensorShelf, place_off_device
from ..cache import index, key_of
from ..calibration import CalibrationConfig
from ..compression import compress_model, compressed_per_block, is_dense_rank, restore_dense
from ..data import evaluation_split, load_text
from ..decompositions import Factorization, check_decomposition
from ..factor_store import FactorShards
from ..fused import prepare_modules
from ..memory import GramLedger
from ..evaluation import REFERENCE_EVAL, EvalProtocol, kl_to_reference, model_logits, perplexity, token_windows
from ..latency.model_timing import TimingSettings, check_fits, predicted_fractions, time_dense_and_compressed
from ..model import LoadedModel, compressible_layers
from ..plan import check_plan_layers
from ..recovery import RecoveryConfig, RecoveryResult, recover
from ..run import DEFAULT_RUN, Run
from ..sensitivity import LOG_PROB_CACHE_BYTES
from ..zero_shot import ZeroShotResult, load_tasks, tasks_key, zero_shot
from .artefacts import calibration_windows
from . import models
from .models import hold_model
from .plan_factors import plan_factorizations

SHIPPED_DENSE_PPL = "dense_ppl.json"  # in cache/demo: {"schema", "note", "entries": [{fingerprint, dataset, ...}]}
DENSE_PPL_FIELDS = ("fingerprint", "dataset", "split", "seq_len", "max_windows")
# Shares of the progress bar, from a first evaluation of the demo's LEMS @ 0.8 plan with the quick protocol
# (bench/first_run.py: load 26 s, statistics 106 s, decompositions 16 s, KL 10 s, perplexity 18 s; the demo's
# dense perplexity is shipped). Cached steps then just go by, and the time estimate
# (``jobs.JobState.seconds_left``) adapts.
EVAL_WEIGHTS = {"model load": 0.14, "factorising the plan's layers": 0.68, "KL reference": 0.03, "dense perplexity": 0.02,
                "compression": 0.0, "perplexity": 0.1, "KL": 0.03, "latency": 0.05}
RECOVERY_WEIGHT = 1.0  # share of the bar of a recovery (``recovery=``), relative to the weights above: training dominates
LOADING_REPORTED = 0.01  # the fraction reported as the model load starts: under EVAL_WEIGHTS["model load"]


@contextlib.contextmanager
def compressed(loaded: LoadedModel, ranks: dict[str, int | None], factors: dict[str, Factorization], *,
               per_block: bool = True, max_memory: int | None = None) -> Iterator[dict]:
    """Compress the cached model in place for the duration of a `with` block, then restore it.

    Holds the model's lock (re-entrant) throughout, so no other job runs it meanwhile.
    Factors on disk (``FactorShards``: a build under a memory budget) compress one
    decoder block at a time while it runs (``compressed_per_block``), so the truncated
    factors of every layer are never in memory together (docs/scale.md). ``per_block=False``
    compresses the whole model at once: for training (recovery) and for the thousands of
    short forwards of zero-shot, which would re-read the factors on each. A per-block
    forward counts the live block's factors in a ledger limited to ``max_memory``.
    """
    with hold_model(loaded):
        if per_block and isinstance(factors, FactorShards):
            ledger = GramLedger(limit=max_memory, what="compressed block factor")
            with compressed_per_block(loaded.model, ranks, lambda l: factors.truncated(l.name), ledger) as applied:
                yield applied
            return
        originals = {name: loaded.model.get_submodule(name) for name in ranks}
        try:
            yield compress_model(loaded.model, ranks, lambda l: factors[l.name])
        finally:
            restore_dense(loaded.model, originals)


@dataclass
class EvalResult:
    """One measured plan: what the app's results table and plots show."""

    method: str
    decomposition: str
    budget: float
    realised_ratio: float
    ppl: dict[str, float]
    dense_ppl: dict[str, float]
    kl: float | None
    params_kept: int
    params_total: int
    seconds: float
    device: str
    model_source: str
    fingerprint: str
    settings: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    zero_shot: dict | None = None  # ZeroShotResult.to_dict() of the compressed model (lm-eval acc / acc_norm)
    dense_zero_shot: dict | None = None  # the same tasks on the dense model (cached per task)
    ranks: dict | None = None  # the plan's {layer: rank or None (dense)}, for predicted vs measured
    recovery: dict | None = None  # RecoveryResult.record() when the compressed model was healed before measuring
    latency: dict | None = None  # latency.ModelTiming.to_dict(): prefill / decode, dense vs compressed, when timed

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ the dense model's numbers
def dense_perplexity(loaded: LoadedModel, dataset: str, protocol: EvalProtocol, split: str | None = None, *,
                     run: Run = DEFAULT_RUN) -> float:
    """Dense-model perplexity on a dataset's evaluation split, cached in the index of the run's cache."""
    split = split or evaluation_split(dataset)
    key = f"dense-ppl:{key_of(loaded.fingerprint, dataset, split, protocol.seq_len, protocol.max_windows)}"
    store = index(run.cache_dir)
    cached = store.get(key)  # a corrupt row reads as missing
    if isinstance(cached, (int, float)) and not isinstance(cached, bool):
        return float(cached)
    value = shipped_dense_perplexity(loaded, dataset, split, protocol.seq_len, protocol.max_windows)
    if value is None:
        text, _ = load_text(dataset, split)
        windows = token_windows(loaded.tokenizer, text, protocol.seq_len, protocol.max_windows)
        value = perplexity(loaded.model, windows, cancel=run.cancel).ppl
    store[key] = value
    return value


def shipped_dense_perplexity(loaded: LoadedModel, dataset: str, split: str, seq_len: int,
                             max_windows: int | None) -> float | None:
    """The demo's dense perplexity shipped in ``cache/demo/dense_ppl.json``, or None.

    A first evaluation on a fresh clone would spend a dense pass on a number every
    CPU computes the same (float32, the same bits with any thread count); the file
    holds it for the demo model's protocols (``bench/first_run.py --ship-dense-ppl``
    writes it). Used only for a model on the CPU in float32 with the same fingerprint,
    dataset, split, window length and window cap; an unreadable file is ignored.
    """
    from ..cache import DEMO_DIR

    if loaded.device.type != "cpu" or next(loaded.model.parameters()).dtype != torch.float32:
        return None
    try:
        entries = json.loads((DEMO_DIR / SHIPPED_DENSE_PPL).read_text()).get("entries", [])
    except (OSError, ValueError, AttributeError):
        return None
    wanted = (loaded.fingerprint, dataset, split, seq_len, max_windows)
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or tuple(entry.get(k) for k in DENSE_PPL_FIELDS) != wanted:
            continue
        value = entry.get("ppl")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return float(value)
    return None


def reference_logits(loaded: LoadedModel, search_ids: torch.Tensor, max_memory: int | None = None) -> TensorShelf:
    """The dense model's logits per search window (``reference_logits_dtype``), one batch computed at a time.

    Kept on the device when all of them fit ``max_memory`` (default: DEFAULT_FRACTION of
    what the device has free), else in CPU RAM (GPU device, when they fit it), else
    memory-mapped on disk (``blocks.place_off_device``); ``kl_to_reference`` brings one
    window's to the device at a time.
    """
    dtype = reference_logits_dtype(loaded, search_ids)
    vocab = int(getattr(getattr(loaded.model, "config", None), "vocab_size", 0) or 0)
    shelf = TensorShelf(place_off_device(search_ids.numel() * vocab * dtype.itemsize, loaded.device, max_memory))
    for i in range(search_ids.shape[0]):
        shelf.append(model_logits(loaded.model, search_ids[i : i + 1], dtype=dtype)[0])
    return shelf


def reference_logits_dtype(loaded: LoadedModel, search_ids: torch.Tensor) -> torch.dtype:
    """float32 when the search windows' logits fit in LOG_PROB_CACHE_BYTES, else bfloat16."""
    vocab = int(getattr(getattr(loaded.model, "config", None), "vocab_size", 0) or 0)
    return torch.float32 if 0 < search_ids.numel() * vocab * 4 <= LOG_PROB_CACHE_BYTES else torch.bfloat16


# ------------------------------------------------------------------ one plan
def evaluate_plan(plan, datasets: list[str], protocol: EvalProtocol = REFERENCE_EVAL, *,
                  calibration: CalibrationConfig | None = None, decomposition: str | None = None,
                  with_kl: bool = True, tasks: list[str] | tuple[str, ...] = (), task_limit: int | None = None,
                  recovery: RecoveryConfig | None = None, latency: TimingSettings | None = None,
                  run: Run = DEFAULT_RUN) -> EvalResult:
    """Compress the plan's model with the plan, measure perplexity (and KL), restore the model.

    ``protocol`` is the window length and count of the perplexity (default: the
    reference's, 2048-token windows, all of them); ``settings["protocol"]`` and
    ``settings["splits"]`` record what was measured. ``tasks`` (lm-eval names or local
    task YAMLs, see ``zero_shot``) add zero-shot acc / acc_norm of the compressed and the
    dense model, ``task_limit`` documents per task. ``run.offload`` loads the model partly
    in CPU RAM / on disk; ``run.max_memory`` (bytes) bounds statistics + decomposition
    (the streamed build) and where the dense reference logits of the KL wait.

    The plan must be for the loaded model (fingerprint check). Factorisations use the
    calibration config recorded in the plan (or ``calibration``) and the plan's
    decomposition, or ``decomposition`` (any of ``decomposition_names()``: rank-dependent
    ones are computed for the plan's ranks); the result records the one used.

    ``recovery`` heals the compressed model (``recovery.recover``, on its calibration
    text; the evaluation splits of ``datasets`` are refused) before perplexity and KL
    are measured; ``result.recovery`` records its settings and outcome. The healed
    factors are dropped with the compression afterwards. Zero-shot ``tasks`` re-compress
    without healing, so they are refused together with ``recovery``.

    ``latency`` times the dense and the compressed model in prefill and decode
    (``latency.time_dense_and_compressed``, on the job's device and threads) and records
    it with the cost model's prediction for the plan in ``result.latency``.
    """
    started = time.perf_counter()
    decomposition = check_decomposition(decomposition or plan.decomposition)
    _check_eval_sizes(protocol)
    if recovery is not None and tasks:
        raise ValueError("zero-shot tasks are measured on the unhealed model: evaluate them without recovery")
    loaded_tasks = load_tasks(list(tasks)) if tasks else None  # unreachable hub data fails before the model loads
    loaded = _plan_model(plan, run, check_tokenizer=bool(tasks))
    if latency is not None:
        check_fits(loaded.model, latency)  # a prompt longer than the model's positions fails before the slow steps
    run = run.stage(EVAL_WEIGHTS["model load"], 1.0)
    cfg = calibration or CalibrationConfig.from_dict(plan.meta.get("calibration") or {})
    with hold_model(loaded, run=run):
        steps = _EvalSteps(run.stage(0, 0.4) if tasks else run, len(datasets), with_kl, recovery is not None,
                           latency is not None)
        factors = plan_factorizations(loaded, cfg, decomposition, plan.ranks(),
                                      run=steps.next("factorising the plan's layers"))
        reference = _kl_reference(loaded, cfg, steps) if with_kl else None
        splits = {ds: evaluation_split(ds) for ds in datasets}
        dense_ppl = {ds: dense_perplexity(loaded, ds, protocol, splits[ds], run=steps.next(
            f"dense perplexity on {ds} (cached after the first evaluation)")) for ds in datasets}
        ppl, kl, healed = _compressed_scores(loaded, plan.ranks(), factors, splits, protocol, reference, steps,
                                             recovery)
        result = _eval_result(plan, loaded, decomposition, cfg, protocol, splits)
        result.ppl, result.dense_ppl, result.kl = ppl, dense_ppl, kl
        result.recovery = healed.record() if healed is not None else None
        if latency is not None:
            result.latency = plan_latency(plan, loaded, factors, latency, steps.next(
                f"timing prefill and decode, dense and compressed ({latency.repeats} turns each)"))
        if tasks:
            dense, scores = plan_zero_shot(plan, loaded, cfg, decomposition, list(tasks), task_limit, loaded_tasks,
                                           run=run.stage(0.4, 1.0))
            result.zero_shot, result.dense_zero_shot = scores.to_dict(), dense.to_dict()
    result.seconds = round(time.perf_counter() - started, 1)
    return result


def _plan_model(plan, run: Run, check_tokenizer: bool) -> LoadedModel:
    """The plan's model, loaded (reported through the run) and checked against the plan."""
    run.report(LOADING_REPORTED, f"loading the model {plan.model_source}")  # above 0: the job has started
    loaded = models.get_model(plan.model_source, run.device, offload=run.offload)
    run.report(EVAL_WEIGHTS["model load"], "model loaded")
    if plan.fingerprint != loaded.fingerprint:
        raise ValueError(f"Plan is for model {plan.fingerprint}, but {plan.model_source} loads as {loaded.fingerprint}")
    check_plan_layers(plan, compressible_layers(loaded.model))
    if check_tokenizer:
        _check_hf_tokenizer(loaded.tokenizer)
    return loaded


def _kl_reference(loaded: LoadedModel, cfg: CalibrationConfig, steps: _EvalSteps) -> tuple[torch.Tensor, TensorShelf]:
    """(search windows, the dense model's logits on them) for the plan's KL."""
    run = steps.next("KL: the dense model's logits on the search windows")
    _, search_ids = calibration_windows(loaded, cfg)
    return search_ids, reference_logits(loaded, search_ids, run.max_memory)


def _compressed_scores(loaded: LoadedModel, ranks: dict, factors: dict[str, Factorization], splits: dict[str, str],
                       protocol: EvalProtocol, reference: tuple | None, steps: _EvalSteps,
                       recovery: RecoveryConfig | None = None) -> tuple[dict, float | None, RecoveryResult | None]:
    """(perplexity per dataset, KL or None, RecoveryResult or None) of the model compressed with ``factors``
    at ``ranks``, healed by ``recovery`` first when given."""
    planned = sum(not is_dense_rank(l, ranks[l.name]) for l in compressible_layers(loaded.model) if l.name in ranks)
    run = steps.next(f"compressing the model: {planned} layers factorised")
    ppl, kl, healed = {}, None, None
    with compressed(loaded, ranks, factors, per_block=recovery is None, max_memory=run.max_memory):
        if recovery is not None:
            healed = recover(loaded.model, loaded.tokenizer, recovery, steps.next(
                f"recovery: {recovery.steps} {recovery.mode} steps on {recovery.dataset}/{recovery.split}"),
                tuple(splits))
        for ds, split in splits.items():
            run.check_cancel()
            text, _ = load_text(ds, split)
            windows = token_windows(loaded.tokenizer, text, protocol.seq_len, protocol.max_windows)
            ppl[ds] = perplexity(loaded.model, windows, progress=steps.next(f"perplexity on {ds}").progress,
                                 cancel=run.cancel).ppl
        if reference is not None:
            steps.next("KL on the search windows")
            kl = kl_to_reference(loaded.model, reference[0], reference[1], cancel=run.cancel)
    return ppl, kl, healed


def plan_latency(plan, loaded: LoadedModel, factors: dict[str, Factorization], settings: TimingSettings,
                 run: Run = DEFAULT_RUN) -> dict:
    """``ModelTiming.to_dict()`` of the plan's model, dense against compressed with ``factors``, with the
    cost model's predicted fraction of the compressible Linears (the plan's own, or this machine's cached
    device profile); holds the model's lock.

    The whole model is compressed at once (``per_block=False``: every low-rank module in
    memory, as the compressed model is deployed) and its low-rank modules prepared as an
    export prepares them on loading (``fused.prepare_modules``: grouped first factors,
    second factors laid out for the matvec, direct calls), so the speedup is the deployed
    model's; the timing swaps the two module sets in turns.
    """
    with hold_model(loaded):
        dense = {name: loaded.model.get_submodule(name) for name in plan.ranks()}
        with compressed(loaded, plan.ranks(), factors, per_block=False):
            low_rank = {name: loaded.model.get_submodule(name) for name in dense}
            prepare_modules(loaded.model, list(low_rank.values()))  # it picks the low-rank ones
            timing = time_dense_and_compressed(loaded.model, dense, low_rank, settings, loaded.device,
                                               run.check_cancel)
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    predicted = predicted_fractions(plan, compressible_layers(loaded.model), str(loaded.device), run.cache_dir, dtype)
    return dataclasses.replace(timing, predicted=predicted).to_dict()


def _eval_result(plan, loaded: LoadedModel, decomposition: str, cfg: CalibrationConfig, protocol: EvalProtocol,
                 splits: dict[str, str]) -> EvalResult:
    """The plan's EvalResult before its numbers are filled in: what was evaluated, and how."""
    summary = plan.summary
    return EvalResult(
        method=plan.method, decomposition=decomposition, budget=plan.budget,
        realised_ratio=summary["realised_ratio"], ppl={}, dense_ppl={}, kl=None,
        params_kept=summary["params_kept"], params_total=summary["params_total"],
        seconds=0.0, device=str(loaded.device), model_source=plan.model_source, fingerprint=plan.fingerprint,
        settings={"seq_len": protocol.seq_len, "max_windows": protocol.max_windows, "calibration": cfg.to_dict(),
                  "plan_decomposition": plan.decomposition,
                  "protocol": protocol.to_dict(), "splits": splits},
        ranks=dict(plan.ranks()),
    )


def _check_eval_sizes(protocol: EvalProtocol) -> None:
    """Perplexity needs at least one window of at least two tokens (0 windows gave ppl = inf)."""
    seq_len, max_windows = protocol.seq_len, protocol.max_windows
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive integer or None (all windows), got {max_windows!r}")


class _EvalSteps:
    """Hands out consecutive parts of the bar (a staged Run) for evaluate_plan's steps, each announced by its message."""

    def __init__(self, run: Run, datasets: int, with_kl: bool, with_recovery: bool = False,
                 with_latency: bool = False):
        w = EVAL_WEIGHTS
        parts = [w["factorising the plan's layers"]] + ([w["KL reference"]] if with_kl else [])
        parts += [w["dense perplexity"] / max(datasets, 1)] * datasets + [w["compression"]]
        parts += [RECOVERY_WEIGHT] if with_recovery else []
        parts += [w["perplexity"] / max(datasets, 1)] * datasets + ([w["KL"]] if with_kl else [])
        parts += [w["latency"]] if with_latency else []
        total = sum(parts)
        self._bounds = np.cumsum([0.0] + [p / total for p in parts])
        self._run, self._k = run, 0

    def next(self, message: str) -> Run:
        """The next step's part of the bar; reports its start with ``message``."""
        lo, hi = self._bounds[self._k], self._bounds[min(self._k + 1, len(self._bounds) - 1)]
        self._k += 1
        self._run.report(float(lo), message)
        return self._run.stage(float(lo), float(hi))


# ------------------------------------------------------------------ zero-shot
def plan_zero_shot(plan, loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str, tasks: list[str],
                   limit: int | None = None, loaded_tasks: dict | None = None, *,
                   run: Run = DEFAULT_RUN) -> tuple[ZeroShotResult, ZeroShotResult]:
    """(dense, compressed) zero-shot scores of ``plan`` on ``tasks``; holds the model's lock.

    ``loaded_tasks`` are ``load_tasks(tasks)`` (loaded here when not given); the factors
    come from the cache an evaluation of the plan just filled.
    """
    _check_hf_tokenizer(loaded.tokenizer)
    loaded_tasks = loaded_tasks or load_tasks(tasks)
    with hold_model(loaded, run=run):
        dense = dense_zero_shot(loaded, tasks, limit, loaded_tasks, run=run.stage(0, 0.45))
        factors = plan_factorizations(loaded, cfg, decomposition, plan.ranks(), run=run.but(progress=None))
        with compressed(loaded, plan.ranks(), factors, per_block=False):
            scores = zero_shot(loaded.model, loaded.tokenizer, tasks, limit, progress=run.stage(0.45, 1.0).progress,
                               cancel=run.cancel, tasks=loaded_tasks)
    return dense, scores


def _check_hf_tokenizer(tokenizer) -> None:
    """lm-eval's HFLM tokenises with a Hugging Face tokenizer; anything else is refused with this message."""
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ValueError(f"zero-shot evaluation needs a Hugging Face tokenizer, this model has {type(tokenizer).__name__}")


def dense_zero_shot(loaded: LoadedModel, tasks: list[str], limit: int | None = None, loaded_tasks: dict | None = None,
                    *, run: Run = DEFAULT_RUN) -> ZeroShotResult:
    """Dense-model zero-shot scores, each task cached in the index (key: model, task + its local files, limit)."""
    store = index(run.cache_dir)
    keys = {spec: f"dense-zero-shot:{key_of(loaded.fingerprint, tasks_key([spec]), limit)}" for spec in tasks}
    cached = {}
    for spec, key in keys.items():
        with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):  # a corrupt row reads as missing
            cached[spec] = ZeroShotResult.from_dict(store.get(key))
    missing = [spec for spec in tasks if spec not in cached]
    if missing:
        fresh = zero_shot(loaded.model, loaded.tokenizer, missing, limit, progress=run.progress, cancel=run.cancel,
                          tasks=loaded_tasks)
        for spec, (name, score) in zip(missing, fresh.tasks.items()):
            cached[spec] = ZeroShotResult({name: score}, fresh.settings | {"tasks": [spec]})
            store[keys[spec]] = cached[spec].to_dict()
    merged = {name: score for spec in tasks for name, score in cached[spec].tasks.items()}
    return ZeroShotResult(merged, {"tasks": list(tasks), "num_fewshot": 0, "limit": limit})
