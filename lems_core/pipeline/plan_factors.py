"""The factors one plan compresses with: a static method's planned layers, or a rank-dependent method's.

A static method's factors do not depend on the plan, so they are sliced from its cache
(the whole model's file, or one file per layer); a rank-dependent method (SAES, ERC,
LC-SVD) factorises for the plan's ranks, cached once per plan.
"""
from __future__ import annotations

from pathlib import Path

from ..cache import key_of, load_tensors, save_tensors, tensor_path
from ..calibration import CalibrationConfig
from ..compression import is_dense_rank
from ..decompositions import DecompositionOptions, DecompositionSpec, Decomposer, Factorization, MethodOptions, spec_of
from ..model import LayerInfo, LoadedModel, compressible_layers
from ..offload import has_offloaded_weights
from ..run import DEFAULT_RUN, Run
from ..statistics import collect_kfac_statistics
from .artefacts import (calibration_windows, decomposed_layers, factorizations_for, factors_from_tensors,
                        factors_to_tensors, grams_fit, statistics_for, statistics_key, statistics_missing,
                        whole_model_key)

STATISTICS_SHARE = 0.86  # of a static factorisation's progress: statistics, then the decompositions
_SUBSET_PASSES: set[str] = set()  # (model, calibration) keys that had their one plan-only statistics pass


def plan_factorizations(loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str,
                        ranks: dict[str, int | None], options: MethodOptions | None = None, *,
                        run: Run = DEFAULT_RUN) -> dict[str, Factorization]:
    """Factors to compress with `ranks`: sliced from the static cache, or computed for these ranks.

    Any name of ``decomposition_names()`` works. ``options`` are the method's own
    (DecompositionOptions for a static one, e.g. LcOptions for lcsvd); default: the
    registry's. A rank-dependent method's factors hold only the planned layers.
    ``run.max_memory`` (bytes for statistics + decomposition) makes a static method's
    factors come from the streamed build under that budget (``factorizations_for``),
    and so the static base of a rank-dependent one (ERC).
    """
    spec = spec_of(decomposition)
    options = spec.options if options is None else options
    if not isinstance(options, type(spec.options)):
        raise TypeError(f"{decomposition} takes {type(spec.options).__name__}, not {type(options).__name__}")
    if not spec.rank_dependent:
        return _planned_static_factors(loaded, cfg, decomposition, options, ranks, run)
    if has_offloaded_weights(loaded.model):
        raise ValueError(f"{decomposition} compresses whole blocks in place and needs the model loaded whole; "
                         "drop --weights-memory / --offload-folder, or use a static decomposition "
                         "(svd, asvd, fwsvd, svd_llm, svd_llm_v2, kfac)")
    return _rank_dependent_factorizations(loaded, cfg, spec, ranks, options, run)


def _planned_static_factors(loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str,
                            options: DecompositionOptions, ranks: dict[str, int | None],
                            run: Run) -> dict[str, Factorization]:
    """A static method's factors of the layers ``ranks`` factorise; the layers it keeps dense get none.

    The whole model's file (``factorizations_for``) serves when it is cached, and for
    streamed builds. Otherwise only the planned layers are decomposed, each cached in a
    file of its own (statistics: ``_decompose_layers``): a first evaluation does not pay
    for the layers its plan keeps dense (122 of 210 for the demo's LEMS @ 0.8), and a
    later plan decomposes only the layers no plan before it did. A layer's factors
    depend on its own weight and statistics alone, so they are the ones the whole-model
    file holds. A memory budget (``run.max_memory``) takes the streamed build, which
    reads the factors back a layer at a time.
    """
    layers = compressible_layers(loaded.model)
    key = whole_model_key(loaded, cfg, decomposition, options)
    if run.max_memory is not None or (tensor_path("factors", key, run.cache_dir).is_file()
                                      or has_offloaded_weights(loaded.model)
                                      or not grams_fit(loaded, layers, decomposition, options)):
        return factorizations_for(loaded, cfg, decomposition, options, run=run)
    planned = [l for l in layers if l.name in ranks and not is_dense_rank(l, ranks[l.name])]
    factors, missing = {}, []
    for layer in planned:
        stored = load_tensors(_layer_factors_path(key, layer.name, run.cache_dir))
        if stored is None:
            missing.append(layer)
        else:
            factors.update(factors_from_tensors(stored, [layer.name], loaded.device))
    if missing:
        factors.update(_decompose_layers(loaded, cfg, decomposition, options, missing, key, run))
    return factors


