"""Orchestration of the steps with caching: statistics -> factorisations -> profile,
and plan -> compressed model -> evaluation.

Each expensive artefact is keyed by what it was computed from (model
fingerprint, calibration config, decomposition and its options) and stored as
safetensors; a corrupt or missing entry is recomputed, never trusted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import __version__
from .allocators import BIAS_FIT_RATIOS, MODEL_SCORED, Allocation, allocate, ars, profile_bias_fit
from .cache import index, key_of, load_tensors, profiles_dir, save_tensors, tensor_path
from .calibration import CalibrationConfig, SEARCH_SEED_OFFSET, sample_windows
from .compression import compress_model, is_dense_rank, restore_dense
from .data import evaluation_split, load_text
from .decompositions import (DecompositionOptions, DecompositionSpec, Decomposer, Factorization, MethodOptions, base_of,
                             check_decomposition, decomposition_names, spec_of)
from .decompositions import BASE_DECOMPOSITION, RANK_DEPENDENT  # noqa: F401  (re-exported for the app and tests)
from .evaluation import (REFERENCE_EVAL, Cancelled, EvalProtocol, check_cancel, kl_to_reference, model_logits,
                         perplexity, token_windows)
from .model import LayerInfo, LoadedModel, check_device, compressible_layers, load_model
from .plan import check_plan_layers
from .profile import Profile, ProfileError
from .sensitivity import LOG_PROB_CACHE_BYTES, layer_kl_sweep
from . import distributed
from .memory import grad_gram_bytes, input_gram_bytes, available_memory
from .blocks import TensorShelf, place_off_device, plan_input_placement
from .offload import OffloadSpec, has_offloaded_weights, load_with
from .zero_shot import ZeroShotResult, load_tasks, tasks_key, zero_shot
from .streaming import decomposition_workspace, plan_stream, streamed_dir, streamed_factorizations
from .statistics import (INPUT_GROUP, InputStats, Statistics, collect_fisher_rows, collect_grad_grams,
                         iter_block_input_stats)

Progress = Callable[[float, str], None]


def stage(progress: Progress | None, lo: float, hi: float) -> Progress | None:
    """Map a sub-step's 0..1 progress into [lo, hi] of the caller's bar."""
    if progress is None:
        return None
    return lambda f, msg: progress(lo + (hi - lo) * min(max(f, 0.0), 1.0), msg)


# ------------------------------------------------------------------ model cache
_MODEL_LOCK = threading.Lock()
_MODELS: dict[tuple, LoadedModel] = {}


def get_model(source: str, device: str | None = None, offload: OffloadSpec | None = None) -> LoadedModel:
    """Load a model once per process (the demo takes ~30 s to load on CPU); keeps one.

    ``offload`` loads it with accelerate, partly on CPU RAM / disk (``offload.py``).
    """
    from .model import default_device

    key = (source, check_device(device or default_device()), offload)
    with _MODEL_LOCK:
        if key not in _MODELS:
            _MODELS.clear()
            _MODELS[key] = load_with(offload, source, key[1]) if offload else load_model(source, device=key[1])
        return _MODELS[key]


# One lock per loaded model: compression (``compressed``), ARS training and the
# profile's KL sweep swap the shared model's Linears in place, so every job that
# runs the model holds its lock for as long as it uses it. Re-entrant, because
# evaluate_and_store allocates on the model and then evaluates under one hold.
_LOCKS_GUARD = threading.Lock()
_MODEL_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
LOCK_POLL_SECONDS = 0.2


def model_lock(loaded: LoadedModel) -> threading.RLock:
    """The lock of ``loaded``'s model (one per model object, created on first use)."""
    with _LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(loaded.model)
        if lock is None:
            lock = _MODEL_LOCKS[loaded.model] = threading.RLock()
        return lock


@contextlib.contextmanager
def hold_model(loaded: LoadedModel, cancel: threading.Event | None = None,
               progress: Progress | None = None) -> Iterator[LoadedModel]:
    """Hold ``loaded``'s model lock for a `with` block: no other job sees its weights modified.

    Waits for a job already using the model (reporting "waiting" through
    ``progress``), and stays cancellable while waiting.
    """
    lock = model_lock(loaded)
    waited = False
    while not lock.acquire(timeout=LOCK_POLL_SECONDS):
        check_cancel(cancel)
        if progress and not waited:
            progress(0.0, "waiting for another job that is using this model")
        waited = True
    try:
        yield loaded
    finally:
        lock.release()


