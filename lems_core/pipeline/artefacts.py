"""The expensive artefacts of a model and calibration, with their cache: statistics and factorisations.

Each artefact is keyed by what it was computed from (model fingerprint, calibration
config, decomposition and its options) and stored as safetensors; a corrupt or missing
entry is recomputed, never trusted.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import torch

from .. import distributed
from ..cache import key_of, load_tensors, save_tensors, tensor_path
from ..calibration import SEARCH_SEED_OFFSET, CalibrationConfig, sample_windows
from ..data import load_text
from ..decompositions import DecompositionOptions, Decomposer, Factorization, base_of, spec_of
from ..decompositions.base import single_threaded_lapack
from ..memory import available_memory, grad_gram_bytes, input_gram_bytes, process_overhead, release_freed_memory
from ..model import LayerInfo, LoadedModel, compressible_layers
from ..offload import has_offloaded_weights
from ..profile import Profile
from ..run import DEFAULT_RUN, Run
from ..statistics import (INPUT_GROUP, InputStats, Statistics, collect_fisher_rows, collect_grad_grams,
                          collect_kfac_statistics, iter_block_input_stats)
from ..streaming import decomposition_workspace, plan_stream, streamed_dir, streamed_factorizations
from . import models
from .models import hold_model


def calibration_windows(loaded: LoadedModel, cfg: CalibrationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, search windows) of ``cfg``, tokenised by the model's tokenizer."""
    text, _ = load_text(cfg.dataset, cfg.split)
    calib = sample_windows(loaded.tokenizer, text, cfg.n_samples, cfg.seq_len, cfg.seed, cfg.sampling)
    search = sample_windows(loaded.tokenizer, text, cfg.n_search, cfg.seq_len, cfg.seed + SEARCH_SEED_OFFSET,
                            cfg.sampling)
    return calib, search


# ------------------------------------------------------------------ statistics
def statistics_key(cfg: CalibrationConfig) -> dict:
    """The calibration fields statistics depend on (the search-set size does not matter)."""
    return {k: v for k, v in cfg.to_dict().items() if k != "n_search"}


def statistics_for(loaded: LoadedModel, calib_ids: torch.Tensor, cfg: CalibrationConfig, decomposition: str, *,
                   run: Run = DEFAULT_RUN) -> Statistics:
    """The statistics a decomposition needs, from the cache of ``run`` or computed now (and cached)."""
    layers = compressible_layers(loaded.model)
    needs = spec_of(decomposition).needs
    base = (loaded.fingerprint, statistics_key(cfg))
    if needs == {"inputs", "grads"} and statistics_missing(base, run.cache_dir):
        # KFAC from scratch: the input statistics come from the gradient pass's forward passes.
        stats = collect_kfac_statistics(loaded.model, calib_ids, layers, progress=run.progress)
        save_tensors(_stats_path("inputs", base, run), _input_stats_to_tensors(stats.inputs, layers))
        save_tensors(_stats_path("grads", base, run), stats.grad_gram)
        return stats
    stats = Statistics()
    if "inputs" in needs:
        stats.inputs = _cached_input_stats(loaded, calib_ids, layers, base, run.stage(0, 0.5))
    if "grads" in needs:
        stats.grad_gram = _cached_tensors(_stats_path("grads", base, run), lambda: collect_grad_grams(
            loaded.model, calib_ids, layers, progress=run.stage(0.5, 1).progress))
    if "fisher" in needs:
        stats.fisher = _cached_tensors(_stats_path("fisher", base, run), lambda: collect_fisher_rows(
            loaded.model, calib_ids, layers, progress=run.stage(0, 1).progress))
    return stats


def statistics_missing(base: tuple, cache_dir: Path | None) -> bool:
    """Whether neither the input nor the gradient statistics of ``base`` (fingerprint, statistics key) are cached."""
    return not any(tensor_path(kind, key_of(*base, kind), cache_dir).is_file() for kind in ("inputs", "grads"))


def _stats_path(kind: str, base: tuple, run: Run) -> Path:
    return tensor_path(kind, key_of(*base, kind), run.cache_dir)


def _cached_input_stats(loaded: LoadedModel, calib_ids: torch.Tensor, layers: list[LayerInfo], base: tuple,
                        run: Run) -> dict[str, InputStats]:
    """Every layer's input statistics, read from the cache or computed block by block and cached."""
    path = _stats_path("inputs", base, run)
    cached = load_tensors(path)
    if cached is not None:
        return _input_stats_from_tensors(cached, layers)
    computed = {}
    for _, block_stats in iter_block_input_stats(loaded.model, calib_ids, progress=run.progress):
        computed.update(block_stats)
    save_tensors(path, _input_stats_to_tensors(computed, layers))
    return computed


