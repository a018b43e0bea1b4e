"""Predicted vs measured: does the LEMS error model say what the model does?

Two checks, numpy only, from a profile and stored result records (``results.ResultStore``):

- **whole plans**: for every result with ``ranks``, the predicted Σ ε_l under the
  profile's error model (``error_model.predicted_errors``; the depth bias the profile
  fitted nearest the result's budget, as the ``lems`` allocator picks it, else the fixed
  α=0, γ=5) next to the measured KL and perplexity, with Spearman's rank correlation
  per allocator and overall. The surrogate is not in KL units, so only the order is
  compared. Results without ranks, of another model or decomposition, or whose ranks
  name other layers are listed as skipped, with the reason.
- **per layer**: the fitted single-layer curve KL_l(ref) · S_l(c) against the profile's
  measured single-layer KL points (``profile.kl_ref`` at the reference ratio and
  ``profile.measured`` at the extra ratios), with residuals in decades
  (log10 measured / fitted). The bias does not enter: each point compresses one layer.
  Points under 3x the profile's KL floor are flagged: there the floor dominates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .allocators.lems import fitted_params
from .budget import Ranks, force_factorised
from .error_model import ErrorModelParams, predicted_errors, spectral_shape
from .evaluation import protocol_name

OVERALL = "overall"
_LOG_FLOOR = 1e-12  # a KL of exactly 0 still has a log


# ------------------------------------------------------------------ whole plans
@dataclass(frozen=True)
class PredictionPoint:
    """One stored result: what the error model predicts for its ranks and what was measured."""

    method: str
    decomposition: str
    budget: float
    realised_ratio: float
    protocol: str
    source: str  # "shipped" or "cache" (``ResultStore.merged``), "" when not said
    predicted: float  # Σ ε_l under the profile's error model at this budget
    kl: float | None
    ppl: float | None  # on the check's dataset
    alpha: float
    gamma: float
    bias_from: str  # "profile fit at 0.8", or "fixed (no bias fit)"


@dataclass(frozen=True)
class SkippedResult:
    """A stored result the check could not use, and why."""

    method: str
    budget: float | None
    reason: str


@dataclass(frozen=True)
class Correlation:
    """Spearman's ρ between predicted Σ ε and each measurement, over one group of points."""

    group: str  # a method, or OVERALL
    n_kl: int
    kl: float | None  # None with fewer than 3 points or no spread
    n_ppl: int
    ppl: float | None


@dataclass(frozen=True)
class PredictionCheck:
    """``predicted_vs_measured``'s answer."""

    dataset: str
    points: list[PredictionPoint]
    skipped: list[SkippedResult]
    correlations: list[Correlation]  # one per method (first-seen order), then OVERALL

    def correlation(self, group: str) -> Correlation | None:
        return next((c for c in self.correlations if c.group == group), None)


def profile_error_model(profile, budget: float) -> tuple[ErrorModelParams, str]:
    """The profile's error model at ``budget``: its bias fit nearest the budget (as ``lems``), else α=0, γ=5."""
    base = ErrorModelParams(ref_ratio=profile.ref_ratio, use_scale=profile.kl_ref is not None)
    found = fitted_params(profile, budget, base)
    if found is None:
        return base, "fixed α=0, γ=5 (the profile has no bias fit)"
    params, at = found
    return params, f"profile fit at {at:g}"


def predicted_vs_measured(profile, records: list[dict], dataset: str = "wikitext2") -> PredictionCheck:
    """Predicted Σ ε against measured KL and ``dataset`` perplexity for every usable record (see the module doc)."""
    points, skipped = [], []
    for record in records:
        point = _point(profile, record, dataset)
        (skipped if isinstance(point, SkippedResult) else points).append(point)
    return PredictionCheck(dataset, points, skipped, correlations(points))


def _point(profile, record: dict, dataset: str) -> PredictionPoint | SkippedResult:
    """One record as a PredictionPoint, or the reason it is skipped."""
    method, budget = str(record.get("method")), _float(record.get("budget"))
    reason = _unusable(profile, record, budget)
    if reason:
        return SkippedResult(method, budget, reason)
    params, bias_from = profile_error_model(profile, budget)
    predicted = float(sum(predicted_errors(profile, record_ranks(profile, record), params).values()))
    return PredictionPoint(
        method=method, decomposition=str(record.get("decomposition")), budget=budget,
        realised_ratio=float(record.get("realised_ratio") or math.nan), protocol=protocol_name(record.get("settings")),
        source=str(record.get("source") or ""), predicted=predicted, kl=_measurement(record.get("kl")),
        ppl=_measurement((record.get("ppl") or {}).get(dataset)), alpha=params.alpha, gamma=params.gamma,
        bias_from=bias_from)


def _unusable(profile, record: dict, budget: float | None) -> str | None:
    """Why a record cannot be predicted under this profile (None when it can)."""
    if record.get("fingerprint") != profile.fingerprint:
        return f"measured on another model ({record.get('fingerprint')!r})"
    if record.get("decomposition") != profile.decomposition:
        return (f"factorised with {record.get('decomposition')!r}; this profile's spectra are "
                f"{profile.decomposition!r}")
    ranks = record.get("ranks")
    if not isinstance(ranks, dict) or not ranks:
        return "no ranks recorded (stored before results kept the plan's ranks)"
    names = {l.name for l in profile.layers}
    if set(ranks) != names:
        missing, extra = sorted(names - set(ranks)), sorted(set(ranks) - names)
        return f"its ranks name other layers (missing {missing[:2]}, unknown {extra[:2]})"
    if any(r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1) for r in ranks.values()):
        return "its ranks are not all integers >= 1 or null (dense)"
    if budget is None or not 0 < budget <= 1:
        return f"budget {record.get('budget')!r} is not a kept fraction"
    return None