# ------------------------------------------------------------------ data
def calibration_windows(loaded: LoadedModel, cfg: CalibrationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    text, _ = load_text(cfg.dataset, cfg.split)
    calib = sample_windows(loaded.tokenizer, text, cfg.n_samples, cfg.seq_len, cfg.seed, cfg.sampling)
    search = sample_windows(loaded.tokenizer, text, cfg.n_search, cfg.seq_len, cfg.seed + SEARCH_SEED_OFFSET,
                            cfg.sampling)
    return calib, search


# ------------------------------------------------------------------ statistics
def statistics_key(cfg: CalibrationConfig) -> dict:
    """The calibration fields statistics depend on (the search-set size does not matter)."""
    return {k: v for k, v in cfg.to_dict().items() if k != "n_search"}


def _input_stats_to_tensors(stats: dict[str, InputStats], layers: list[LayerInfo]) -> dict[str, torch.Tensor]:
    out = {}
    for layer in layers:
        g = f"{layer.block}.{INPUT_GROUP[layer.kind]}"
        if f"{g}.gram" in out:
            continue
        s = stats[layer.name]
        out.update({f"{g}.gram": s.gram, f"{g}.abs_sum": s.abs_sum, f"{g}.abs_max": s.abs_max,
                    f"{g}.abs_max_sum": s.abs_max_sum, f"{g}.tokens": torch.tensor([s.tokens])})
    return out


def _input_stats_from_tensors(t: dict[str, torch.Tensor], layers: list[LayerInfo]) -> dict[str, InputStats]:
    groups: dict[str, InputStats] = {}
    out = {}
    for layer in layers:
        g = f"{layer.block}.{INPUT_GROUP[layer.kind]}"
        if g not in groups:
            groups[g] = InputStats(t[f"{g}.gram"], t[f"{g}.abs_sum"], t[f"{g}.abs_max"], t[f"{g}.abs_max_sum"],
                                   int(t[f"{g}.tokens"][0]))
        out[layer.name] = groups[g]
    return out


def statistics_for(
    loaded: LoadedModel, calib_ids: torch.Tensor, cfg: CalibrationConfig, decomposition: str,
    cache_dir: Path | None = None, progress: Progress | None = None,
) -> Statistics:
    """The statistics a decomposition needs, from cache or computed now (and cached)."""
    layers = compressible_layers(loaded.model)
    needs = spec_of(decomposition).needs
    stats = Statistics()
    base = (loaded.fingerprint, statistics_key(cfg))
    if needs == {"inputs", "grads"} and _both_missing(base, cache_dir):
        # KFAC from scratch: the input statistics come from the gradient pass's forward passes.
        inputs: dict[str, InputStats] = {}
        stats.grad_gram = collect_grad_grams(loaded.model, calib_ids, layers, progress=progress, inputs=inputs)
        save_tensors(tensor_path("inputs", key_of(*base, "inputs"), cache_dir), _input_stats_to_tensors(inputs, layers))
        save_tensors(tensor_path("grads", key_of(*base, "grads"), cache_dir), stats.grad_gram)
        stats.inputs = inputs
        return stats
    if "inputs" in needs:
        path = tensor_path("inputs", key_of(*base, "inputs"), cache_dir)
        cached = load_tensors(path)
        if cached is None:
            computed = {}
            for _, block_stats in iter_block_input_stats(loaded.model, calib_ids, progress=stage(progress, 0, 0.5)):
                computed.update(block_stats)
            save_tensors(path, _input_stats_to_tensors(computed, layers))
            stats.inputs = computed
        else:
            stats.inputs = _input_stats_from_tensors(cached, layers)
    if "grads" in needs:
        stats.grad_gram = _cached_tensors(tensor_path("grads", key_of(*base, "grads"), cache_dir), lambda: collect_grad_grams(
            loaded.model, calib_ids, layers, progress=stage(progress, 0.5, 1)))
    if "fisher" in needs:
        stats.fisher = _cached_tensors(tensor_path("fisher", key_of(*base, "fisher"), cache_dir), lambda: collect_fisher_rows(
            loaded.model, calib_ids, layers, progress=stage(progress, 0, 1)))
    return stats


def _both_missing(base: tuple, cache_dir: Path | None) -> bool:
    """Whether neither the input nor the gradient statistics of ``base`` are cached."""
    return not any(tensor_path(kind, key_of(*base, kind), cache_dir).is_file() for kind in ("inputs", "grads"))


def _cached_tensors(path: Path, compute: Callable[[], dict]) -> dict:
    """The tensors saved at ``path``, else ``compute()`` saved there (a corrupt file counts as missing)."""
    tensors = load_tensors(path)
    if not tensors:
        tensors = compute()
        save_tensors(path, tensors)
    return tensors


# ------------------------------------------------------------------ factorisations
def factorizations_for(
    loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str,
    options: DecompositionOptions | None = None, cache_dir: Path | None = None,
    progress: Progress | None = None, calib_ids: torch.Tensor | None = None,
    max_memory: int | None = None, factor_dtype: str = "fp32", owned: set[str] | None = None,
) -> dict[str, Factorization]:
    """Every layer's Factorization (cached as one safetensors file per model/config/method).

    With ``max_memory`` (bytes for statistics + decomposition), or when the model's
    Grams would not fit what the device has, for one rank's ``owned`` layers, or for a
    model with offloaded weights, the streamed path runs instead (``streaming.py``):
    windows of blocks, Grams freed per layer, factors on disk per block in
    ``factor_dtype`` (a read-only Mapping).
    """
    options = options or DecompositionOptions()
    layers = compressible_layers(loaded.model)
    if (max_memory is not None or owned is not None or has_offloaded_weights(loaded.model)
            or not _grams_fit(loaded, layers, decomposition, options)):
        if calib_ids is None and spec_of(decomposition).needs:
            calib_ids, _ = calibration_windows(loaded, cfg)
        shard = None if owned is None else (distributed.context().rank, distributed.context().world)
        folder = _streamed_folder(loaded, cfg, decomposition, options, factor_dtype, cache_dir, shard)
        plan = plan_stream(layers, decomposition, max_memory, loaded.device, options)
        return streamed_factorizations(loaded, calib_ids, decomposition, options, folder, plan, factor_dtype, owned,
                                       progress)
    key = key_of(loaded.fingerprint, statistics_key(cfg), decomposition, _options_dict(options))
    path = tensor_path("factors", key, cache_dir)
    cached = load_tensors(path)
    if cached is not None:
        return _factors_from_tensors(cached, [l.name for l in layers], loaded.device)
    if calib_ids is None and spec_of(decomposition).needs:
        calib_ids, _ = calibration_windows(loaded, cfg)
    stats = statistics_for(loaded, calib_ids, cfg, decomposition, cache_dir, stage(progress, 0, 0.6))
    result = {}
    for i, (layer, factors) in enumerate(_decomposed(loaded, layers, stats, Decomposer(decomposition, options))):
        result[layer.name] = factors
        if progress:
            progress(0.6 + 0.4 * (i + 1) / len(layers), f"decomposing {layer.name}")
    save_tensors(path, _factors_to_tensors(result), {"decomposition": decomposition})
    return result


def _decomposed(loaded: LoadedModel, layers: list[LayerInfo], stats: Statistics, decomposer: Decomposer):
    """(layer, Factorization) for each of ``layers``, one at a time, from the collected statistics."""
    for layer in layers:
        weight = loaded.model.get_submodule(layer.name).weight
        yield layer, decomposer(layer, weight, stats.inputs.get(layer.name), stats.grad_gram.get(layer.name),
                                stats.fisher.get(layer.name))


def _streamed_folder(loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str, options: DecompositionOptions,
                     factor_dtype: str, cache_dir: Path | None, shard: tuple[int, int] | None = None) -> Path:
    """The block-file folder of a streamed build (one rank's ``shard`` has its own; None: complete factors)."""
    return streamed_dir(loaded, statistics_key(cfg), decomposition, _options_dict(options), factor_dtype, cache_dir,
                        shard)


def _grams_fit(loaded: LoadedModel, layers: list[LayerInfo], decomposition: str, options: DecompositionOptions) -> bool:
    """Whether the classic path (every Gram of the model held at once) fits what the device has free."""
    needs = spec_of(decomposition).needs
    grams = (input_gram_bytes(layers) if "inputs" in needs else 0) + (grad_gram_bytes(layers) if "grads" in needs else 0)
    return grams + decomposition_workspace(layers, options.dtype) <= available_memory(loaded.device)


def _options_dict(options: DecompositionOptions) -> dict:
    return {k: str(v) for k, v in asdict(options).items()}


def _factors_to_tensors(factors: dict[str, Factorization]) -> dict[str, torch.Tensor]:
    """One safetensors entry per (layer, sigma/left/right); the cache format of static and per-plan factors."""
    tensors = {}
    for name, f in factors.items():
        tensors.update({f"{name}.sigma": torch.from_numpy(f.sigma.copy()), f"{name}.left": f.left.cpu(),
                        f"{name}.right": f.right.cpu()})
    return tensors


def _factors_from_tensors(stored: dict[str, torch.Tensor], names, device) -> dict[str, Factorization]:
    """The Factorizations of ``names`` from a cache file's tensors, on ``device``."""
    return {n: Factorization(stored[f"{n}.sigma"].numpy(), stored[f"{n}.left"].to(device), stored[f"{n}.right"].to(device))
            for n in names}


# ------------------------------------------------------------------ profile
def build_profile(
    source: str | LoadedModel,
    decomposition: str,
    calibration: CalibrationConfig,
    extra_ratios: tuple[float, ...] = (),
    ref_ratio: float = 0.1,
    measure_scale: bool = True,
    device: str | None = None,
    options: DecompositionOptions | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    force: bool = False,
    search_batch: int = 4,
    max_memory: int | None = None,
    factor_dtype: str = "fp32",
    bias_fit_ratios: tuple[float, ...] = BIAS_FIT_RATIOS,
) -> Path:
    """Compute (or reuse) the profile for (model, calibration, decomposition); return its folder.

    With the KL scale measured, the reference LEMS's (alpha, gamma) search runs at
    ``bias_fit_ratios`` (10 seeded trials each, scored by KL on the search windows;
    ``allocators.lems.profile_bias_fit``) and is stored in the profile (empty: skip).

    ``max_memory`` bounds statistics + decomposition (bytes, default: what the device
    has; ``streaming.py``); it does not enter the profile's key (the profile is the
    same to float tolerance). Under torchrun the per-layer work is sharded across
    ranks and rank 0 writes the profile (``distributed.py``).
    """
    check_decomposition(decomposition)
    loaded = source if isinstance(source, LoadedModel) else get_model(source, device)
    options = options or DecompositionOptions()
    settings = {"ref_ratio": ref_ratio, "extra_ratios": sorted(extra_ratios), "scale": measure_scale,
                "options": _options_dict(options)}
    if tuple(bias_fit_ratios) != BIAS_FIT_RATIOS:  # the default fit stays out of the key
        settings["bias_fit_ratios"] = sorted(bias_fit_ratios)
    folder = profiles_dir(cache_dir) / key_of(loaded.fingerprint, calibration.to_dict(), decomposition, settings)
    expects_fit = bool(bias_fit_ratios) and measure_scale
    if not force and distributed.broadcast_object(distributed.context(), _profile_readable(folder, expects_fit)):
        return folder  # under torchrun rank 0 decides, so no rank waits alone in a merge
    with hold_model(loaded, cancel, progress):
        return _build_profile(loaded, decomposition, calibration, folder, settings, extra_ratios, ref_ratio,
                              measure_scale, options, cache_dir, progress, cancel, search_batch, max_memory,
                              factor_dtype, tuple(bias_fit_ratios))


def _profile_readable(folder: Path, expects_fit: bool = False) -> bool:
    """A valid profile is there; with ``expects_fit``, not one a torchrun build wrote without its bias fit
    (multi-process builds skipped the fit before it moved to rank 0, under the same key)."""
    with contextlib.suppress(ProfileError):
        profile = Profile.load(folder)
        return not (expects_fit and profile.bias_fit is None and profile.meta.get("world_size", 1) > 1)
    return False


def _build_profile(loaded: LoadedModel, decomposition: str, calibration: CalibrationConfig, folder: Path,
                   settings: dict, extra_ratios: tuple[float, ...], ref_ratio: float, measure_scale: bool,
                   options: DecompositionOptions, cache_dir: Path | None, progress: Progress | None,
                   cancel: threading.Event | None, search_batch: int, max_memory: int | None = None,
                   factor_dtype: str = "fp32", bias_fit_ratios: tuple[float, ...] = ()) -> Path:
    """build_profile's work, with the model's lock held."""
    started = time.perf_counter()
    calib_ids, search_ids = calibration_windows(loaded, calibration)
    check_cancel(cancel)
    base = base_of(decomposition)  # rank-dependent methods profile their base spectra
    layers = compressible_layers(loaded.model)
    ctx = distributed.context()
    owned = distributed.owned_layers(layers, ctx)  # None in a single process
    factors = factorizations_for(loaded, calibration, base, options, cache_dir, stage(progress, 0, 0.4), calib_ids,
                                 max_memory=max_memory, factor_dtype=factor_dtype, owned=owned)
    spectra = getattr(factors, "spectra", None) or {n: f.sigma for n, f in factors.items()}
    kl_ref, measured, dense, sweep, floor, nll = None, {}, {}, {}, None, {}
    fit_here = bool(bias_fit_ratios) and measure_scale  # under torchrun: on rank 0, with every layer's factors
    if measure_scale:
        ratios = [ref_ratio, *sorted(set(extra_ratios) - {ref_ratio})]
        sweep, ref = layer_kl_sweep(loaded.model, layers, lambda l: factors[l.name], search_ids, ratios,
                                    batch_size=search_batch, progress=stage(progress, 0.4, 0.9 if fit_here else 1.0),
                                    cancel=cancel, only=owned, nll=nll,
                                    inputs=plan_input_placement(loaded.model, search_ids, max_memory, loaded.device))
        dense = {"search_nll": ref.nll, "search_ppl": ref.ppl}
        floor = {"kl": ref.floor, "reference_precision": ref.precision, "search_windows": int(search_ids.shape[0]),
                 "seq_len": int(search_ids.shape[1])}
    if ctx.world > 1:  # rank 0 merges every rank's layers and writes the one profile
        merged = distributed.merge_at_main(ctx, spectra, {**sweep, **{("nll", r): v for r, v in nll.items()}})
        if fit_here:  # each rank holds only its layers' factors: rank 0 gathers all of them once, for the fit
            complete = _streamed_folder(loaded, calibration, base, options, factor_dtype, cache_dir)
            factors = distributed.gather_factors_at_main(ctx, layers, factors, merged and merged[0], complete,
                                                         factor_dtype, loaded.device)
        if not ctx.main:
            distributed.barrier(ctx)
            return folder
        spectra, both = merged
        sweep = {r: v for r, v in both.items() if not isinstance(r, tuple)}
        nll = {r[1]: v for r, v in both.items() if isinstance(r, tuple)}
    if measure_scale:
        kl_ref = sweep.pop(ref_ratio)
        measured = sweep
        nll.pop(ref_ratio, None)  # kept at the extra points only (ASVD's search points)
    profile = Profile(
        model_source=loaded.source, fingerprint=loaded.fingerprint, decomposition=decomposition,
        calibration=calibration.to_dict(), layers=layers, spectra=spectra,
        ref_ratio=ref_ratio, kl_ref=kl_ref, measured=measured, dense=dense,
        meta={"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "settings": settings,
              "seconds": round(time.perf_counter() - started, 1), "lems_version": __version__,
              "torch": torch.__version__, "device": str(loaded.device),
              "max_memory": max_memory, "world_size": ctx.world},
        kl_floor=floor, measured_nll=nll,
    )
    if fit_here:
        scorer = make_kl_scorer(loaded, factors, search_ids, cancel=cancel, max_memory=max_memory)
        profile.bias_fit = profile_bias_fit(profile, scorer, bias_fit_ratios, progress=stage(progress, 0.9, 1.0))
    profile.save(folder)
    distributed.barrier(ctx)
    if progress:
        progress(1.0, "profile saved")
    return folder


def add_measured_points(
    folder: Path, ratios: tuple[float, ...], device: str | None = None, cache_dir: Path | None = None,
    progress: Progress | None = None, cancel: threading.Event | None = None, search_batch: int = 4,
) -> Profile:
    """Measure more single-layer KL points (e.g. ASVD's 0.4..0.9) into an existing profile.

    Lets a quick profile (reference point only) grow later without recomputing it.
    """
    profile = Profile.load(folder)
    # a point measured before the NLL was recorded is measured again, for ASVD's reference search
    new = sorted(r for r in set(ratios) - {profile.ref_ratio} if r not in profile.measured or r not in profile.measured_nll)
    if not new:
        return profile
    loaded = _profile_loaded(profile, device)
    with hold_model(loaded, cancel, progress):
        loaded, search_ids, factors = _profile_model(profile, device, cache_dir, stage(progress, 0, 0.1))
        nll: dict = {}
        sweep, _ = layer_kl_sweep(loaded.model, profile.layers, lambda l: factors[l.name], search_ids, new,
                                  batch_size=search_batch, progress=stage(progress, 0.1, 1.0), cancel=cancel, nll=nll)
    profile.measured.update(sweep)
    profile.measured_nll.update(nll)
    profile.save(folder)
    return profile


# ------------------------------------------------------------------ per-plan factorisations
def plan_factorizations(loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str, ranks: dict[str, int | None],
                        cache_dir: Path | None = None, progress: Progress | None = None,
                        options: MethodOptions | None = None, max_memory: int | None = None) -> dict[str, Factorization]:
    """Factors to compress with `ranks`: sliced from the static cache, or computed for these ranks.

    Any name of ``decomposition_names()`` works. ``options`` are the method's own
    (DecompositionOptions for a static one, e.g. LcOptions for lcsvd); default: the
    registry's. A rank-dependent method's factors hold only the planned layers.
    ``max_memory`` (bytes for statistics + decomposition) makes a static method's
    factors come from the streamed build under that budget (``factorizations_for``),
    and so the static base of a rank-dependent one (ERC).
    """
    spec = spec_of(decomposition)
    options = spec.options if options is None else options
    if not isinstance(options, type(spec.options)):
        raise TypeError(f"{decomposition} takes {type(spec.options).__name__}, not {type(options).__name__}")
    if not spec.rank_dependent:
        return _planned_static_factors(loaded, cfg, decomposition, options, ranks, cache_dir, progress, max_memory)
    if has_offloaded_weights(loaded.model):
        raise ValueError(f"{decomposition} compresses whole blocks in place and needs the model loaded whole; "
                         "drop --weights-memory / --offload-folder, or use a static decomposition "
                         "(svd, asvd, fwsvd, svd_llm, svd_llm_v2, kfac)")
    return _rank_dependent_factorizations(loaded, cfg, spec, ranks, options, cache_dir, progress, max_memory)


STATISTICS_SHARE = 0.86  # of a static factorisation's progress: statistics, then the decompositions


def _planned_static_factors(loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str,
                            options: DecompositionOptions, ranks: dict[str, int | None], cache_dir: Path | None,
                            progress: Progress | None, max_memory: int | None = None) -> dict[str, Factorization]:
    """A static method's factors of the layers ``ranks`` factorise; the layers it keeps dense get none.

    The whole model's file (``factorizations_for``) serves when it is cached, and for
    streamed builds. Otherwise only the planned layers are decomposed, each cached in a
    file of its own (statistics: ``_decompose_layers``): a first evaluation does not pay
    for the layers its plan keeps dense (122 of 210 for the demo's LEMS @ 0.8), and a
    later plan decomposes only the layers no plan before it did. A layer's factors
    depend on its own weight and statistics alone, so they are the ones the whole-model
    file holds. A memory budget (``max_memory``) takes the streamed build, which reads
    the factors back a layer at a time.
    """
    layers = compressible_layers(loaded.model)
    key = key_of(loaded.fingerprint, statistics_key(cfg), decomposition, _options_dict(options))
    if max_memory is not None or (tensor_path("factors", key, cache_dir).is_file() or has_offloaded_weights(loaded.model)
                                  or not _grams_fit(loaded, layers, decomposition, options)):
        return factorizations_for(loaded, cfg, decomposition, options, cache_dir=cache_dir, progress=progress,
                                  max_memory=max_memory)
    planned = [l for l in layers if l.name in ranks and not is_dense_rank(l, ranks[l.name])]
    factors, missing = {}, []
    for layer in planned:
        stored = load_tensors(_layer_factors_path(key, layer.name, cache_dir))
        if stored is None:
            missing.append(layer)
        else:
            factors.update(_factors_from_tensors(stored, [layer.name], loaded.device))
    if missing:
        factors.update(_decompose_layers(loaded, cfg, decomposition, options, missing, key, cache_dir, progress))
    return factors


_SUBSET_PASSES: set[str] = set()  # (model, calibration) keys that had their one plan-only statistics pass


def _decompose_layers(loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str, options: DecompositionOptions,
                      layers: list[LayerInfo], key: str, cache_dir: Path | None,
                      progress: Progress | None) -> dict[str, Factorization]:
    """Statistics, then ``layers``' factors, each saved as it is made.

    The statistics are the whole model's (read from the cache, or computed and cached)
    except once per model and calibration in a process, for KFAC: when ``layers`` are
    at most half the model and nothing is cached, the Grams of ``layers`` alone are
    formed (two thirds of a first evaluation's arithmetic is Grams; a layer's
    statistics do not depend on which others are collected). A later plan with other
    layers then computes and caches the whole model's, so no plan sequence runs more
    than one extra pass.
    """
    calib_ids = None
    if spec_of(decomposition).needs:
        if progress:
            progress(0.0, "sampling the calibration windows")
        calib_ids, _ = calibration_windows(loaded, cfg)
    base = (loaded.fingerprint, statistics_key(cfg))
    if (spec_of(decomposition).needs == {"inputs", "grads"} and 2 * len(layers) <= len(compressible_layers(loaded.model))
            and key_of(*base) not in _SUBSET_PASSES and _both_missing(base, cache_dir)):
        _SUBSET_PASSES.add(key_of(*base))
        inputs: dict[str, InputStats] = {}
        grads = collect_grad_grams(loaded.model, calib_ids, layers, progress=stage(progress, 0, STATISTICS_SHARE),
                                   inputs=inputs)
        stats = Statistics(inputs=inputs, grad_gram=grads)
    else:
        stats = statistics_for(loaded, calib_ids, cfg, decomposition, cache_dir, stage(progress, 0, STATISTICS_SHARE))
    out = {}
    for i, (layer, factors) in enumerate(_decomposed(loaded, layers, stats, Decomposer(decomposition, options))):
        out[layer.name] = factors
        save_tensors(_layer_factors_path(key, layer.name, cache_dir), _factors_to_tensors({layer.name: out[layer.name]}),
                     {"decomposition": decomposition, "layer": layer.name})
        if progress:
            progress(STATISTICS_SHARE + (1 - STATISTICS_SHARE) * (i + 1) / len(layers),
                     f"decomposing the plan's layers: {i + 1}/{len(layers)} ({layer.name})")
    return out


def _layer_factors_path(key: str, name: str, cache_dir: Path | None) -> Path:
    """One layer's factors under the whole-model key ``key`` (``_planned_static_factors``)."""
    return tensor_path("layer-factors", key_of(key, name), cache_dir)


def _rank_dependent_factorizations(loaded: LoadedModel, cfg: CalibrationConfig, spec: DecompositionSpec, ranks: dict,
                                   options: MethodOptions, cache_dir: Path | None,
                                   progress: Progress | None, max_memory: int | None = None) -> dict[str, Factorization]:
    """A rank-dependent method's factors for ``ranks``, cached as one safetensors file per plan.

    Key: model fingerprint, calibration config, method, its options' ``to_dict()`` and
    the plan's ranks. The base's static factors are computed (or read from their
    cache) first when the spec asks for them (ERC).
    """
    plan = {name: (None if r is None else int(r)) for name, r in sorted(ranks.items())}
    path = tensor_path("factors", key_of(loaded.fingerprint, cfg.to_dict(), spec.name, options.to_dict(), plan), cache_dir)
    stored = load_tensors(path)
    if stored is not None:
        return _factors_from_tensors(stored, dict.fromkeys(k.rsplit(".", 1)[0] for k in stored), loaded.device)
    calib_ids, _ = calibration_windows(loaded, cfg)
    base = None
    if spec.base_factors:
        base = factorizations_for(loaded, cfg, spec.base, cache_dir=cache_dir, progress=stage(progress, 0, 0.8),
                                  calib_ids=calib_ids, max_memory=max_memory)
        progress = stage(progress, 0.8, 1.0)
    factors = spec.factorizations(loaded.model, ranks, calib_ids, options, base, progress)
    save_tensors(path, _factors_to_tensors(factors), {"decomposition": spec.name})
    return factors


# ------------------------------------------------------------------ compression + evaluation
@contextlib.contextmanager
def compressed(loaded: LoadedModel, ranks: dict[str, int | None], factors: dict[str, Factorization]) -> Iterator[dict]:
    """Compress the cached model in place for the duration of a `with` block, then restore it.

    Holds the model's lock (re-entrant) throughout, so no other job runs it meanwhile.
    """
    with hold_model(loaded):
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

    def to_dict(self) -> dict:
        return asdict(self)


def dense_perplexity(loaded: LoadedModel, dataset: str, seq_len: int, max_windows: int | None,
                     cache_dir: Path | None = None, cancel: threading.Event | None = None,
                     split: str | None = None) -> float:
    """Dense-model perplexity on a dataset's evaluation split, cached in the index."""
    split = split or evaluation_split(dataset)
    key = f"dense-ppl:{key_of(loaded.fingerprint, dataset, split, seq_len, max_windows)}"
    store = index(cache_dir)
    cached = store.get(key)  # a corrupt row reads as missing
    if isinstance(cached, (int, float)) and not isinstance(cached, bool):
        return float(cached)
    value = shipped_dense_perplexity(loaded, dataset, split, seq_len, max_windows)
    if value is None:
        text, _ = load_text(dataset, split)
        value = perplexity(loaded.model, token_windows(loaded.tokenizer, text, seq_len, max_windows), cancel=cancel).ppl
    store[key] = value
    return value


SHIPPED_DENSE_PPL = "dense_ppl.json"  # in cache/demo: {"schema", "note", "entries": [{fingerprint, dataset, ...}]}


def shipped_dense_perplexity(loaded: LoadedModel, dataset: str, split: str, seq_len: int,
                             max_windows: int | None) -> float | None:
    """The demo's dense perplexity shipped in ``cache/demo/dense_ppl.json``, or None.

    A first evaluation on a fresh clone would spend a dense pass on a number every
    CPU computes the same (float32, the same bits with any thread count); the file
    holds it for the demo model's protocols (``bench/first_run.py --ship-dense-ppl``
    writes it). Used only for a model on the CPU in float32 with the same fingerprint,
    dataset, split, window length and window cap; an unreadable file is ignored.
    """
    from .cache import DEMO_DIR

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


DENSE_PPL_FIELDS = ("fingerprint", "dataset", "split", "seq_len", "max_windows")


def evaluate_plan(
    plan,
    datasets: list[str],
    max_windows: int | None = REFERENCE_EVAL.max_windows,
    seq_len: int = REFERENCE_EVAL.seq_len,
    device: str | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    cache_dir: Path | None = None,
    calibration: CalibrationConfig | None = None,
    with_kl: bool = True,
    decomposition: str | None = None,
    tasks: list[str] | tuple[str, ...] = (),
    task_limit: int | None = None,
    offload: OffloadSpec | None = None,
    max_memory: int | None = None,
) -> EvalResult:
    """Compress the plan's model with the plan, measure perplexity (and KL), restore the model.

    ``tasks`` (lm-eval names or local task YAMLs, see ``zero_shot``) add zero-shot
    acc / acc_norm of the compressed and the dense model, ``task_limit`` documents per task.
    ``offload`` loads the model partly on CPU RAM / disk with accelerate (``offload.py``);
    factorisation, perplexity and KL then run with about one block's weights on the device.
    ``max_memory`` (bytes) bounds statistics + decomposition (the streamed build, as
    ``profile --max-memory``) and where the dense reference logits of the KL wait
    (device, CPU RAM or disk, ``reference_logits``); default: what the device has.

    The plan must be for the loaded model (fingerprint check). Factorisations use
    the calibration config recorded in the plan (or `calibration`) and the plan's
    decomposition, or `decomposition` (any of ``decomposition_names()``: rank-dependent
    ones are computed for the plan's ranks); the result records the one used.
    The defaults are the reference protocol (2048-token windows, all of them);
    ``settings["protocol"]`` and ``settings["splits"]`` record what was measured.
    """
    started = time.perf_counter()
    decomposition = check_decomposition(decomposition or plan.decomposition)
    _check_eval_sizes(seq_len, max_windows)
    loaded_tasks = load_tasks(list(tasks)) if tasks else None  # unreachable hub data fails before the model loads
    if progress:  # above 0, so the bar shows the job has started during a load that may take a minute
        progress(LOADING_REPORTED, f"loading the model {plan.model_source}")
    loaded = get_model(plan.model_source, device, offload)
    if progress:
        progress(EVAL_WEIGHTS["model load"], "model loaded")
        progress = stage(progress, EVAL_WEIGHTS["model load"], 1.0)
    if plan.fingerprint != loaded.fingerprint:
        raise ValueError(f"Plan is for model {plan.fingerprint}, but {plan.model_source} loads as {loaded.fingerprint}")
    check_plan_layers(plan, compressible_layers(loaded.model))
    cfg = calibration or CalibrationConfig.from_dict(plan.meta.get("calibration") or {})
    if tasks:
        _check_hf_tokenizer(loaded.tokenizer)
    with hold_model(loaded, cancel, progress):
        if not tasks:
            return _evaluate_plan(plan, loaded, cfg, decomposition, datasets, max_windows, seq_len, progress, cancel,
                                  cache_dir, with_kl, started, max_memory)
        result = _evaluate_plan(plan, loaded, cfg, decomposition, datasets, max_windows, seq_len,
                                stage(progress, 0, 0.4), cancel, cache_dir, with_kl, started, max_memory)
        dense, scores = plan_zero_shot(plan, loaded, cfg, decomposition, list(tasks), task_limit, cache_dir,
                                       stage(progress, 0.4, 1.0), cancel, loaded_tasks, max_memory)
        result.zero_shot, result.dense_zero_shot = scores.to_dict(), dense.to_dict()
        result.seconds = round(time.perf_counter() - started, 1)
        return result


def plan_zero_shot(plan, loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str, tasks: list[str],
                   limit: int | None = None, cache_dir: Path | None = None, progress: Progress | None = None,
                   cancel: threading.Event | None = None, loaded_tasks: dict | None = None,
                   max_memory: int | None = None) -> tuple[ZeroShotResult, ZeroShotResult]:
    """(dense, compressed) zero-shot scores of ``plan`` on ``tasks``; the caller holds the model's lock.

    ``loaded_tasks`` are ``load_tasks(tasks)`` (loaded here when not given); the factors
    come from the cache ``_evaluate_plan`` just filled.
    """
    _check_hf_tokenizer(loaded.tokenizer)
    loaded_tasks = loaded_tasks or load_tasks(tasks)
    dense = dense_zero_shot(loaded, tasks, limit, cache_dir, stage(progress, 0, 0.45), cancel, loaded_tasks)
    factors = plan_factorizations(loaded, cfg, decomposition, plan.ranks(), cache_dir, max_memory=max_memory)
    with compressed(loaded, plan.ranks(), factors):
        scores = zero_shot(loaded.model, loaded.tokenizer, tasks, limit, progress=stage(progress, 0.45, 1.0),
                           cancel=cancel, tasks=loaded_tasks)
    return dense, scores


def _check_hf_tokenizer(tokenizer) -> None:
    """lm-eval's HFLM tokenises with a Hugging Face tokenizer; anything else is refused with this message."""
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ValueError(f"zero-shot evaluation needs a Hugging Face tokenizer, this model has {type(tokenizer).__name__}")


def dense_zero_shot(loaded: LoadedModel, tasks: list[str], limit: int | None = None, cache_dir: Path | None = None,
                    progress: Progress | None = None, cancel: threading.Event | None = None,
                    loaded_tasks: dict | None = None) -> ZeroShotResult:
    """Dense-model zero-shot scores, each task cached in the index (key: model, task + its local files, limit)."""
    store = index(cache_dir)
    keys = {spec: f"dense-zero-shot:{key_of(loaded.fingerprint, tasks_key([spec]), limit)}" for spec in tasks}
    cached = {}
    for spec, key in keys.items():
        with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):  # a corrupt row reads as missing
            cached[spec] = ZeroShotResult.from_dict(store.get(key))
    missing = [spec for spec in tasks if spec not in cached]
    if missing:
        fresh = zero_shot(loaded.model, loaded.tokenizer, missing, limit, progress=progress, cancel=cancel,
                          tasks=loaded_tasks)
        for spec, (name, score) in zip(missing, fresh.tasks.items()):
            cached[spec] = ZeroShotResult({name: score}, fresh.settings | {"tasks": [spec]})
            store[keys[spec]] = cached[spec].to_dict()
    merged = {name: score for spec in tasks for name, score in cached[spec].tasks.items()}
    return ZeroShotResult(merged, {"tasks": list(tasks), "num_fewshot": 0, "limit": limit})


