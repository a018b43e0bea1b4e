"""ARS: Adaptive Rank Selection (Gao et al., NAACL 2024; docs/reference/methods.md §4.6).

A learned rank allocator. Every compressible Linear W (m x n) is written in its
full (whitened) SVD, W = left @ right with min(m, n) components, and a binary
mask m_l on the components selects which ones are kept. The masks come from a
small hypernetwork: a GRU reads a fixed random input z, one step per layer, and
a per-layer linear head turns the hidden state into one logit per component.
Masks are straight-through Gumbel-sigmoid samples of those logits (hard 0/1
forward with threshold 0.5, sigmoid gradient backward). Only the hypernetwork
trains; the language model and its factors are frozen. The loss (docs/reference/methods.md §4.6 step 4) is

    CE(f(x; m)) + lam * log(max(T(m), p T_c) / (p T_c)) + gamma * mean_l ||m_l s_l - m'_l s_l||^2

with T(m_l) = (m_l + n_l) 1^T m_l (capped at m_l n_l: a layer at or above its
break-even rank is stored dense, docs/reference/methods.md §0), T_c the parameters of the
compressible Linears and m'_l the top-k mask with k = 1^T m_l (pushes the mask
toward the singular-value order).

The budget rule follows the reference implementation (sidhantls, docs/reference/methods.md §9
"ARS"; ``main`` at adaptive_rank_selection.py:327-410, train_adaptive.py:273-282):
- p is ``p_param`` = 0.4, not the budget, so the penalty pushes down on both sides
  of the budget; instead lam is 0 for a step whose kept fraction is within 0.002 of
  the target (either side);
- training stops once more than 100 steps ran and the mean kept fraction of the
  last 100 is less than 0.003 above the target (``steps`` is only a cap);
- that kept fraction and target are over the whole model's parameters
  (embeddings, norms and lm_head count as kept). The public budget stays the kept
  fraction of the compressible Linears, as for every allocator here; it is
  translated into the whole-model target (``BudgetTarget``) and both are recorded.
The legacy rule (preset "cpu-small-legacy", fields ``LEGACY_FIELDS``): p = the
budget (one-sided: no penalty under it), lam always on, a fixed number of steps,
the compressible Linears only, a one-direction GRU.

The final rank of a layer is the sum of its (noise-free) mask, rounded to a
multiple of 8, dense at or above the break-even rank, then repaired
deterministically until the (compressible) budget holds; by default, budget left
unused is spent again; the raw learned ranks stay in the info.

Choices that the paper leaves open, taken from the third-party implementation
LEMS used: tau = 0.4, +3 logit bias (all components start kept, so training
starts from the dense model), threshold 0.5, Adam lr 1e-3, lam = 16, gamma = 10;
one bidirectional GRU over the layers -> LayerNorm -> GELU -> per-layer head. Our
own choices (documented where they are made): the noise-free final mask (noise
replaced by its median), a straight-through budget cap, per-layer normalised
spectra in the alignment term, p_param capped at the budget, and the repair /
fill rules.

Training is minutes on CPU for the demo model (preset "cpu-small") and its
results are cached: in the diskcache index (keyed by profile, decomposition,
ratio and config) and, for the demo, as committed plans under cache/demo/ars/.
The ``ars`` allocator only ever reads those (by default only plans trained under
the reference rule, see ``RULES``); it never trains. ``pipeline.train_ars`` loads
what training needs for a profile (windows, full factors) and calls ``train_ars_on``.

One module per step, the maths apart from the lifecycle:

- ``config``     ``ARSConfig``, the budget rules (``RULES``, ``LEGACY_FIELDS``) and ``PRESETS``
- ``masks``      Gumbel-sigmoid masks, the GRU ``Hypernetwork`` and the ``masked_model`` swap
- ``losses``     kept parameters, the budget penalty and target (``BudgetTarget``), the alignment term
- ``training``   ``train_masks``: the optimisation loop and its early stop (``budget_reached``)
- ``ranks``      masks -> ranks: rounding, ``repair_to_budget`` and ``fill_to_budget``
- ``plans``      trained allocations as plans: cache keys, the index and the committed demo plans
- ``allocator``  the entry points ``train_ars_on`` (train and store) and ``allocate_ars`` (serve)
"""
from ...cache import index, key_of  # the cache helpers ARS keys its plans with
from .allocator import allocate_ars, spectrum_mismatch, train_ars_on
from .config import BUDGET_SCOPES, LEGACY_FIELDS, METHOD, PRESETS, RULES, ARSConfig, preset
from .losses import (BudgetTarget, alignment_loss, budget_penalty, budget_target, budget_term, kept_params,
                     penalty_ratio, unit_spectra)
from .masks import (NOISE_MEDIAN, Hypernetwork, MaskedLinear, build_hypernetwork, gumbel_sigmoid_mask, masked_model,
                    sample_noise)
from .plans import (COMMITTED_DIR, CURVE_POINTS, allocation_from_plan, allocation_to_plan, cache_key,
                    cached_ars_plan, committed_plan_path, latest_key, store_plan)
from .ranks import allocation_from_masks, fill_to_budget, repair_to_budget, round_rank
from .training import SCOPE_KEYS, budget_reached, check_factors, train_masks

__all__ = [
    "ARSConfig", "BUDGET_SCOPES", "BudgetTarget", "COMMITTED_DIR", "CURVE_POINTS", "Hypernetwork", "LEGACY_FIELDS",
    "METHOD", "MaskedLinear", "NOISE_MEDIAN", "PRESETS", "RULES", "SCOPE_KEYS", "alignment_loss",
    "allocate_ars", "allocation_from_masks", "allocation_from_plan", "allocation_to_plan", "budget_penalty",
    "budget_reached", "budget_target", "budget_term", "build_hypernetwork", "cache_key", "cached_ars_plan",
    "check_factors", "committed_plan_path", "fill_to_budget", "gumbel_sigmoid_mask", "index", "kept_params", "key_of",
    "latest_key", "masked_model", "penalty_ratio", "preset", "repair_to_budget", "round_rank", "sample_noise",
    "spectrum_mismatch", "store_plan", "train_ars_on", "train_masks", "unit_spectra",
]
