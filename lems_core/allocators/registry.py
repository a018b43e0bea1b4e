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

from ..constraints import ConstraintError, LayerConstraints
from ..error_model import ErrorModelParams
from ..profile import Profile
from . import ars, asvd, atp, erc_plc, lcsvd_search, lems, lems_mp, mrcs, svdllm_v2, uniform
from .base import Allocation, ScoreFn, apply_constraints, check_result, resolve_constraints
from .latency_budget import COST_NAMES, UnsupportedCostError, check_cost_constraints, is_param_cost, search_param_ratio


@dataclass(frozen=True)
class AllocatorSpec:
    """One allocator: its function ``fn(profile, ratio, ...) -> Allocation`` and what it needs."""

    name: str
    fn: Callable[..., Allocation]
    score: str | None = None  # "ppl" / "kl" when it scores candidate plans on the model
    summary: str = ""
    # How it honours LayerConstraints: "native" (fn takes ``constraints``), "projected"
    # (ranks projected onto them afterwards, ``base.apply_constraints``), "" (not at all).
    constraints: str = ""
    # How it allocates under a latency budget (``latency_budget``): "native" (fn takes a cost
    # object as ``cost_model``), "search" (its parameter ratio searched), "" (it refuses).
    latency: str = ""


CONSTRAINT_SUPPORT = ("native", "projected", "")
LATENCY_SUPPORT = ("native", "search", "")


SPECS: dict[str, AllocatorSpec] = {}


def register_allocator(name: str, fn: Callable[..., Allocation], score: str | None = None, summary: str = "",
                       constraints: str = "", latency: str = "") -> None:
    """Make ``fn(profile, ratio, ...) -> Allocation`` available to ``allocate`` under ``name``.

    ``allocate`` passes ``params`` / ``score_fn`` only to functions that take them, and
    rejects results that exceed the budget. ``constraints`` and ``latency`` say how it honours
    layer constraints and a latency budget (see ``AllocatorSpec``).
    """
    if constraints not in CONSTRAINT_SUPPORT:
        raise ValueError(f"constraints support must be one of {CONSTRAINT_SUPPORT}, got {constraints!r}")
    if latency not in LATENCY_SUPPORT:
        raise ValueError(f"latency support must be one of {LATENCY_SUPPORT}, got {latency!r}")
    key = normalise_method(name)
    SPECS[key] = AllocatorSpec(key, fn, score, summary, constraints, latency)
    ALLOCATORS[key] = fn
    if score:
        MODEL_SCORED[key] = score


