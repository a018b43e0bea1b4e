"""LEMS-MP: the LEMS error model calibrated on several measured points per layer, and the
same exact knapsack (docs/reference/methods.md §1.2-1.4, extended; documented in the README).

One-point LEMS scales the spectral shape by the single KL measured at the reference
ratio. Where a profile holds more measurements (``Profile.measured``, or points added
one at a time by ``adaptive.py``), LEMS-MP makes each layer's curve pass through all
of them:

- **Floor.** Measured single-layer KL never falls below a profile-wide floor (the
  demo's KFAC profile: ~4.65e-4, reached by block 0's q/k at 0.7-0.9; it is the KL of
  the dense model against its own bf16-cached reference logits, not a layer's
  signal). The model fits the *excess* KL - floor; a point within ``floor_rtol`` of
  the floor is "at the floor": it only says that the excess is below the resolution
  ``floor * floor_rtol``, so it is not passed through but caps the excess from its
  rank on. The floor is the profile's own ``kl_floor`` (attribute, ``meta`` or
  ``dense`` entry) when present, else the lowest measurement when some layer shows a
  flat tail at it, else 0.
- **Shape coordinate.** With R(r) = 1 - E(r)/E the residual spectral energy (docs/reference/methods.md §1.2),
  log(excess) is interpolated piecewise linearly in log R between the measured
  points. Because both the excess (made non-increasing by an isotonic fit) and R fall
  with rank, every segment has a non-negative slope in log R: the curve is monotone
  in rank and passes through every resolved point. Beyond the outermost points it
  follows the spectral shape itself (excess proportional to R), as one-point LEMS does.
- **Bias.** The depth bias beta_b (docs/reference/methods.md §1.2) multiplies the excess, as in LEMS.

With only the reference point and no floor this is exactly one-point LEMS.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from ..budget import BUDGET_TOL, candidate_cost, candidate_ranks, check_ratio, dense_cost
from ..error_model import ErrorModelParams, block_biases, residual_energy
from ..model import LayerInfo
from ..profile import Profile
from ..solver import solve_mckp
from .base import Allocation, finite_score
from .latency_budget import below_minimum, cost_key, finish_under_cost, knapsack_budget

FLOOR_RTOL = 0.02  # a KL within 2% of the floor is "at the floor" (demo: block-0 q/k at 0.7-0.9 agree to 0.1%)
_TINY = 1e-300

Points = dict[str, list[tuple[int, float]]]  # layer name -> [(rank, measured single-layer KL)]


@dataclass(frozen=True)
class LayerCurve:
    """One layer's fitted excess-KL curve: anchors in the shape coordinate, and the floor cap.

    ``x`` = -log R at the resolved points (increasing with rank), ``g`` = log(excess / R)
    there; ``cap_rank``: from this rank on the excess is at most ``resolution``
    (a point at the floor was measured there), or None.
    """

    x: np.ndarray
    g: np.ndarray
    cap_rank: int | None
    resolution: float
    points: int  # measured points the curve was fitted on (resolved + at the floor)


def measured_rank(layer: LayerInfo, ratio: float) -> int:
    """The rank a sweep at ``ratio`` measured: int(ratio * eq), at least 1 (``sensitivity.rank_at``)."""
    return min(max(1, int(ratio * layer.eq_rank)), min(layer.out_features, layer.in_features))


def profile_points(profile: Profile, ratios=None, extra: Points | None = None) -> Points:
    """Every layer's measured (rank, KL) points: the reference KL, the profile's ``measured``
    ratios (all, or those in ``ratios``), and ``extra`` points (e.g. adaptive measurements)."""
    if profile.kl_ref is None:
        raise ValueError("lems_mp needs measured KL (profile.kl_ref): this profile has none")
    chosen = sorted(profile.measured) if ratios is None else [float(r) for r in ratios]
    chosen = [r for r in chosen if not math.isclose(r, profile.ref_ratio)]
    missing = [r for r in chosen if r not in profile.measured]
    if missing:
        raise ValueError(f"profile has no measured KL at ratio(s) {missing}; it has {sorted(profile.measured)}")
    points: Points = {}
    for i, layer in enumerate(profile.layers):
        pts = [(measured_rank(layer, profile.ref_ratio), float(profile.kl_ref[i]))]
        pts += [(measured_rank(layer, r), float(profile.measured[r][i])) for r in chosen]
        pts += [(int(r), float(k)) for r, k in (extra or {}).get(layer.name, [])]
        points[layer.name] = pts
    return points


def kl_floor(profile: Profile, rtol: float = FLOOR_RTOL) -> float:
    """The profile's KL measurement floor (see the module docstring): the floor of the
    source profile when the extra points were carried over from one
    (``scripts/carry_measured_points.py``: they keep its bf16 floor), else its own field when
    present (``Profile.kl_floor["kl"]``, measured by ``sensitivity.kl_floor``), else the lowest measured KL if some layer's two highest measured ratios both
    sit within ``rtol`` of it (a flat tail), else 0."""
    carried = (profile.meta.get("carried_points") or {}).get("kl_floor_of_source")  # the points' own floor
    for source in (carried, getattr(profile, "kl_floor", None), profile.meta.get("kl_floor"), profile.dense.get("kl_floor")):
        if isinstance(source, dict):  # Profile.kl_floor: {"kl": ..., "reference_precision": ...}
            source = source.get("kl")
        if source is not None:
            return float(source)
    if profile.kl_ref is None or len(profile.measured) < 2:
        return 0.0
    stacked = np.stack([profile.measured[r] for r in sorted(profile.measured)] + [profile.kl_ref])
    lowest = float(stacked.min())
    tail = stacked[-3:-1]  # the two highest measured ratios
    flat = (tail <= lowest * (1 + rtol)).all(axis=0)
    return lowest if lowest > 0 and flat.any() else 0.0


def _isotonic_decreasing(values: np.ndarray) -> np.ndarray:
    """Least-squares non-increasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return np.concatenate([np.full(int(w), m) for m, w in blocks])