def _check_eval_sizes(seq_len: int, max_windows: int | None) -> None:
    """Perplexity needs at least one window of at least two tokens (0 windows gave ppl = inf)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive integer or None (all windows), got {max_windows!r}")


# Shares of the progress bar, from a first evaluation of the demo's LEMS @ 0.8 plan with the quick protocol
# (bench/first_run.py: load 26 s, statistics 106 s, decompositions 16 s, KL 10 s, perplexity 18 s; the demo's
# dense perplexity is shipped). Cached steps then just go by, and the time estimate
# (``jobs.JobState.seconds_left``) adapts.
EVAL_WEIGHTS = {"model load": 0.14, "factorising the plan's layers": 0.68, "KL reference": 0.03, "dense perplexity": 0.02,
                "compression": 0.0, "perplexity": 0.1, "KL": 0.03}
LOADING_REPORTED = 0.01  # the fraction reported as the model load starts: under EVAL_WEIGHTS["model load"]


class _EvalSteps:
    """Hands out consecutive parts of the bar (``stage``) for _evaluate_plan's steps, each announced by its message."""

    def __init__(self, progress: Progress | None, datasets: int, with_kl: bool):
        w = EVAL_WEIGHTS
        parts = [w["factorising the plan's layers"]] + ([w["KL reference"]] if with_kl else [])
        parts += [w["dense perplexity"] / max(datasets, 1)] * datasets + [w["compression"]]
        parts += [w["perplexity"] / max(datasets, 1)] * datasets + ([w["KL"]] if with_kl else [])
        total = sum(parts)
        self._bounds = np.cumsum([0.0] + [p / total for p in parts])
        self._progress, self._k = progress, 0

    def next(self, message: str) -> Progress | None:
        """The next step's part of the bar; reports its start with ``message``."""
        lo, hi = self._bounds[self._k], self._bounds[min(self._k + 1, len(self._bounds) - 1)]
        self._k += 1
        if self._progress is None:
            return None
        self._progress(float(lo), message)
        return stage(self._progress, float(lo), float(hi))