def _decompose_layers(loaded: LoadedModel, cfg: CalibrationConfig, decomposition: str, options: DecompositionOptions,
                      layers: list[LayerInfo], key: str, run: Run) -> dict[str, Factorization]:
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
        run.report(0.0, "sampling the calibration windows")
        calib_ids, _ = calibration_windows(loaded, cfg)
    base = (loaded.fingerprint, statistics_key(cfg))
    statistics_run = run.stage(0, STATISTICS_SHARE)
    if (spec_of(decomposition).needs == {"inputs", "grads"} and 2 * len(layers) <= len(compressible_layers(loaded.model))
            and key_of(*base) not in _SUBSET_PASSES and statistics_missing(base, run.cache_dir)):
        _SUBSET_PASSES.add(key_of(*base))
        stats = collect_kfac_statistics(loaded.model, calib_ids, layers, progress=statistics_run.progress)
    else:
        stats = statistics_for(loaded, calib_ids, cfg, decomposition, run=statistics_run)
    out = {}
    for i, (layer, factors) in enumerate(decomposed_layers(loaded, layers, stats, Decomposer(decomposition, options))):
        out[layer.name] = factors
        save_tensors(_layer_factors_path(key, layer.name, run.cache_dir), factors_to_tensors({layer.name: factors}),
                     {"decomposition": decomposition, "layer": layer.name})
        run.report(STATISTICS_SHARE + (1 - STATISTICS_SHARE) * (i + 1) / len(layers),
                   f"decomposing the plan's layers: {i + 1}/{len(layers)} ({layer.name})")
    return out


def _layer_factors_path(key: str, name: str, cache_dir: Path | None) -> Path:
    """One layer's factors under the whole-model key ``key`` (``_planned_static_factors``)."""
    return tensor_path("layer-factors", key_of(key, name), cache_dir)


def _rank_dependent_factorizations(loaded: LoadedModel, cfg: CalibrationConfig, spec: DecompositionSpec, ranks: dict,
                                   options: MethodOptions, run: Run) -> dict[str, Factorization]:
    """A rank-dependent method's factors for ``ranks``, cached as one safetensors file per plan.

    Key: model fingerprint, calibration config, method, its options' ``to_dict()`` and
    the plan's ranks. The base's static factors are computed (or read from their
    cache) first when the spec asks for them (ERC).
    """
    plan = {name: (None if r is None else int(r)) for name, r in sorted(ranks.items())}
    key = key_of(loaded.fingerprint, cfg.to_dict(), spec.name, options.to_dict(), plan)
    path = tensor_path("factors", key, run.cache_dir)
    stored = load_tensors(path)
    if stored is not None:
        return factors_from_tensors(stored, dict.fromkeys(k.rsplit(".", 1)[0] for k in stored), loaded.device)
    calib_ids, _ = calibration_windows(loaded, cfg)
    base = None
    if spec.base_factors:
        base = factorizations_for(loaded, cfg, spec.base, calib_ids=calib_ids, run=run.stage(0, 0.8))
        run = run.stage(0.8, 1.0)
    factors = spec.factorizations(loaded.model, ranks, calib_ids, options, base, run.progress)
    save_tensors(path, factors_to_tensors(factors), {"decomposition": spec.name})
    return factors