def shape_coordinate(sigma: np.ndarray, ranks, power: int) -> np.ndarray:
    """x(r) = -log R(r), non-decreasing in rank."""
    return -np.log(np.maximum(residual_energy(sigma, np.asarray(ranks), power), _TINY))


def fit_curve(sigma: np.ndarray, points: list[tuple[int, float]], floor: float = 0.0,
              floor_rtol: float = FLOOR_RTOL, power: int = 2) -> LayerCurve:
    """Fit one layer's excess-KL curve to its measured (rank, KL) points (module docstring)."""
    if not points:
        raise ValueError("fit_curve needs at least one measured point")
    ranks = np.array([r for r, _ in points], dtype=np.int64)
    kl = np.array([k for _, k in points], dtype=np.float64)
    order = np.argsort(ranks, kind="stable")
    ranks, kl = ranks[order], kl[order]
    resolution = floor * floor_rtol if floor > 0 else 0.0
    resolved = kl - floor > resolution if floor > 0 else kl > 0
    cap_rank = None
    if resolved.any():
        last = int(np.flatnonzero(resolved)[-1])
        censored_after = np.flatnonzero(~resolved[last + 1:])
        if censored_after.size:
            cap_rank = int(ranks[last + 1 + censored_after[0]])
        r_res, excess = ranks[resolved], kl[resolved] - floor
    else:  # every point at the floor: excess = resolution there, the shape elsewhere
        cap_rank = int(ranks[0])
        r_res, excess = ranks[:1], np.array([max(resolution, _TINY)])
    log_excess = _isotonic_decreasing(np.log(excess))
    x = shape_coordinate(sigma, r_res, power)
    g = log_excess + x  # log(excess / R)
    ux, inverse = np.unique(x, return_inverse=True)  # equal R (flat spectrum): one anchor
    ug = np.bincount(inverse, weights=g) / np.bincount(inverse)
    return LayerCurve(ux, ug, cap_rank, resolution, len(points))


def curve_excess(curve: LayerCurve, sigma: np.ndarray, ranks, power: int = 2) -> np.ndarray:
    """The fitted excess KL at ``ranks``: exp(-x + interp(x)), capped at the floor's resolution."""
    ranks = np.asarray(ranks, dtype=np.int64)
    x = shape_coordinate(sigma, ranks, power)
    excess = np.exp(-x + np.interp(x, curve.x, curve.g))  # constant g outside the anchors = the shape
    if curve.cap_rank is not None:
        excess = np.where(ranks >= curve.cap_rank, np.minimum(excess, curve.resolution), excess)
    return excess


@dataclass
class MultiPointModel:
    """The fitted LEMS-MP model of a profile: floor, depth bias and one curve per layer."""

    floor: float
    biases: np.ndarray  # beta_b per layer (docs/reference/methods.md §1.2)
    curves: dict[str, LayerCurve]
    params: ErrorModelParams

    def excess(self, profile: Profile, layer_index: int, ranks) -> np.ndarray:
        layer = profile.layers[layer_index]
        return curve_excess(self.curves[layer.name], profile.spectra[layer.name], ranks, self.params.energy_power)

    def errors(self, profile: Profile, layer_index: int, ranks) -> np.ndarray:
        """eps_l(r) = beta_b * excess_l(r): what the knapsack minimises."""
        return self.biases[layer_index] * self.excess(profile, layer_index, ranks)

    def predicted_kl(self, profile: Profile, layer_index: int, ranks) -> np.ndarray:
        """Single-layer KL as a sweep would measure it: floor + excess (no depth bias)."""
        return self.floor + self.excess(profile, layer_index, ranks)