def _evaluate_plan(plan, loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str, datasets: list[str],
                   max_windows: int | None, seq_len: int, progress: Progress | None, cancel: threading.Event | None,
                   cache_dir: Path | None, with_kl: bool, started: float, max_memory: int | None = None) -> EvalResult:
    """evaluate_plan's work, with the model's lock held (no other job can see the compressed weights)."""
    ranks = plan.ranks()
    steps = _EvalSteps(progress, len(datasets), with_kl)
    factors = plan_factorizations(loaded, cfg, decomposition, ranks, cache_dir, steps.next("factorising the plan's layers"),
                                  max_memory=max_memory)
    kl = None
    ppl, dense_ppl = {}, {}
    ref_logits, search_ids = None, None
    if with_kl:
        steps.next("KL: the dense model's logits on the search windows")
        _, search_ids = calibration_windows(loaded, cfg)
        ref_logits = reference_logits(loaded, search_ids, max_memory)
    splits = {ds: evaluation_split(ds) for ds in datasets}
    for i, ds in enumerate(datasets):
        steps.next(f"dense perplexity on {ds} (cached after the first evaluation)")
        dense_ppl[ds] = dense_perplexity(loaded, ds, seq_len, max_windows, cache_dir, cancel, split=splits[ds])
    planned = sum(not is_dense_rank(l, ranks[l.name]) for l in compressible_layers(loaded.model) if l.name in ranks)
    steps.next(f"compressing the model: {planned} layers factorised")
    with compressed(loaded, ranks, factors):
        for i, ds in enumerate(datasets):
            check_cancel(cancel)
            text, _ = load_text(ds, splits[ds])
            windows = token_windows(loaded.tokenizer, text, seq_len, max_windows)
            ppl[ds] = perplexity(loaded.model, windows, progress=steps.next(f"perplexity on {ds}"), cancel=cancel).ppl
        if with_kl:
            steps.next("KL on the search windows")
            kl = kl_to_reference(loaded.model, search_ids, ref_logits, cancel=cancel)
    summary = plan.summary
    return EvalResult(
        method=plan.method, decomposition=decomposition, budget=plan.budget,
        realised_ratio=summary["realised_ratio"], ppl=ppl, dense_ppl=dense_ppl, kl=kl,
        params_kept=summary["params_kept"], params_total=summary["params_total"],
        seconds=round(time.perf_counter() - started, 1), device=str(loaded.device),
        model_source=plan.model_source, fingerprint=plan.fingerprint,
        settings={"seq_len": seq_len, "max_windows": max_windows, "calibration": cfg.to_dict(),
                  "plan_decomposition": plan.decomposition,
                  "protocol": EvalProtocol(seq_len, max_windows).to_dict(), "splits": splits},
        ranks=dict(ranks),
    )