def normalise_method(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


ALLOCATORS: dict[str, Callable[..., Allocation]] = {}  # name -> function (derived from SPECS)
MODEL_SCORED: dict[str, str] = {}  # name -> the score it needs (derived from SPECS)

for _spec in (
    AllocatorSpec("lems", lems.allocate_lems_reference, summary="LEMS error model + exact ILP (docs/reference/methods.md §1.2-1.4), depth "
                  "bias fitted in the profile (the reference's always-on fit, docs/reference/methods.md §1.3)", constraints="native",
                  latency="native"),
    AllocatorSpec("lems_fixed", lems.allocate_lems_fixed, summary="LEMS with a fixed depth bias (default alpha=0, "
                  "gamma=5)", constraints="native", latency="native"),
    AllocatorSpec("lems_mp", lems_mp.allocate_lems_mp, summary="LEMS error model fitted on every measured KL point "
                  "(floor-aware) + exact ILP", constraints="projected", latency="native"),
    AllocatorSpec("uniform", uniform.allocate_uniform, summary="rank int(ratio*eq) everywhere (docs/reference/methods.md §4.1)",
                  constraints="projected", latency="search"),
    AllocatorSpec("svdllm_v2", svdllm_v2.allocate_svdllm_v2, summary="SVD-LLM V2 by matrix type (docs/reference/methods.md §4.3)",
                  constraints="projected", latency="search"),
    AllocatorSpec("mrcs", mrcs.allocate_mrcs, summary="MRCS greedy with exponential schedule (docs/reference/methods.md §4.4); layers it "
                  "never touches factorised at rank eq, as the reference (docs/reference/methods.md §9)", constraints="projected",
                  latency="search"),
    AllocatorSpec("mrcs_dense", mrcs.allocate_mrcs_dense, summary="MRCS with the layers it never touches left dense",
                  constraints="projected", latency="search"),
    AllocatorSpec("atp", atp.allocate_atp, "ppl", "arithmetic-progression block ratios (docs/reference/methods.md §4.5)"),
    AllocatorSpec("asvd", asvd.allocate_asvd, summary="ASVD sensitivity-based rank search (docs/reference/methods.md §4.2), ranked by "
                  "single-layer search perplexity as the reference (KL when the profile has no NLL table)"),
    AllocatorSpec("asvd_kl", asvd.allocate_asvd_kl, summary="ASVD rank search ranked by single-layer KL"),
    AllocatorSpec("ars", ars.allocate_ars, summary="ARS learned masks; serves trained plans (docs/reference/methods.md §4.6)"),
    AllocatorSpec("erc_plc", erc_plc.allocate_erc_plc, "kl", "ERC-SVD partial-layer compression"),
    AllocatorSpec("lcsvd_search", lcsvd_search.allocate_lcsvd_search, "ppl", "LC-SVD sensitivity-prior search"),
):
    register_allocator(_spec.name, _spec.fn, _spec.score, _spec.summary, _spec.constraints, _spec.latency)


def allocator_names() -> list[str]:
    """Every allocation method ``allocate`` accepts, sorted."""
    return sorted(ALLOCATORS)


def allocate(
    profile: Profile,
    method: str,
    ratio: float,
    params: ErrorModelParams | None = None,
    score_fn: ScoreFn | None = None,
    constraints: LayerConstraints | None = None,
    cost="params",
    **options,
) -> Allocation:
    """Run allocator ``method`` by name; ``options`` go to that allocator.

    ``constraints`` (``LayerConstraints``) are honoured natively by LEMS, by projection
    for uniform / SVD-LLM V2 / MRCS (both variants), and are a ConstraintError for the other methods.
    ``cost`` is "params" (``ratio`` = kept fraction of the parameters) or a
    ``latency.LatencyCost`` (``ratio`` = kept fraction of the dense latency; see ``latency_budget``).
    """
    key = normalise_method(method)
    if key not in ALLOCATORS:
        raise ValueError(f"unknown allocation method {method!r}; known: {', '.join(sorted(ALLOCATORS))}")
    if not is_param_cost(cost):
        return _allocate_under_latency(profile, key, ratio, params, score_fn, constraints, cost, **options)
    if cost != "params":
        raise ValueError(f"cost must be 'params' or a latency.LatencyCost (cost kinds: {', '.join(COST_NAMES)}); "
                         f"got {cost!r}" + (": build one from a device profile with latency.latency_cost"
                                            if cost == "latency" else ""))
    if constraints is not None and not constraints.is_empty:
        return _allocate_constrained(profile, key, ratio, params, score_fn, constraints, **options)
    return _run(profile, key, ratio, params, score_fn, **options)


def latency_methods() -> list[str]:
    """The methods ``allocate`` can run under a latency budget."""
    return sorted(k for k, spec in SPECS.items() if spec.latency)


def _allocate_under_latency(profile: Profile, key: str, ratio: float, params, score_fn,
                            constraints: LayerConstraints | None, cost, **options) -> Allocation:
    """``allocate`` under a latency budget: natively (LEMS), by a parameter-ratio search, or refused."""
    support = SPECS[key].latency
    if not support:
        raise UnsupportedCostError(f"{key} allocates under a parameter budget only; a latency budget is supported "
                                   f"by {', '.join(latency_methods())}")
    cost.check_layers(profile.layers)
    check_cost_constraints(cost, constraints)
    has_constraints = constraints is not None and not constraints.is_empty
    if support == "native":
        if has_constraints and SPECS[key].constraints != "native":
            raise ConstraintError(f"{key} projects layer constraints onto a parameter budget; under a latency "
                                  f"budget use lems or lems_fixed with constraints")
        return allocate(profile, key, ratio, params, score_fn, constraints, cost_model=cost, **options)
    return search_param_ratio(profile, lambda p: allocate(profile, key, p, params, score_fn, constraints, **options),
                              cost, ratio, key)


def supports_constraints(method: str) -> bool:
    """Whether ``allocate`` can honour layer constraints for ``method``."""
    spec = SPECS.get(normalise_method(method))
    return spec is not None and bool(spec.constraints)


def _allocate_constrained(profile: Profile, key: str, ratio: float, params, score_fn, constraints: LayerConstraints,
                          **options) -> Allocation:
    support = SPECS[key].constraints
    if support == "native":
        return _run(profile, key, ratio, params, score_fn, constraints=constraints, **options)
    if support != "projected":
        raise ConstraintError(f"{key} does not honour layer constraints; use one of "
                              f"{', '.join(k for k in sorted(SPECS) if SPECS[k].constraints)}")
    _, full_ratio = resolve_constraints(profile, ratio, constraints)
    if constraints.rank_multiple and "multiple" in inspect.signature(ALLOCATORS[key]).parameters:
        options.setdefault("multiple", constraints.rank_multiple)
    alloc = _run(profile, key, full_ratio, params, score_fn, **options)
    alloc = apply_constraints(profile, alloc, constraints, ratio)
    check_result(profile, alloc)
    return alloc


def _run(profile: Profile, key: str, ratio: float, params, score_fn, **options) -> Allocation:
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