def fit_multipoint(profile: Profile, params: ErrorModelParams = ErrorModelParams(), ratios=None,
                   extra_points: Points | None = None, floor: float | None = None,
                   floor_rtol: float = FLOOR_RTOL) -> MultiPointModel:
    """Fit every layer's curve to its measured points (``ratios``: which of ``profile.measured``)."""
    if not math.isclose(params.ref_ratio, profile.ref_ratio, rel_tol=1e-9):
        raise ValueError(f"error model ref_ratio {params.ref_ratio} differs from the profile's {profile.ref_ratio}")
    floor = kl_floor(profile, floor_rtol) if floor is None else float(floor)
    points = profile_points(profile, ratios, extra_points)
    curves = {l.name: fit_curve(profile.spectra[l.name], points[l.name], floor, floor_rtol, params.energy_power)
              for l in profile.layers}
    return MultiPointModel(floor, block_biases(profile, params), curves, params)


def lems_mp_error_table(profile: Profile, model: MultiPointModel, ratio: float, multiple: int | None = 8,
                        cost_model="params"):
    """Knapsack options per layer, dense first, as ``lems.lems_error_table`` but with LEMS-MP errors."""
    costs, errors, options = [], [], []
    for i, layer in enumerate(profile.layers):
        ranks = candidate_ranks(layer, ratio, multiple)
        costs.append(np.concatenate([[dense_cost(layer, cost_model)], candidate_cost(layer, ranks, cost_model)]))
        errors.append(np.concatenate([[0.0], model.errors(profile, i, ranks)]))
        options.append([None] + [int(r) for r in ranks])
    return costs, errors, options


def solve_with_model(profile: Profile, ratio: float, model: MultiPointModel, method: str = "lems_mp",
                     multiple: int | None = 8, cost_model="params") -> Allocation:
    """Solve the exact knapsack (docs/reference/methods.md §1.4) under a fitted multi-point model (parameter or latency cost, ``latency_budget``)."""
    ratio = check_ratio(ratio)
    costs, errors, options = lems_mp_error_table(profile, model, ratio, multiple, cost_model)
    budget = knapsack_budget(profile, ratio, ratio, cost_model)
    minimum = sum(float(c.min()) for c in costs)
    if minimum > budget * (1 + BUDGET_TOL):
        raise below_minimum(method, ratio, minimum, profile, cost_model, None,
                            f"every layer at its smallest candidate rank, multiple={multiple}")
    start = time.perf_counter()
    choice = solve_mckp(costs, errors, budget)
    seconds = time.perf_counter() - start
    ranks = {l.name: options[i][j] for i, (l, j) in enumerate(zip(profile.layers, choice))}
    per_layer = {l.name: float(errors[i][j]) for i, (l, j) in enumerate(zip(profile.layers, choice))}
    info = {"error_model": model.params.to_dict(), "solver": "exact", "multiple": multiple,
            "cost_model": cost_key(cost_model), "kl_floor": model.floor,
            "points_per_layer": float(np.mean([c.points for c in model.curves.values()]))}
    alloc = Allocation(method, ratio, ranks, per_layer, float(sum(per_layer.values())), seconds, info)
    return finish_under_cost(profile, alloc, cost_model, ratio)


def allocate_lems_mp(
    profile: Profile,
    ratio: float,
    params: ErrorModelParams = ErrorModelParams(),
    fit_ratios=None,
    extra_points: Points | None = None,
    floor: float | None = None,
    floor_rtol: float = FLOOR_RTOL,
    multiple: int | None = 8,
    cost_model="params",
) -> Allocation:
    """LEMS-MP: the multi-point error model (all measured ratios, or ``fit_ratios``) + the exact ILP."""
    model = fit_multipoint(profile, params, fit_ratios, extra_points, floor, floor_rtol)
    alloc = solve_with_model(profile, ratio, model, "lems_mp", multiple, cost_model)
    alloc.info["fit_ratios"] = sorted({profile.ref_ratio, *(profile.measured if fit_ratios is None else fit_ratios)})
    return alloc


def fit_bias_mp(profile: Profile, ratio: float, score_fn, params: ErrorModelParams = ErrorModelParams(),
                n_trials: int = 10, seed: int = 42, alpha_range: tuple[float, float] = (0.0, 3.0),
                gamma_range: tuple[float, float] = (0.0, 7.0), **mp_options) -> tuple[ErrorModelParams, Allocation]:
    """The LEMS bias fit (``lems.fit_bias``, docs/reference/methods.md §1.3: the same seeded (alpha, gamma)
    draws, first lowest score wins) over LEMS-MP allocations. Returns (params, allocation)."""
    rng = np.random.RandomState(seed)
    best, trials = None, []
    for t in range(n_trials):
        trial = replace(params, alpha=float(rng.uniform(*alpha_range)), gamma=float(rng.uniform(*gamma_range)),
                        bias_form="harmonic")
        alloc = allocate_lems_mp(profile, ratio, trial, **mp_options)
        score = finite_score(score_fn(alloc.ranks))
        trials.append({"trial": t, "alpha": trial.alpha, "gamma": trial.gamma, "score": score})
        if best is None or score < best[0]:
            best = (score, trial, alloc)
    if best is None:
        raise ValueError("fit_bias_mp needs n_trials >= 1")
    best[2].info["bias_fit"] = trials
    return best[1], best[2]