def make_kl_scorer(loaded: LoadedModel, factors: dict[str, Factorization], search_ids: torch.Tensor,
                   cancel: threading.Event | None = None, max_memory: int | None = None) -> Callable[[dict], float]:
    """score_fn(ranks) = KL(dense || compressed) on the search windows (LEMS bias fit, §1.3).

    Each call holds the model's lock, so scores from concurrent jobs never mix weights.
    The dense logits are kept in float32 when they fit in ``LOG_PROB_CACHE_BYTES`` (no
    bf16 KL floor, see sensitivity.py), else in bf16 as the reference; on the CPU when
    they do not fit ``max_memory`` (``reference_logits``).
    """
    with hold_model(loaded, cancel):
        ref_logits = reference_logits(loaded, search_ids, max_memory)

    def score(ranks: dict[str, int | None]) -> float:
        with hold_model(loaded, cancel), compressed(loaded, ranks, factors):
            return kl_to_reference(loaded.model, search_ids, ref_logits, cancel=cancel)
    return score


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


def make_ppl_scorer(loaded: LoadedModel, factors: dict[str, Factorization], search_ids: torch.Tensor,
                    cancel: threading.Event | None = None) -> Callable[[dict], float]:
    """score_fn(ranks) = perplexity on the search windows (ATP's grid search, §4.5); holds the model's lock."""
    def score(ranks: dict[str, int | None]) -> float:
        with hold_model(loaded, cancel), compressed(loaded, ranks, factors):
            return perplexity(loaded.model, search_ids, cancel=cancel).ppl
    return score