def _input_stats_to_tensors(stats: dict[str, InputStats], layers: list[LayerInfo]) -> dict[str, torch.Tensor]:
    """One entry set per shared input (q/k/v, gate/up read the same one), the cache format of input statistics."""
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


def _cached_tensors(path: Path, compute: Callable[[], dict]) -> dict:
    """The tensors saved at ``path``, else ``compute()`` saved there (a corrupt file counts as missing)."""
    tensors = load_tensors(path)
    if not tensors:
        tensors = compute()
        save_tensors(path, tensors)
    return tensors


# ------------------------------------------------------------------ factorisations
def factorizations_for(
    loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str, options: DecompositionOptions | None = None,
    calib_ids: torch.Tensor | None = None, owned: set[str] | None = None, *, run: Run = DEFAULT_RUN,
) -> dict[str, Factorization]:
    """Every layer's Factorization (cached as one safetensors file per model/config/method).

    With ``run.max_memory`` (bytes for statistics + decomposition), or when the model's
    Grams would not fit what the device has, for one rank's ``owned`` layers, or for a
    model with offloaded weights, the streamed path runs instead (``streaming.py``):
    windows of blocks, Grams freed per layer, factors on disk per block in
    ``run.factor_dtype`` (a read-only Mapping).
    """
    options = options or DecompositionOptions()
    layers = compressible_layers(loaded.model)
    if (run.max_memory is not None or owned is not None or has_offloaded_weights(loaded.model)
            or not grams_fit(loaded, layers, decomposition, options)):
        calib_ids = _needed_windows(loaded, cfg, decomposition, calib_ids)
        return _streamed(loaded, cfg, decomposition, options, calib_ids, owned, run)
    path = tensor_path("factors", whole_model_key(loaded, cfg, decomposition, options), run.cache_dir)
    cached = load_tensors(path)
    if cached is not None:
        return factors_from_tensors(cached, [l.name for l in layers], loaded.device)
    calib_ids = _needed_windows(loaded, cfg, decomposition, calib_ids)
    stats = statistics_for(loaded, calib_ids, cfg, decomposition, run=run.stage(0, 0.6))
    result = {}
    for i, (layer, factors) in enumerate(decomposed_layers(loaded, layers, stats, Decomposer(decomposition, options))):
        result[layer.name] = factors
        run.report(0.6 + 0.4 * (i + 1) / len(layers), f"decomposing {layer.name}")
    save_tensors(path, factors_to_tensors(result), {"decomposition": decomposition})
    return result


def _needed_windows(loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str,
                    calib_ids: torch.Tensor | None) -> torch.Tensor | None:
    """``calib_ids``, else the calibration windows of ``cfg`` when the decomposition needs statistics."""
    if calib_ids is None and spec_of(decomposition).needs:
        calib_ids, _ = calibration_windows(loaded, cfg)
    return calib_ids


def _streamed(loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str, options: DecompositionOptions,
              calib_ids: torch.Tensor | None, owned: set[str] | None, run: Run):
    """The streamed build's factors (one rank's ``owned`` layers under torchrun, every layer otherwise)."""
    layers = compressible_layers(loaded.model)
    shard = None if owned is None else (distributed.context().rank, distributed.context().world)
    folder = streamed_folder(loaded, cfg, decomposition, options, run, shard)
    # a budget the user gave bounds the process beyond the weights: what it holds already is set aside
    reserve = 0
    if run.max_memory is not None:
        release_freed_memory(loaded.device)  # freed Grams leave no resident holes in the heap
        reserve = process_overhead(loaded.model, loaded.device)
    plan = plan_stream(layers, decomposition, run.max_memory, loaded.device, options, reserve)
    return streamed_factorizations(loaded, calib_ids, decomposition, options, folder, plan, owned, run=run)


def whole_model_key(loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str,
                    options: DecompositionOptions) -> str:
    """The cache key of a static method's factors of the whole model (and of its per-layer files)."""
    return key_of(loaded.fingerprint, statistics_key(cfg), decomposition, options_dict(options))


