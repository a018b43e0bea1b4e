"""Registers the other seed methods (other-seed-methods.md) with the pipeline and allocators.

Importing this module registers, and does nothing else (no model, data or file is touched):

- rank-dependent decompositions (pipeline.register_rank_dependent, base "svd_llm"):
  ``saes`` (SAES-SVD, saes.py), ``erc`` (ERC-SVD's REC, erc.py), ``lcsvd`` (LC-SVD, lcsvd.py);
- allocators (allocators.register_allocator): ``erc_plc`` (ERC-SVD's partial-layer
  compression) and ``lcsvd_search`` (LC-SVD's sensitivity-prior search); both need
  ``score_fn`` (e.g. pipeline.make_ppl_scorer / make_kl_scorer, or
  erc.make_final_error_scorer).

Rank-dependent factors are cached like static ones: one safetensors file per
(model, calibration, method, options, ranks), holding only the factorised layers.
SVD-LLM v2 truncation needs no registration: it is the static decomposition
"svd_llm_v2" of decomposition.py.

Import it after ``pipeline`` is defined, since it calls ``pipeline.register_rank_dependent``.
``pipeline.ensure_seed_methods()`` does that lazily: ``plan_factorizations``,
``evaluate_plan``, ``decomposition_names`` and ``allocate_on_model`` call it, so the
names work without importing this module first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from . import erc, lcsvd, saes
from .allocators import register_allocator
from .cache import key_of, load_tensors, save_tensors, tensor_path
from .calibration import CalibrationConfig
from .decomposition import Factorization
from .model import LoadedModel
from .pipeline import factorizations_for, register_rank_dependent, stage

Ranks = dict[str, "int | None"]
Compute = Callable[[LoadedModel, CalibrationConfig, Ranks, torch.Tensor, "Path | None", Callable | None], dict[str, Factorization]]


def cached(method: str, options: dict, compute: Compute) -> Compute:
    """Wrap a rank-dependent ``compute`` with the tensor cache (key: model, calibration, method, options, ranks)."""
    def fn(loaded, cfg, ranks, calib_ids, cache_dir=None, progress=None):
        plan = {name: (None if r is None else int(r)) for name, r in sorted(ranks.items())}
        path = tensor_path("factors", key_of(loaded.fingerprint, cfg.to_dict(), method, options, plan), cache_dir)
        stored = load_tensors(path)
        if stored is not None:
            names = {k.rsplit(".", 1)[0] for k in stored}
            return {n: Factorization(stored[f"{n}.sigma"].numpy(), stored[f"{n}.left"].to(loaded.device),
                                     stored[f"{n}.right"].to(loaded.device)) for n in names}
        factors = compute(loaded, cfg, ranks, calib_ids, cache_dir, progress)
        tensors = {}
        for name, f in factors.items():
            tensors.update({f"{name}.sigma": torch.from_numpy(f.sigma.copy()), f"{name}.left": f.left.cpu(),
                            f"{name}.right": f.right.cpu()})
        save_tensors(path, tensors, {"decomposition": method})
        return factors
    return fn


def make_saes(options: saes.SaesOptions = saes.SaesOptions()) -> Compute:
    """SAES-SVD with ``options`` as a rank-dependent decomposition (closed loop on calib_ids)."""
    def compute(loaded, cfg, ranks, calib_ids, cache_dir, progress):
        return saes.saes_factorizations(loaded.model, ranks, calib_ids, options, progress)[0]
    return cached("saes", options.to_dict(), compute)


def make_erc(residual_fraction: float = erc.RESIDUAL_FRACTION) -> Compute:
    """ERC-SVD's REC on top of the (cached) static SVD-LLM factors of the FP model."""
    def compute(loaded, cfg, ranks, calib_ids, cache_dir, progress):
        base = factorizations_for(loaded, cfg, "svd_llm", cache_dir=cache_dir, progress=stage(progress, 0, 0.8),
                                  calib_ids=calib_ids)
        return erc.rec_factorizations(loaded.model, base, ranks, residual_fraction)
    return cached("erc", {"residual_fraction": residual_fraction}, compute)


def make_lcsvd(options: lcsvd.LcOptions = lcsvd.LcOptions()) -> Compute:
    """LC-SVD block-collaborative decomposition with ``options``."""
    def compute(loaded, cfg, ranks, calib_ids, cache_dir, progress):
        return lcsvd.lcsvd_factorizations(loaded.model, ranks, calib_ids, options, progress)[0]
    return cached("lcsvd", options.to_dict(), compute)


register_rank_dependent("saes", make_saes(), "svd_llm")
register_rank_dependent("erc", make_erc(), "svd_llm")
register_rank_dependent("lcsvd", make_lcsvd(), "svd_llm")
register_allocator("erc_plc", erc.allocate_erc_plc)
register_allocator("lcsvd_search", lcsvd.allocate_lcsvd_search)

__all__ = ["cached", "make_saes", "make_erc", "make_lcsvd"]
