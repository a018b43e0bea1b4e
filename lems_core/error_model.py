"""The LEMS layer-wise error model (docs/reference/methods.md §1.2), numpy only.

    eps_l(r) = beta_{b(l)}(alpha, gamma) * KL_l(r_ref) * S_l(r)

- shape  S_l(r): residual spectral energy of the (whitened) spectrum at rank r,
  normalised to 1 at the reference rank r_ref = int(ref_ratio * eq_l);
- scale  KL_l(r_ref): the measured KL with only layer l compressed (or 1 when off);
- bias   beta_b: per-block depth multiplier, harmonic form ("harmonicv2").

The profile-level helpers at the end take anything with ``layers``, ``num_blocks``,
``spectra``, ``kl_ref`` and ``ref_ratio`` (a ``Profile``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .budget import Ranks, dense_if_break_even
from .derived import derived

BIAS_FORMS = ("harmonic", "constant", "linear")


@dataclass(frozen=True)
class ErrorModelParams:
    """The three terms of the LEMS surrogate; reference defaults (configs/search/lems.yaml)."""

    energy_power: int = 2  # "energy2": sigma^2; 1 uses sigma
    ref_ratio: float = 0.1  # measurement point of the scale
    use_scale: bool = True  # multiply by the measured KL
    alpha: float = 0.0  # harmonic exponent of the depth bias
    gamma: float = 5.0  # strength of the depth bias
    bias_form: str = "harmonic"

    def __post_init__(self):
        if self.energy_power not in (1, 2):
            raise ValueError("energy_power must be 1 or 2")
        if not 0.0 < self.ref_ratio < 1.0:
            raise ValueError("ref_ratio must lie in (0, 1)")
        if self.bias_form not in BIAS_FORMS:
            raise ValueError(f"bias_form must be one of {BIAS_FORMS}")
        for name in ("alpha", "gamma", "ref_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.gamma < 0 or self.alpha < 0:
            raise ValueError("alpha and gamma must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ErrorModelParams":
        return ErrorModelParams(**{k: d[k] for k in ErrorModelParams.__dataclass_fields__ if k in d})


def residual_energy(sigma: np.ndarray, ranks: np.ndarray, power: int = 2) -> np.ndarray:
    """1 - E(r)/E for each rank r, with E(r) = sum_{i<=r} sigma_i^power.

    The tail energy is >= 0; ``_tail_fraction`` clamps the round-off of 1 - E(r)/E at 0."""
    energy = np.asarray(sigma, dtype=np.float64) ** power
    kept = np.concatenate([[0.0], np.cumsum(energy)])
    total = kept[-1] if kept[-1] > 0 else 1.0
    ranks = np.clip(np.asarray(ranks, dtype=np.int64), 0, len(energy))
    return _tail_fraction(kept[ranks], total)


def _tail_fraction(kept: np.ndarray, total) -> np.ndarray:
    """1 - kept / total, at least 0 (a cumulative energy never exceeds its total in exact arithmetic)."""
    return np.maximum(1.0 - kept / total, 0.0)


def reference_rank(eq_rank: int, ref_ratio: float) -> int:
    return int(ref_ratio * eq_rank)


def spectral_shape(sigma: np.ndarray, ranks: np.ndarray, eq_rank: int, params: ErrorModelParams) -> np.ndarray:
    """S_l(r): residual energy rescaled to equal 1 at the reference rank (docs/reference/methods.md §1.2)."""
    ref = residual_energy(sigma, np.array([reference_rank(eq_rank, params.ref_ratio)]), params.energy_power)[0]
    return residual_energy(sigma, ranks, params.energy_power) / max(ref, 1e-6)


def depth_bias(num_blocks: int, params: ErrorModelParams) -> np.ndarray:
    """beta_b for b = 0..B-1 (docs/reference/methods.md §1.2).

    harmonic: H_b = sum_{k=b}^{B-1} (k+1)^-alpha, h_b = (H_b - H_{B-1}) / (H_0 - H_{B-1}),
    beta_b = 1 + gamma * h_b; with alpha = 0 it is linear from 1 + gamma down to 1.
    """
    if params.bias_form == "constant" or num_blocks < 2:
        return np.ones(num_blocks)
    b = np.arange(num_blocks)
    if params.bias_form == "linear":
        return 1.0 + params.gamma * (num_blocks - 1 - b) / (num_blocks - 1)
    terms = (b + 1.0) ** (-params.alpha)
    tails = np.cumsum(terms[::-1])[::-1]  # H_b
    h = (tails - tails[-1]) / (tails[0] - tails[-1])
    return 1.0 + params.gamma * h


def layer_errors(
    sigma: np.ndarray, ranks: np.ndarray, eq_rank: int, block_bias: float, kl_scale: float | None, params: ErrorModelParams
) -> np.ndarray:
    """eps_l at each rank: bias x scale x shape."""
    scale = kl_scale if (params.use_scale and kl_scale is not None) else 1.0
    return block_bias * scale * spectral_shape(sigma, ranks, eq_rank, params)


def block_biases(profile, params: ErrorModelParams) -> np.ndarray:
    """beta_b per layer (docs/reference/methods.md §1.2); blocks come from LayerInfo.block."""
    return depth_bias(profile.num_blocks, params)[[l.block for l in profile.layers]]


def kl_scales(profile, params: ErrorModelParams) -> np.ndarray | None:
    """The per-layer KL scale, or None when the error model does not use it."""
    if not params.use_scale:
        return None
    if profile.kl_ref is None:
        raise ValueError(
            "the error model uses the measured KL scale (use_scale=True) but this profile has no "
            "kl_ref measurements: measure them, or set use_scale=False for a spectrum-only model"
        )
    if not math.isclose(params.ref_ratio, profile.ref_ratio, rel_tol=1e-9):
        raise ValueError(
            f"error model ref_ratio {params.ref_ratio} differs from the profile's measurement point "
            f"{profile.ref_ratio}: the spectral shape must be normalised where the KL was measured"
        )
    return np.asarray(profile.kl_ref, dtype=np.float64)


def predicted_errors(profile, ranks: Ranks, params: ErrorModelParams) -> dict[str, float]:
    """The LEMS surrogate error of each layer at arbitrary ranks (dense: 0).

    Lets any allocation be scored under the same error model (e.g. uniform vs LEMS).
    ``layer_errors`` at one rank per layer, from the memoised cumulative energies of all
    layers at once: the same float operations in the same order, no loop over layers
    but the one that reads the ranks.
    """
    biases, scales = block_biases(profile, params), kl_scales(profile, params)
    flat, offsets, lengths, totals = _flat_energy(profile, params.energy_power)
    layers = profile.layers
    chosen = [dense_if_break_even(l, ranks[l.name]) for l in layers]
    dense = np.array([r is None for r in chosen], dtype=bool)
    rank = np.array([0 if r is None else int(r) for r in chosen], dtype=np.int64)
    ref_rank = np.array([reference_rank(l.eq_rank, params.ref_ratio) for l in layers], dtype=np.int64)
    ref = _tail_fraction(flat[offsets + np.minimum(np.maximum(ref_rank, 0), lengths)], totals)
    shape = _tail_fraction(flat[offsets + np.minimum(np.maximum(rank, 0), lengths)], totals) / np.maximum(ref, 1e-6)
    scale = scales if (params.use_scale and scales is not None) else np.ones(len(layers))
    errors = np.where(dense, 0.0, biases * scale * shape)
    return {l.name: float(e) for l, e in zip(layers, errors)}


def _flat_energy(profile, power: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``energy_cumsums`` back to back: (values, offset and length - 1 of each layer's, totals), memoised."""
    def compute():
        cums = energy_cumsums(profile, power)
        lengths = np.array([len(c) - 1 for c in cums], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
        totals = np.array([c[-1] if c[-1] > 0 else 1.0 for c in cums], dtype=np.float64)
        return np.concatenate(cums), offsets, lengths, totals
    return derived(profile, ("flat_energy", power, id(profile.spectra)), compute)


def energy_cumsums(profile, power: int) -> list[np.ndarray]:
    """Per layer, [0, cumsum(sigma^power)] (what ``residual_energy`` sums), memoised on the profile."""
    def compute() -> list[np.ndarray]:
        return [np.concatenate([[0.0], np.cumsum(np.asarray(profile.spectra[l.name], dtype=np.float64) ** power)])
                for l in profile.layers]
    return derived(profile, ("energy_cumsums", power, id(profile.spectra)), compute)
