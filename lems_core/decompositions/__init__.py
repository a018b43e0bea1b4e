"""Step 4: decompose every compressible Linear, one module per method.

    base.py        Factorization, DecompositionOptions, whiteners, the whitened SVD (shared maths)
    svd.py         plain SVD (docs/reference/methods.md §3.1)
    asvd.py        ASVD activation-aware scaling (docs/reference/methods.md §3.2)
    fwsvd.py       FWSVD Fisher-weighted scaling (docs/reference/methods.md §3.3)
    svd_llm.py     SVD-LLM Cholesky whitening (docs/reference/methods.md §3.5)
    svd_llm_v2.py  SVD-LLM v2 eigen whitening (docs/reference/methods.md §3.6)
    kfac.py        KFAC-SVD two-sided whitening (docs/reference/methods.md §2)
    saes.py        SAES-SVD, rank-dependent (docs/reference/other-seed-methods.md §1)
    erc.py         ERC-SVD's REC, rank-dependent (docs/reference/other-seed-methods.md §2.2)
    lcsvd.py       LC-SVD block-collaborative, rank-dependent (docs/reference/other-seed-methods.md §3)
    streams.py     two-stream block helpers shared by saes and lcsvd
    registry.py    the table naming all of them, and the Decomposer
"""
from .base import (DecompositionOptions, Factorization, LayerStats, NonFiniteFactorsError, StaticMethod, Whitener,
                   check_finite_factors, cholesky_lower, shrink)
from .registry import (BASE_DECOMPOSITION, METHODS, RANK_DEPENDENT, SPECS, DecompositionSpec, Decomposer, MethodOptions,
                       base_of, check_decomposition, decomposition_names, spec_of)

__all__ = [
    "BASE_DECOMPOSITION", "DecompositionOptions", "DecompositionSpec", "Decomposer", "Factorization", "LayerStats",
    "METHODS", "MethodOptions", "NonFiniteFactorsError", "RANK_DEPENDENT", "SPECS", "StaticMethod", "Whitener", "base_of",
    "check_decomposition", "check_finite_factors", "cholesky_lower", "decomposition_names", "shrink", "spec_of",
]