def decomposed_layers(loaded: LoadedModel, layers: list[LayerInfo], stats: Statistics,
                      decomposer: Decomposer) -> Iterator[tuple[LayerInfo, Factorization]]:
    """(layer, Factorization) for each of ``layers`` in order, from the collected statistics.

    On a CPU the layers are factorised by as many threads as torch has intra-op threads,
    each on one LAPACK thread: a float64 eigh or Cholesky gains little from a second
    thread (``single_threaded_lapack``), two layers at once take half the time. Each
    layer's arithmetic is the sequential one, so the factors are the same bits. At most
    one layer more than the threads is in flight, and no more threads than the free memory
    holds workspaces for (``decomposition_threads``).
    """
    def factorise(layer: LayerInfo) -> Factorization:
        weight = loaded.model.get_submodule(layer.name).weight
        return decomposer(layer, weight, stats.inputs.get(layer.name), stats.grad_gram.get(layer.name),
                          stats.fisher.get(layer.name))

    workers = decomposition_threads(loaded.device, layers, decomposer.options.dtype)
    if workers <= 1:
        for layer in layers:
            yield layer, factorise(layer)
        return
    with single_threaded_lapack(loaded.device), ThreadPoolExecutor(workers, "lems-decompose") as pool:
        in_flight: deque = deque()
        for layer in layers:
            in_flight.append((layer, pool.submit(factorise, layer)))
            if len(in_flight) > workers:
                done, future = in_flight.popleft()
                yield done, future.result()
        while in_flight:
            done, future = in_flight.popleft()
            yield done, future.result()


def decomposition_threads(device: torch.device, layers: list[LayerInfo], dtype: torch.dtype) -> int:
    """How many layers ``decomposed_layers`` factorises at once: one per torch thread on a CPU, as many as
    twice the largest layer's workspace (``decomposition_workspace``) fits in the memory free now; one on a GPU."""
    if device.type != "cpu" or not layers:
        return 1
    fit = available_memory(device) // (2 * decomposition_workspace(layers, dtype))
    return max(1, min(len(layers), torch.get_num_threads(), fit))


def streamed_folder(loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str, options: DecompositionOptions,
                    run: Run, shard: tuple[int, int] | None = None) -> Path:
    """The block-file folder of a streamed build (one rank's ``shard`` has its own; None: complete factors)."""
    return streamed_dir(loaded, statistics_key(cfg), decomposition, options_dict(options), run.factor_dtype,
                        run.cache_dir, shard)


def grams_fit(loaded: LoadedModel, layers: list[LayerInfo], decomposition: str, options: DecompositionOptions) -> bool:
    """Whether the classic path (every Gram of the model held at once) fits what the device has free."""
    needs = spec_of(decomposition).needs
    grams = (input_gram_bytes(layers) if "inputs" in needs else 0) + (grad_gram_bytes(layers) if "grads" in needs else 0)
    return grams + decomposition_workspace(layers, options.dtype) <= available_memory(loaded.device)


def options_dict(options: DecompositionOptions) -> dict:
    """The decomposition options as strings: how they enter cache keys and profile settings."""
    return {k: str(v) for k, v in asdict(options).items()}


def factors_to_tensors(factors: dict[str, Factorization]) -> dict[str, torch.Tensor]:
    """One safetensors entry per (layer, sigma/left/right); the cache format of static and per-plan factors."""
    tensors = {}
    for name, f in factors.items():
        tensors.update({f"{name}.sigma": torch.from_numpy(f.sigma.copy()), f"{name}.left": f.left.cpu(),
                        f"{name}.right": f.right.cpu()})
    return tensors


def factors_from_tensors(stored: dict[str, torch.Tensor], names, device) -> dict[str, Factorization]:
    """The Factorizations of ``names`` from a cache file's tensors, on ``device``."""
    return {n: Factorization(stored[f"{n}.sigma"].numpy(), stored[f"{n}.left"].to(device), stored[f"{n}.right"].to(device))
            for n in names}


# ------------------------------------------------------------------ a profile's model and factors
def profile_loaded(profile: Profile, run: Run = DEFAULT_RUN) -> LoadedModel:
    """The profile's model (its own source, never one named by a plan); it must match the fingerprint."""
    loaded = models.get_model(profile.model_source, run.device, offload=run.offload)
    if loaded.fingerprint != profile.fingerprint:
        raise ValueError(f"profile is for model {profile.fingerprint}, {profile.model_source} loads as {loaded.fingerprint}")
    return loaded


def profile_model(profile: Profile, *, run: Run = DEFAULT_RUN) -> tuple[LoadedModel, torch.Tensor, dict]:
    """(loaded model, search windows, static factors) of a profile; the model must match its fingerprint.

    A rank-dependent decomposition's profile gets its base whitening's factors.
    """
    loaded = profile_loaded(profile, run)
    cfg = CalibrationConfig.from_dict(profile.calibration)
    with hold_model(loaded, run=run):
        _, search_ids = calibration_windows(loaded, cfg)
        return loaded, search_ids, factorizations_for(loaded, cfg, base_of(profile.decomposition), run=run)
