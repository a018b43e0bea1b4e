"""One registry of every rank allocator, and ``allocate``, which runs one by name.

Each entry says what the allocator needs beyond a profile and a budget: the error
model (``params``), or a score of candidate plans measured on the model
(``score``: "ppl" = search-set perplexity, "kl" = KL to the dense model; see
``pipeline.score_function``). Allocators never load a model themselves.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from ..error_model import ErrorModelParams
from ..profile import Profile
from . import ars, asvd, atp, erc_plc, lcsvd_search, lems, mrcs, svdllm_v2, uniform
from .base import Allocation, ScoreFn, check_result


@dataclass(frozen=True)
class AllocatorSpec:
    """One allocator: its function ``fn(profile, ratio, ...) -> Allocation`` and what it needs."""

    name: str
    fn: Callable[..., Allocation]
    score: str | None = None  # "ppl" / "kl" when it scores candidate plans on the model
    summary: str = ""


SPECS: dict[str, AllocatorSpec] = {}


def register_allocator(name: str, fn: Callable[..., Allocation], score: str | None = None, summary: str = "") -> None:
    """Make ``fn(profile, ratio, ...) -> Allocation`` available to ``allocate`` under ``name``.

    ``allocate`` passes ``params`` / ``score_fn`` only to functions that take them, and
    rejects results that exceed the budget.
    """
    key = normalise_method(name)
    SPECS[key] = AllocatorSpec(key, fn, score, summary)
    ALLOCATORS[key] = fn
    if score:
        MODEL_SCORED[key] = score


def normalise_method(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


ALLOCATORS: dict[str, Callable[..., Allocation]] = {}  # name -> function (derived from SPECS)
MODEL_SCORED: dict[str, str] = {}  # name -> the score it needs (derived from SPECS)

for _spec in (
    AllocatorSpec("lems", lems.allocate_lems, summary="LEMS error model + exact ILP (§1.2-1.4)"),
    AllocatorSpec("uniform", uniform.allocate_uniform, summary="rank int(ratio*eq) everywhere (§4.1)"),
    AllocatorSpec("svdllm_v2", svdllm_v2.allocate_svdllm_v2, summary="SVD-LLM V2 by matrix type (§4.3)"),
    AllocatorSpec("mrcs", mrcs.allocate_mrcs, summary="MRCS greedy with exponential schedule (§4.4)"),
    AllocatorSpec("atp", atp.allocate_atp, "ppl", "arithmetic-progression block ratios (§4.5)"),
    AllocatorSpec("asvd", asvd.allocate_asvd, summary="ASVD sensitivity-based rank search (§4.2)"),
    AllocatorSpec("ars", ars.allocate_ars, summary="ARS learned masks; serves trained plans (§4.6)"),
    AllocatorSpec("erc_plc", erc_plc.allocate_erc_plc, "kl", "ERC-SVD partial-layer compression"),
    AllocatorSpec("lcsvd_search", lcsvd_search.allocate_lcsvd_search, "ppl", "LC-SVD sensitivity-prior search"),
):
    register_allocator(_spec.name, _spec.fn, _spec.score, _spec.summary)


def allocator_names() -> list[str]:
    """Every allocation method ``allocate`` accepts, sorted."""
    return sorted(ALLOCATORS)


def allocate(
    profile: Profile,
    method: str,
    ratio: float,
    params: ErrorModelParams | None = None,
    score_fn: ScoreFn | None = None,
    **options,
) -> Allocation:
    """Run allocator ``method`` by name; ``options`` go to that allocator."""
    key = normalise_method(method)
    if key not in ALLOCATORS:
        raise ValueError(f"unknown allocation method {method!r}; known: {', '.join(sorted(ALLOCATORS))}")
    fn = ALLOCATORS[key]
    accepted = inspect.signature(fn).parameters
    kwargs = dict(options)
    if "params" in accepted and params is not None:
        kwargs["params"] = params
    if "score_fn" in accepted:
        if score_fn is None and accepted["score_fn"].default is inspect.Parameter.empty:
            raise ValueError(f"method {key!r} needs score_fn(ranks) -> float (lower is better) to evaluate allocations")
        if score_fn is not None:
            kwargs["score_fn"] = score_fn
    alloc = fn(profile, ratio, **kwargs)
    check_result(profile, alloc)
    return alloc
