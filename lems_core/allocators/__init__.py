"""Step 7: rank allocators. Each turns a profile and a kept-fraction budget into ranks.

One module per method, one registry (``registry.py``), one budget accounting
(``lems_core/budget.py``, shared with plans) and one result type (``base.Allocation``):

- ``lems``          LEMS error model + exact multiple-choice knapsack (docs/reference/methods.md §1.2-1.4), and ``fit_bias`` (docs/reference/methods.md §1.3);
                    registered as ``lems`` (bias fitted in the profile) and ``lems_fixed`` (fixed bias)
- ``lems_mp``       LEMS-MP: the error model fitted through every measured KL point, floor-aware;
                    ``lems_adaptive`` measures more points where the plan needs them
- ``uniform``       rank = int(ratio * eq) everywhere (docs/reference/methods.md §4.1)
- ``svdllm_v2``     SVD-LLM V2 heterogeneous ratios by matrix type (docs/reference/methods.md §4.3)
- ``mrcs``          MRCS greedy with exponential schedule (docs/reference/methods.md §4.4); ``mrcs_dense`` leaves untouched layers dense
- ``atp``           ATP arithmetic-progression block ratios (docs/reference/methods.md §4.5), scored on the model
- ``asvd``          ASVD sensitivity-based truncation-rank search (docs/reference/methods.md §4.2), by single-layer PPL; ``asvd_kl`` by KL
- ``ars``           ARS learned masks (docs/reference/methods.md §4.6): serves plans trained by ``pipeline.train_ars``
- ``erc_plc``       ERC-SVD partial-layer compression, scored on the model
- ``lcsvd_search``  LC-SVD sensitivity-prior search, scored on the model

The exact solver they use is ``lems_core/solver/``.
"""
from ..budget import (BUDGET_TOL, candidate_lower_bound, candidate_ranks, params_of, rank_at_ratio,
                      realised_ratio)
from ..error_model import predicted_errors
from .asvd import ASVD_POINTS, AsvdScoreWarning, allocate_asvd, allocate_asvd_kl
from .atp import ATP_STEPS, allocate_atp, atp_block_ratios, atp_grid
from .base import Allocation, BudgetBelowMinimumError, ScoreFn
from .lems import (BIAS_FIT_RATIOS, BiasFit, allocate_lems, allocate_lems_fixed, allocate_lems_reference, fit_bias,
                   fitted_params, lems_error_table, profile_bias_fit)
from .mrcs import allocate_mrcs, allocate_mrcs_dense
from .registry import ALLOCATORS, MODEL_SCORED, SPECS, AllocatorSpec, allocate, allocator_names, register_allocator
from .svdllm_v2 import allocate_svdllm_v2, svdllm_v2_keep_ratios
from .uniform import allocate_uniform

__all__ = [
    "ALLOCATORS", "ASVD_POINTS", "ATP_STEPS", "Allocation", "AllocatorSpec", "AsvdScoreWarning", "BUDGET_TOL",
    "BiasFit", "BudgetBelowMinimumError", "MODEL_SCORED", "SPECS", "ScoreFn", "allocate", "allocate_asvd",
    "allocate_asvd_kl", "allocate_atp", "allocate_lems", "allocate_lems_fixed", "allocate_lems_reference",
    "allocate_mrcs", "allocate_mrcs_dense", "BIAS_FIT_RATIOS",
    "fitted_params", "profile_bias_fit", "allocate_svdllm_v2", "allocate_uniform", "allocator_names",
    "atp_block_ratios", "atp_grid", "candidate_lower_bound", "candidate_ranks", "fit_bias", "lems_error_table",
    "params_of", "predicted_errors", "rank_at_ratio", "realised_ratio", "register_allocator",
    "svdllm_v2_keep_ratios",
]