def record_ranks(profile, record: dict) -> Ranks:
    """A stored result's ranks as the plan had them: an integer rank at or above break-even is forced factorised.

    JSON keeps plain integers, so ``budget.ForcedFactorisedRank`` (a plan's
    ``force_factorised`` layer) comes back as an int >= eq; a plan stores every other
    rank >= eq as dense, so such an int can only be a forced one.
    """
    eq = {l.name: l.eq_rank for l in profile.layers}
    return {name: force_factorised(rank) if rank is not None and rank >= eq[name] else rank
            for name, rank in record["ranks"].items()}


def correlations(points: list[PredictionPoint]) -> list[Correlation]:
    """Spearman's ρ (predicted vs KL, predicted vs PPL) per method in first-seen order, then over all points."""
    groups = list(dict.fromkeys(p.method for p in points))
    return [_correlation(g, [p for p in points if p.method == g]) for g in groups] + [_correlation(OVERALL, points)]


def _correlation(group: str, points: list[PredictionPoint]) -> Correlation:
    kl = [(p.predicted, p.kl) for p in points if p.kl is not None]
    ppl = [(p.predicted, p.ppl) for p in points if p.ppl is not None]
    return Correlation(group, len(kl), spearman(*zip(*kl)) if kl else None,
                       len(ppl), spearman(*zip(*ppl)) if ppl else None)


def spearman(x, y) -> float | None:
    """Spearman's rank correlation (ties get their average rank); None below 3 points or without spread."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"spearman needs two equally long sequences, got {len(x)} and {len(y)}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return None if denominator == 0 else float(rx @ ry) / denominator


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks (inf sorts last)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _float(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _measurement(value) -> float | None:
    """A measured KL / perplexity, None when absent or NaN (inf, a diverged run, is kept)."""
    value = _float(value)
    return None if value is None or math.isnan(value) else value


# --------------------------------------------------------------------- per layer
@dataclass(frozen=True)
class LayerFit:
    """One layer's measured single-layer KL points against the fitted curve at the same ratios."""

    name: str
    block: int
    kind: str
    ratios: np.ndarray  # kept ratios c with a measurement, ascending (the reference one included)
    measured: np.ndarray  # KL with only this layer compressed to c
    fitted: np.ndarray  # KL_l(ref) · S_l(c)
    reference: float  # the ratio the curve is normalised at (its residual is 0 by construction)
    floor: float | None = None  # the profile's KL floor (dense vs its own cached reference), when measured

    @property
    def near_floor(self) -> np.ndarray:
        """Points under 3x the KL floor: there the measurement is mostly the floor, not the layer."""
        if not self.floor:
            return np.zeros(len(self.ratios), dtype=bool)
        return self.measured < 3 * self.floor

    @property
    def residuals(self) -> np.ndarray:
        """log10(measured / fitted), in decades: > 0 means the model underestimates the error."""
        return np.log10(np.maximum(self.measured, _LOG_FLOOR) / np.maximum(self.fitted, _LOG_FLOOR))

    @property
    def rms(self) -> float | None:
        """RMS residual over the points other than the reference one (None when that is the only one)."""
        extra = ~np.isclose(self.ratios, self.reference)
        return float(np.sqrt(np.mean(self.residuals[extra] ** 2))) if extra.any() else None


def layer_fit_params(profile, params: ErrorModelParams | None = None) -> ErrorModelParams:
    """The single-layer curve's settings: ``params``'s energy power, normalised at the profile's measurement ratio."""
    return replace(params or ErrorModelParams(), ref_ratio=profile.ref_ratio, use_scale=profile.kl_ref is not None)


def fitted_curve(profile, name: str, ratios, params: ErrorModelParams | None = None) -> np.ndarray:
    """KL_l(ref) · S_l(c) of layer ``name`` at each kept ratio c (rank max(1, int(c · eq)), as measured)."""
    params = layer_fit_params(profile, params)
    index = next(i for i, l in enumerate(profile.layers) if l.name == name)
    layer, sigma = profile.layers[index], profile.spectra[name]
    ranks = np.clip((np.asarray(ratios, dtype=np.float64) * layer.eq_rank).astype(np.int64), 1, len(sigma))
    scale = 1.0 if profile.kl_ref is None else float(profile.kl_ref[index])
    return scale * spectral_shape(sigma, ranks, layer.eq_rank, params)


def measured_points(profile) -> dict[float, np.ndarray]:
    """ratio -> per-layer measured single-layer KL: the extra ratios and the reference one."""
    found = {float(r): np.asarray(v, dtype=np.float64) for r, v in profile.measured.items()}
    if profile.kl_ref is not None:
        found[float(profile.ref_ratio)] = np.asarray(profile.kl_ref, dtype=np.float64)
    return dict(sorted(found.items()))


def layer_fits(profile, names: list[str] | None = None, params: ErrorModelParams | None = None) -> list[LayerFit]:
    """Fitted curve vs measured points (with residuals) for each layer in ``names`` (default: all), model order."""
    points = measured_points(profile)
    ratios = np.array(list(points), dtype=np.float64)
    floor = float(profile.kl_floor["kl"]) if profile.kl_floor else None
    wanted = None if names is None else set(names)
    fits = []
    for i, layer in enumerate(profile.layers):
        if wanted is not None and layer.name not in wanted:
            continue
        measured = np.array([points[r][i] for r in points], dtype=np.float64)
        fits.append(LayerFit(layer.name, layer.block, layer.kind, ratios, measured,
                             fitted_curve(profile, layer.name, ratios, params), float(profile.ref_ratio), floor))
    return fits