def _profile_model(profile: Profile, device: str | None, cache_dir: Path | None, progress: Progress | None = None):
    """(loaded model, search windows, static factors) of a profile; the model must match its fingerprint.

    A rank-dependent decomposition's profile gets its base whitening's factors.
    """
    loaded = _profile_loaded(profile, device)
    cfg = CalibrationConfig.from_dict(profile.calibration)
    with hold_model(loaded):
        _, search_ids = calibration_windows(loaded, cfg)
        base = base_of(profile.decomposition)
        return loaded, search_ids, factorizations_for(loaded, cfg, base, cache_dir=cache_dir, progress=progress)


def _profile_loaded(profile: Profile, device: str | None) -> LoadedModel:
    """The profile's model (its own source, never one named by a plan); it must match the fingerprint."""
    loaded = get_model(profile.model_source, device)
    if loaded.fingerprint != profile.fingerprint:
        raise ValueError(f"profile is for model {profile.fingerprint}, {profile.model_source} loads as {loaded.fingerprint}")
    return loaded


# ------------------------------------------------------------------ model-scored allocators
def score_function(profile: Profile, kind: str, device: str | None = None, cache_dir: Path | None = None,
                   cancel: threading.Event | None = None) -> Callable[[dict], float]:
    """score_fn(ranks) on the profile's search windows: ``kind`` "kl" or "ppl" (loads the profile's model).

    Candidates are compressed with the profile's static factors (the base whitening for
    a rank-dependent decomposition: refactorising every candidate would be far too slow).
    """
    if kind not in ("kl", "ppl"):
        raise ValueError(f"score kind must be 'kl' or 'ppl', got {kind!r}")
    loaded, search, factors = _profile_model(profile, device, cache_dir)
    return (make_ppl_scorer if kind == "ppl" else make_kl_scorer)(loaded, factors, search, cancel=cancel)


