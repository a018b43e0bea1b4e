"""Round-off rules shared by the decompositions, the measurements and the validators.

Quantities that are >= 0 in exact arithmetic (a KL divergence, a residual energy,
a variance) can come out a few units of round-off below 0 when they are nearly 0.
They are clamped where they are computed (``nonnegative``); validators of stored
values accept such round-off (``KL_ROUNDOFF``) and reject only real negatives.

Factors of a decomposition must be finite before any stage multiplies with them
(``check_finite_factors``): a NaN would otherwise surface much later as an
infinite perplexity with no layer named.
"""
from __future__ import annotations

import numpy as np
import torch

FLOAT32_EPS = float(np.finfo(np.float32).eps)

# KL is measured from float32 log-softmaxes at temperature 0.6. Each log-probability
# carries an absolute error of about eps32 x the magnitude of the log-softmax input
# z / T (and of the log-sum-exp); logits up to ~38 (|z / T| <= 64) cover real LMs.
# With p ~= q the KL of one position is then off by at most 2 x 64 eps32, and a mean
# over positions by no more: a stored KL down to -KL_ROUNDOFF is round-off, not a
# measurement.
KL_ROUNDOFF = 2 * 64 * FLOAT32_EPS


class NonFiniteFactorsError(ValueError):
    """A layer's low-rank factors (or spectrum) hold NaN or inf; the message names the layer and the stage."""


def nonnegative(value: float) -> float:
    """``value`` clamped to >= 0 (a NaN stays NaN, for the validators to see)."""
    return 0.0 if value < 0 else value


def rank_tolerance(largest: float, shape: tuple[int, ...], dtype: torch.dtype) -> float:
    """Singular values at or below this are numerically zero: s_max * eps * max(m, n), numpy's matrix_rank rule."""
    return float(largest) * torch.finfo(dtype).eps * max(shape)


def check_finite_factors(layer: str, left: torch.Tensor, right: torch.Tensor, stage: str,
                         sigma: np.ndarray | None = None) -> None:
    """NonFiniteFactorsError naming ``layer`` and ``stage`` unless the factors (and spectrum) are all finite."""
    parts = {"left factor": left, "right factor": right}
    bad = [what for what, t in parts.items() if not bool(torch.isfinite(t).all())]
    if sigma is not None and not np.all(np.isfinite(sigma)):
        bad.append("spectrum")
    if bad:
        raise NonFiniteFactorsError(
            f"layer {layer}: the {' and '.join(bad)} hold NaN or inf ({stage}); the layer's weight or "
            "calibration statistics are not finite, or cached factors are damaged: clear the factor cache "
            "and rebuild")
