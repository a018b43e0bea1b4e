"""Plans scored on the model itself: KL and perplexity scorers, and the allocators that search with them.

The allocators never load a model (``allocators/registry.py``); the model-scored ones
(ATP, ERC-SVD's PLC, the LC-SVD search) take a ``score_fn(ranks)`` built here on the
profile's model, search windows and static factors.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..allocators import MODEL_SCORED, Allocation, allocate
from ..decompositions import Factorization
from ..evaluation import kl_to_reference, perplexity
from ..model import LoadedModel
from ..profile import Profile
from ..run import DEFAULT_RUN, Run
from .artefacts import profile_model
from .evaluation import compressed, reference_logits
from .models import hold_model

Scorer = Callable[[dict], float]


def make_kl_scorer(loaded: LoadedModel, factors: dict[str, Factorization], search_ids: torch.Tensor, *,
                   run: Run = DEFAULT_RUN) -> Scorer:
    """score_fn(ranks) = KL(dense || compressed) on the search windows (LEMS bias fit, docs/reference/methods.md §1.3).

    Each call holds the model's lock, so scores from concurrent jobs never mix weights.
    The dense logits are kept in float32 when they fit in ``LOG_PROB_CACHE_BYTES`` (no
    bf16 KL floor, see sensitivity.py), else in bf16 as the reference; on the CPU when
    they do not fit ``run.max_memory`` (``reference_logits``).
    """
    cancel_only = run.but(progress=None)
    with hold_model(loaded, run=cancel_only):
        ref_logits = reference_logits(loaded, search_ids, run.max_memory)

    def score(ranks: dict[str, int | None]) -> float:
        with hold_model(loaded, run=cancel_only), compressed(loaded, ranks, factors, max_memory=run.max_memory):
            return kl_to_reference(loaded.model, search_ids, ref_logits, cancel=run.cancel)
    return score


def make_ppl_scorer(loaded: LoadedModel, factors: dict[str, Factorization], search_ids: torch.Tensor, *,
                    run: Run = DEFAULT_RUN) -> Scorer:
    """score_fn(ranks) = perplexity on the search windows (ATP's grid search, docs/reference/methods.md §4.5); holds the model's lock."""
    cancel_only = run.but(progress=None)

    def score(ranks: dict[str, int | None]) -> float:
        with hold_model(loaded, run=cancel_only), compressed(loaded, ranks, factors, max_memory=run.max_memory):
            return perplexity(loaded.model, search_ids, cancel=run.cancel).ppl
    return score


def score_function(profile: Profile, kind: str, *, run: Run = DEFAULT_RUN) -> Scorer:
    """score_fn(ranks) on the profile's search windows: ``kind`` "kl" or "ppl" (loads the profile's model).

    Candidates are compressed with the profile's static factors (the base whitening for
    a rank-dependent decomposition: refactorising every candidate would be far too slow).
    """
    if kind not in ("kl", "ppl"):
        raise ValueError(f"score kind must be 'kl' or 'ppl', got {kind!r}")
    loaded, search, factors = profile_model(profile, run=run.but(progress=None))
    return (make_ppl_scorer if kind == "ppl" else make_kl_scorer)(loaded, factors, search, run=run)


def allocate_on_model(profile: Profile, method: str, budget: float, params=None, *,
                      run: Run = DEFAULT_RUN) -> Allocation:
    """Allocation of a model-scored allocator (MODEL_SCORED: atp, erc_plc, lcsvd_search) at ``budget``.

    Builds the scorer of the method's kind (``score_function``) and reports each scored
    candidate through the run's progress (the allocators do not know how many they will score).
    """
    key = method.strip().lower().replace("-", "_")
    if key not in MODEL_SCORED:
        raise ValueError(f"{method!r} is not a model-scored allocator; those are: {', '.join(MODEL_SCORED)}")
    run.report(0.0, f"{key}: loading the model and scorer")
    score = score_function(profile, MODEL_SCORED[key], run=run.but(progress=None))
    count = 0

    def counted(ranks: dict) -> float:
        nonlocal count
        run.check_cancel()
        value = score(ranks)
        count += 1
        run.report(count / (count + 10), f"{key} @ {budget:g}: scored {count} candidate(s)")
        return value
    return allocate(profile, key, budget, params=params, score_fn=counted)