def allocate_on_model(profile: Profile, method: str, budget: float, params=None, device: str | None = None,
                      cache_dir: Path | None = None, progress: Progress | None = None,
                      cancel: threading.Event | None = None):
    """Allocation of a model-scored allocator (MODEL_SCORED: atp, erc_plc, lcsvd_search) at ``budget``.

    Builds the scorer of the method's kind (``score_function``) and reports each scored
    candidate through ``progress`` (the allocators do not know how many they will score).
    """
    key = method.strip().lower().replace("-", "_")
    if key not in MODEL_SCORED:
        raise ValueError(f"{method!r} is not a model-scored allocator; those are: {', '.join(MODEL_SCORED)}")
    if progress:
        progress(0.0, f"{key}: loading the model and scorer")
    score = score_function(profile, MODEL_SCORED[key], device, cache_dir, cancel)
    count = 0

    def counted(ranks: dict) -> float:
        nonlocal count
        check_cancel(cancel)
        value = score(ranks)
        count += 1
        if progress:
            progress(count / (count + 10), f"{key} @ {budget:g}: scored {count} candidate(s)")
        return value
    return allocate(profile, key, budget, params=params, score_fn=counted)


@dataclass(frozen=True)
class PlanRequest:
    """A plan still to be built inside a background job: allocator ``method`` at kept fraction ``budget``."""

    method: str
    budget: float


def plan_for_profile(plan, profile: Profile):
    """(plan, calibration) to evaluate a plan that came from outside (upload, saved file) on ``profile``'s model.

    Nothing the plan names is opened as given: it must be for the profile's model
    (fingerprint) and cover exactly its layers; the model is the profile's own source;
    the calibration is the profile's when the plan carries the same config, else the
    plan's resolved by dataset *name* (``calibration.untrusted_calibration``).
    Raises PlanError / ValueError with the reason.
    """
    from .calibration import untrusted_calibration
    from .plan import PlanError

    if plan.fingerprint != profile.fingerprint:
        raise PlanError(f"plan is for model {plan.fingerprint!r}, the chosen profile's model is {profile.fingerprint!r}")
    check_plan_layers(plan, profile.layers)
    stored = plan.meta.get("calibration")
    if not stored or stored == profile.calibration:
        calibration = CalibrationConfig.from_dict(profile.calibration)
    else:
        calibration = untrusted_calibration(stored)
    return dataclasses.replace(plan, model_source=profile.model_source), calibration


def evaluate_and_store(item, progress: Progress | None = None, cancel: threading.Event | None = None, *,
                       profile: Profile, cache_dir: Path | None = None, params=None, decomposition: str | None = None,
                       device: str | None = None, **options) -> dict:
    """One item of the app's evaluation job: a RankPlan, or a PlanRequest solved here on the model first.

    The plan is evaluated (factorised with ``decomposition`` or its own, calibration from
    the plan, else the profile's) and the result is added to the ResultStore of ``cache_dir``.
    Returns the result's dict, or {"method", "budget", "error"} for a request that could
    not be allocated (a ValueError such as an infeasible budget), so the other items still run.
    """
    from .results import ResultStore

    if progress:  # the first report, before anything slow (a model load can take a minute)
        progress(LOADING_REPORTED, f"loading the model {profile.model_source}")
    if isinstance(item, PlanRequest):
        try:
            alloc = allocate_on_model(profile, item.method, item.budget, params, device, cache_dir,
                                      stage(progress, 0, 0.5), cancel)
        except ValueError as exc:  # e.g. no feasible candidate at this budget: skip it, keep the job going
            return {"method": item.method, "budget": item.budget, "error": str(exc)}
        item = alloc.to_plan(profile, meta={"calibration": profile.calibration})
        progress = stage(progress, 0.5, 1.0)
    item, calibration = plan_for_profile(item, profile)
    with free_core_threads():
        result = evaluate_plan(item, progress=progress, cancel=cancel, calibration=calibration, device=device,
                               cache_dir=cache_dir, decomposition=decomposition, **options)
    ResultStore(cache_dir).add(result)
    return result.to_dict()


@contextlib.contextmanager
def free_core_threads() -> Iterator[int]:
    """Run a background job with as many intra-op threads as the load average leaves cores free
    (at least one, at most torch's setting); restored afterwards. Yields the count.

    On a machine busy with other work, OpenMP threads wait on each other at every
    barrier: with another job on this 2-core machine (load 4.5), a 512-token forward of
    the demo took 11 s with two threads and 2.2 s with one, and its KFAC statistics
    3.5x longer. The thread count does not change the numbers (the demo's statistics
    and logits are the same bits with one and two threads; bench/first_run.py).
    """
    before = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform: leave it as it is
        load = 0.0
    threads = max(1, min(before, round((os.cpu_count() or 1) - load)))
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


__all__ = ["build_profile", "evaluate_plan", "EvalResult", "factorizations_for", "statistics_for", "get_model",
           "compressed", "make_kl_scorer", "make_ppl_scorer", "Cancelled", "calibration_windows", "plan_factorizations",
           "decomposition_names", "check_decomposition", "score_function", "allocate_on_model", "PlanRequest",
           "evaluate_and_store", "hold_model", "model_lock", "plan_for_profile"]


# ------------------------------------------------------------------ ARS training (allocators/ars/)
def _profile_options(profile: Profile) -> DecompositionOptions:
    """The decomposition options a profile was built with (stored as strings), or the defaults."""
    stored = (profile.meta.get("settings") or {}).get("options") or {}
    values = {}
    for f in fields(DecompositionOptions):
        if f.name not in stored:
            continue
        raw = stored[f.name]
        if f.name == "dtype":
            values[f.name] = getattr(torch, str(raw).rsplit(".", 1)[-1])
        elif isinstance(getattr(DecompositionOptions, f.name), float):
            values[f.name] = float(raw)
        else:
            values[f.name] = str(raw)
    return DecompositionOptions(**values)


def calibration_ids(loaded: LoadedModel, profile: Profile) -> torch.Tensor:
    """The profile's calibration windows (the same ones its statistics came from)."""
    calib, _ = calibration_windows(loaded, CalibrationConfig.from_dict(profile.calibration))
    return calib


def full_factorizations(loaded: LoadedModel, profile: Profile, calib_ids: torch.Tensor,
                        cache_dir: Path | None = None, progress: Progress | None = None) -> dict[str, Factorization]:
    """All min(m, n) components of every layer under the profile's decomposition.

    The statistics come from the cache (computed there if missing); the factors
    themselves are not cached: they are ~2x the model's Linear weights, and a trained
    ARS result is cached instead. Rank-dependent methods use their base whitening, as
    their profiles do.
    """
    method = BASE_DECOMPOSITION.get(profile.decomposition, profile.decomposition)
    cfg = CalibrationConfig.from_dict(profile.calibration)
    stats = statistics_for(loaded, calib_ids, cfg, method, cache_dir, stage(progress, 0, 0.5))
    decomposer = Decomposer(method, _profile_options(profile))
    out = {}
    for i, l in enumerate(profile.layers):
        weight = loaded.model.get_submodule(l.name).weight
        out[l.name] = decomposer(l, weight, stats.inputs.get(l.name), stats.grad_gram.get(l.name),
                                 stats.fisher.get(l.name), keep=min(l.out_features, l.in_features))
        if progress:
            progress(0.5 + 0.5 * (i + 1) / len(profile.layers), f"full factors {i + 1}/{len(profile.layers)}")
    return out


def train_ars(
    loaded: LoadedModel,
    profile: Profile,
    ratio: float,
    config: ars.ARSConfig | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    factors: dict[str, Factorization] | None = None,
    windows: torch.Tensor | None = None,
    force: bool = False,
) -> Allocation:
    """Train ARS for ``profile`` at kept fraction ``ratio`` (cached: a repeat returns at once).

    Runs on the model's device. ``factors`` (full, see ``full_factorizations``) and
    ``windows`` (calibration token ids) default to the profile's own; pass them only
    if they are exactly those (tests, callers that already hold them), since they are
    not part of the cache key.
    """
    config = config or ars.PRESETS["reference"]
    if not force:
        plan = ars.cached_ars_plan(profile, ratio, config, cache_dir)
        if plan is not None:
            return ars.allocation_from_plan(plan, ratio)
    started = time.perf_counter()
    windows = calibration_ids(loaded, profile) if windows is None else windows
    check_cancel(cancel)
    if factors is None:
        factors = full_factorizations(loaded, profile, windows, cache_dir, stage(progress, 0.0, 0.15))
    return ars.train_ars_on(loaded, profile, ratio, windows, factors, config, cache_dir, stage(progress, 0.15, 1.0),
                            cancel, factor_seconds=time.perf_counter() - started)


def run_ars_job(profile_folder: str | Path, ratios: list[float], preset_name: str = "cpu-small",
                device: str | None = None, cache_dir: Path | None = None,
                progress: Progress | None = None, cancel: threading.Event | None = None) -> list[dict]:
    """Load the profile's model and train every ratio in turn; returns the plans as dicts.

    The function the app submits as a background job (see ``launch_ars_training``)
    and the CLI runs in the foreground.
    """
    profile = Profile.load(profile_folder)
    loaded = get_model(profile.model_source, device)
    config = ars.preset(preset_name)
    plans = []
    with hold_model(loaded, cancel, progress):  # training swaps the model's Linears in place
        for i, ratio in enumerate(ratios):
            alloc = train_ars(loaded, profile, ratio, config, cache_dir,
                              stage(progress, i / len(ratios), (i + 1) / len(ratios)), cancel)
            plans.append(ars.allocation_to_plan(profile, alloc).to_dict())
    return plans


def launch_ars_training(registry, profile_folder: str | Path, ratios: list[float], preset_name: str = "cpu-small",
                        device: str | None = None, cache_dir: Path | None = None):
    """Start ARS training as a background job of a ``jobs.JobRegistry`` (meta kind "ars").

    Training swaps the shared model's Linears in place for its duration (restored on
    exit, cancel or error), like ``compressed``; it holds the model's lock
    (``hold_model``), so other jobs on the same model wait for it.
    """
    label = ", ".join(f"{r:g}" for r in ratios)
    return registry.submit(f"ARS training ({preset_name}) at {label}", run_ars_job, str(profile_folder),
                           list(ratios), preset_name, device, cache_dir,
                           meta={"kind": "ars", "profile": str(profile_folder), "ratios": list(ratios),
                                 "preset": preset_name})
