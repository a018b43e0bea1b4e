"""Step 7: rank allocators. Each turns a profile and a kept-fraction budget into ranks.

Every allocator returns an ``Allocation`` under the same budget accounting
(methods.md §0): over the compressible Linears,

    sum_l cost_l <= ratio * sum_l m_l n_l,   cost_l = r_l (m_l + n_l), or m_l n_l when dense,

with the break-even rule (rank >= eq_rank is dense). Ranks are ``int`` or ``None``
(dense). Methods (methods.md §1, §4):

- ``lems``       the LEMS error model + exact multiple-choice knapsack (§1.2-1.4)
- ``uniform``    rank = int(ratio * eq) everywhere (§4.1)
- ``svdllm_v2``  SVD-LLM V2 heterogeneous ratios by matrix type (§4.3)
- ``mrcs``       MRCS / "memvit" greedy with exponential schedule (§4.4)
- ``atp``        ATP arithmetic-progression block ratios, 11-value grid (§4.5)
- ``asvd``       ASVD sensitivity-based truncation-rank search (§4.2)

plus ``fit_bias`` (§1.3), the seeded random search over the depth-bias (alpha, gamma).
Other modules add methods with ``register_allocator``.
"""
from __future__ import annotations

import heapq
import importlib
import inspect
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

import numpy as np

from .allocation import InfeasibleBudgetError, solve_mckp, solve_mckp_pulp
from .error_model import ErrorModelParams, depth_bias, layer_errors
from .model import LayerInfo
from .plan import RankPlan, layer_param_cost, normalise_rank, plan_from_allocation
from .profile import Profile

Ranks = dict[str, "int | None"]
ScoreFn = Callable[[Ranks], float]

BUDGET_TOL = 1e-9  # relative slack allowed on the budget (float round-off only)
ASVD_POINTS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # methods.md §4.2, "asvd_default"
ATP_STEPS = 10  # 11 grid values 0, 0.2h, ..., 2h (methods.md §4.5)


@dataclass
class Allocation:
    """The result of one allocator run."""

    method: str
    ratio: float  # the kept-fraction budget it was asked for
    ranks: Ranks  # layer name -> rank, None = dense
    predicted_error: dict[str, float] | None = None  # per layer, under the error model used
    objective: float | None = None  # the allocator's own objective value, when it has one
    solve_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def to_plan(self, profile: Profile, params: ErrorModelParams | None = None, meta: dict | None = None) -> RankPlan:
        """The rank plan of this allocation for ``profile``'s model (see ``plan_from_allocation``)."""
        return plan_from_allocation(profile, self, params, meta)


# =========================================================================== accounting
def params_of(profile: Profile, ranks: Ranks) -> int:
    """Parameters stored by the compressible Linears at these ranks (dense when None or >= eq)."""
    _check_covers(profile, ranks)
    return sum(layer_param_cost(l.out_features, l.in_features, ranks[l.name]) for l in profile.layers)


def realised_ratio(profile: Profile, ranks: Ranks) -> float:
    """params_of / dense parameters of the compressible Linears (the budget denominator, §0)."""
    return params_of(profile, ranks) / profile.total_params


def _check_covers(profile: Profile, ranks: Ranks) -> None:
    missing = [l.name for l in profile.layers if l.name not in ranks]
    if missing:
        raise ValueError(f"ranks lack {len(missing)} layer(s), e.g. {missing[:3]}")
    for l in profile.layers:
        r = ranks[l.name]
        if r is not None and not 1 <= r <= min(l.out_features, l.in_features):
            raise ValueError(f"rank {r} of {l.name} is outside [1, {min(l.out_features, l.in_features)}]")


def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"ratio is the kept fraction and must lie in (0, 1], got {ratio}")
    return ratio


def _budget(profile: Profile, ratio: float) -> float:
    return ratio * profile.total_params


def _within_budget(profile: Profile, ranks: Ranks, ratio: float) -> bool:
    return params_of(profile, ranks) <= _budget(profile, ratio) * (1 + BUDGET_TOL)


class BudgetBelowMinimumError(InfeasibleBudgetError):
    """An ``InfeasibleBudgetError`` that says which allocator and which minimum.

    Each method has its own smallest reachable ratio (candidate grids, lower bounds,
    rank >= 1); asking for less is an error rather than a silently missed budget.
    """

    def __init__(self, method: str, ratio: float, min_ratio: float, total_params: int, why: str):
        super().__init__(min_ratio * total_params, ratio * total_params)
        self.method, self.ratio, self.min_ratio = method, ratio, min_ratio
        self.args = (f"{method}: budget ratio {ratio:g} is below the method's minimum {min_ratio:.4f} ({why})",)


def _require_budget(profile: Profile, ranks: Ranks, ratio: float, method: str, why: str) -> None:
    """Raise BudgetBelowMinimumError when ``ranks`` (the method's cheapest choice) exceed the budget."""
    if not _within_budget(profile, ranks, ratio):
        raise BudgetBelowMinimumError(method, ratio, realised_ratio(profile, ranks), profile.total_params, why)


def _dense_if_break_even(layer: LayerInfo, rank: int | None) -> int | None:
    return normalise_rank(layer.out_features, layer.in_features, rank)


def _rank_at_ratio(layer: LayerInfo, keep: float) -> int | None:
    """Reference ratio -> rank: int(keep * eq), clipped to [1, min(m, n)], dense at break-even."""
    if keep >= 1.0:
        return None
    rank = int(np.clip(int(keep * layer.eq_rank), 1, min(layer.out_features, layer.in_features)))
    return _dense_if_break_even(layer, rank)


def _finish(profile: Profile, alloc: Allocation) -> Allocation:
    """Attach the budget bookkeeping every allocator reports, and assert it holds."""
    alloc.info["params_kept"] = params_of(profile, alloc.ranks)
    alloc.info["params_total"] = profile.total_params
    alloc.info["realised_ratio"] = alloc.info["params_kept"] / profile.total_params
    alloc.info["dense_layers"] = sum(r is None for r in alloc.ranks.values())
    _check_result(profile, alloc)
    return alloc


def _check_result(profile: Profile, alloc: Allocation) -> None:
    """Every allocator, built in or registered, must return ranks within its budget."""
    if not _within_budget(profile, alloc.ranks, alloc.ratio):  # a bug in the allocator, never a user error
        raise RuntimeError(f"allocator {alloc.method!r} exceeded its budget: realised ratio "
                           f"{realised_ratio(profile, alloc.ranks):.6f} > {alloc.ratio}")


# =========================================================================== LEMS (§1)
def candidate_lower_bound(ratio: float) -> float:
    """lb of §1.4: candidates need c = r/eq >= 0.3 when ratio >= 0.5, else >= 0.1."""
    return 0.3 if ratio >= 0.5 else 0.1


def candidate_ranks(layer: LayerInfo, ratio: float, multiple: int | None = 8) -> np.ndarray:
    """Factorised rank candidates of one layer (methods.md §1.4); dense is added by the caller.

    r in [floor(0.1 eq), floor(0.95 eq)), r % multiple == 0, r/eq >= lb(ratio), r >= 1.
    The reference tests ``int((r/eq)*eq) % multiple``, which can drop a valid r when
    the float product rounds below r; here r itself is tested.
    """
    eq = layer.eq_rank
    ranks = np.arange(int(0.1 * eq), int(0.95 * eq), dtype=np.int64)
    keep = (ranks >= 1) & (ranks / max(eq, 1) >= candidate_lower_bound(ratio))
    if multiple and multiple > 1:
        keep &= ranks % multiple == 0
    return ranks[keep]


def _block_biases(profile: Profile, params: ErrorModelParams) -> np.ndarray:
    """beta_b per layer (methods.md §1.2); blocks come from LayerInfo.block."""
    return depth_bias(profile.num_blocks, params)[[l.block for l in profile.layers]]


def _kl_scales(profile: Profile, params: ErrorModelParams) -> np.ndarray | None:
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


def _candidate_cost(layer: LayerInfo, ranks: np.ndarray, cost_model: str) -> np.ndarray:
    """Parameter cost of factorised candidates.

    "params" (default): the real r(m+n). "reference": c*m*n with c = r/eq as in the
    reference ILP (§1.4); since eq = floor(mn/(m+n)) this is >= r(m+n), i.e. slightly
    pessimistic, so the real budget still holds.
    """
    if cost_model == "params":
        return ranks.astype(np.float64) * (layer.out_features + layer.in_features)
    if cost_model == "reference":
        return ranks / layer.eq_rank * float(layer.params)
    raise ValueError(f"cost_model must be 'params' or 'reference', got {cost_model!r}")


def lems_error_table(
    profile: Profile, params: ErrorModelParams, ratio: float, multiple: int | None = 8, cost_model: str = "params"
) -> tuple[list[np.ndarray], list[np.ndarray], list[list[int | None]]]:
    """Options of the LEMS knapsack, per layer: (costs, errors, ranks), dense first.

    Dense costs m*n with error 0; factorised candidates (``candidate_ranks``) cost
    r(m+n) and err beta_b * KL_l * S_l(r) (methods.md §1.2, via ``layer_errors``).
    """
    ratio = _check_ratio(ratio)
    biases, scales = _block_biases(profile, params), _kl_scales(profile, params)
    costs, errors, options = [], [], []
    for i, layer in enumerate(profile.layers):
        ranks = candidate_ranks(layer, ratio, multiple)
        scale = None if scales is None else float(scales[i])
        errs = layer_errors(profile.spectra[layer.name], ranks, layer.eq_rank, float(biases[i]), scale, params)
        costs.append(np.concatenate([[float(layer.params)], _candidate_cost(layer, ranks, cost_model)]))
        errors.append(np.concatenate([[0.0], errs]))
        options.append([None] + [int(r) for r in ranks])
    return costs, errors, options


def predicted_errors(profile: Profile, ranks: Ranks, params: ErrorModelParams) -> dict[str, float]:
    """The LEMS surrogate error of each layer at arbitrary ranks (dense: 0).

    Lets any allocation be scored under the same error model (e.g. uniform vs LEMS).
    """
    biases, scales = _block_biases(profile, params), _kl_scales(profile, params)
    out = {}
    for i, layer in enumerate(profile.layers):
        rank = _dense_if_break_even(layer, ranks[layer.name])
        if rank is None:
            out[layer.name] = 0.0
            continue
        scale = None if scales is None else float(scales[i])
        err = layer_errors(profile.spectra[layer.name], np.array([rank]), layer.eq_rank, float(biases[i]), scale, params)
        out[layer.name] = float(err[0])
    return out


def allocate_lems(
    profile: Profile,
    ratio: float,
    params: ErrorModelParams = ErrorModelParams(),
    multiple: int | None = 8,
    solver: str = "exact",
    cost_model: str = "params",
    **solver_options,
) -> Allocation:
    """LEMS: minimise the summed surrogate error under the parameter budget (methods.md §1.4).

    ``solver="exact"`` uses the project's exact MCKP solver; "highs"/"cbc" go through
    PuLP (``solver_options`` such as time_limit, gap_rel are passed on).
    """
    ratio = _check_ratio(ratio)
    costs, errors, options = lems_error_table(profile, params, ratio, multiple, cost_model)
    budget = _budget(profile, ratio)
    minimum = sum(float(c.min()) for c in costs)
    if minimum > budget * (1 + BUDGET_TOL):
        raise BudgetBelowMinimumError(
            "lems", ratio, minimum / profile.total_params, profile.total_params,
            f"every layer at its smallest candidate rank, multiple={multiple}, cost_model={cost_model!r}")
    start = time.perf_counter()
    if solver == "exact":
        choice = solve_mckp(costs, errors, budget)
    elif solver in ("highs", "cbc"):
        choice = solve_mckp_pulp(costs, errors, budget, solver=solver, **solver_options)
    else:
        raise ValueError(f"solver must be 'exact', 'highs' or 'cbc', got {solver!r}")
    seconds = time.perf_counter() - start
    ranks = {l.name: options[i][j] for i, (l, j) in enumerate(zip(profile.layers, choice))}
    per_layer = {l.name: float(errors[i][j]) for i, (l, j) in enumerate(zip(profile.layers, choice))}
    info = {"error_model": params.to_dict(), "solver": solver, "multiple": multiple, "cost_model": cost_model,
            "num_options": int(sum(len(c) for c in costs))}
    alloc = Allocation("lems", ratio, ranks, per_layer, float(sum(per_layer.values())), seconds, info)
    return _finish(profile, alloc)


class BiasFit(NamedTuple):
    """Result of ``fit_bias``: best params, every trial, and the best trial's allocation."""

    params: ErrorModelParams
    trials: list[dict]
    allocation: Allocation


def fit_bias(
    profile: Profile,
    ratio: float,
    score_fn: ScoreFn,
    params: ErrorModelParams = ErrorModelParams(),
    n_trials: int = 10,
    seed: int = 42,
    alpha_range: tuple[float, float] = (0.0, 3.0),
    gamma_range: tuple[float, float] = (0.0, 7.0),
    **lems_options,
) -> BiasFit:
    """Fit the depth bias (alpha, gamma) by seeded random search (methods.md §1.3).

    The reference runs Optuna's TPESampler(seed=42) for 10 trials; with Optuna's 10
    startup trials these are independent uniform draws from numpy's
    ``RandomState(seed)``, alpha then gamma per trial. The same draws are made
    here, so the (alpha, gamma) sequence matches the reference's for n_trials <= 10
    (checked against optuna 4.6). Each trial solves LEMS with the harmonic bias and
    scores it with ``score_fn`` (lower is better, e.g. KL on the search set); the
    first trial with the lowest score wins.
    """
    rng = np.random.RandomState(seed)
    trials, best = [], None
    for t in range(n_trials):
        alpha = float(rng.uniform(*alpha_range))
        gamma = float(rng.uniform(*gamma_range))
        trial_params = replace(params, alpha=alpha, gamma=gamma, bias_form="harmonic")
        alloc = allocate_lems(profile, ratio, trial_params, **lems_options)
        score = _finite_score(score_fn(alloc.ranks))
        trials.append({"trial": t, "alpha": alpha, "gamma": gamma, "score": score,
                       "objective": alloc.objective, "realised_ratio": alloc.info["realised_ratio"]})
        if best is None or score < best[0]:
            best = (score, trial_params, alloc)
    if best is None:
        raise ValueError("fit_bias needs n_trials >= 1")
    _, best_params, best_alloc = best
    best_alloc.info["bias_fit"] = trials
    return BiasFit(best_params, trials, best_alloc)


def _finite_score(value) -> float:
    """A caller's score as a float; NaN/inf (e.g. a diverged PPL) ranks last instead of
    poisoning the comparison."""
    value = float(value)
    return value if math.isfinite(value) else math.inf


# =========================================================================== uniform (§4.1)
def allocate_uniform(profile: Profile, ratio: float) -> Allocation:
    """Every layer keeps c = ratio: rank = int(ratio * eq) (methods.md §4.1).

    int(ratio*eq)(m+n) <= ratio*eq(m+n) <= ratio*mn, so the budget always holds,
    except when int(ratio*eq) = 0 for some layer and the rank-1 floor overshoots.
    """
    ratio = _check_ratio(ratio)
    ranks = {l.name: _rank_at_ratio(l, ratio) for l in profile.layers}
    _require_budget(profile, ranks, ratio, "uniform", "rank int(ratio*eq) floored at 1")
    return _finish(profile, Allocation("uniform", ratio, ranks))


# =========================================================================== SVD-LLM V2 (§4.3)
def _tail_loss(sigma: np.ndarray, rank: int, power: int) -> float:
    """(sum_{i>r} sigma_i^p)^(1/p): p=1 is the reference's loss, p=2 the paper's ||C - C'||_F."""
    tail = np.asarray(sigma[rank:], dtype=np.float64)
    return float(np.sum(tail ** power) ** (1.0 / power))


def _svdllm_scores(losses: np.ndarray, guard: str) -> tuple[np.ndarray | None, str]:
    """1/log(L) scores of one group, with the handling of L <= 1 (where log(L) <= 0).

    1/log is only a sensible importance for L > 1 (decreasing in L); at L < 1 it flips
    sign and at L = 1 it diverges. The loss scale is arbitrary (whitening units), so:
    - "rescale" (default): if some L <= 1, multiply the group's losses by e/min(L) so the
      smallest maps to e; the order of scores is preserved and all are positive.
    - "uniform": the group falls back to the uniform ratio.
    - "reference": the reference's rule, 1/log(L + 1e-12), uniform only when the score sum
      is non-finite or <= 0 (mixed signs then give keep ratios outside [0, 1]).
    Returns (scores or None for "use uniform", what was done).
    """
    losses = np.asarray(losses, dtype=np.float64)
    if guard == "reference":
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = 1.0 / np.log(losses + 1e-12)
        total = scores.sum()
        return (scores, "reference") if np.isfinite(total) and total > 0 else (None, "uniform_fallback")
    if guard not in ("rescale", "uniform"):
        raise ValueError(f"guard must be 'rescale', 'uniform' or 'reference', got {guard!r}")
    if np.all(losses > 1.0):
        return 1.0 / np.log(losses), "as_paper"
    if guard == "uniform" or not np.all(losses > 0):
        return None, "uniform_fallback"
    return 1.0 / np.log(losses * (math.e / losses.min())), "rescaled"


def svdllm_v2_keep_ratios(profile: Profile, ratio: float, power: int = 1, guard: str = "rescale") -> tuple[dict[str, float], dict[str, str]]:
    """Per-layer keep ratios of SVD-LLM V2 before rounding (methods.md §4.3).

    Per matrix type G: L_i = loss at the uniform rank int(ratio*eq), score_i = 1/log L_i,
    remove_i = |G| (1 - ratio) score_i / sum_G score, keep_i = 1 - remove_i.
    The group mean of keep_i is exactly ``ratio``. Returns (keep ratios, per-group handling).
    """
    groups: dict[str, list[LayerInfo]] = {}
    for l in profile.layers:
        groups.setdefault(l.kind, []).append(l)
    keep, handling = {}, {}
    for kind, members in groups.items():
        losses = np.array([_tail_loss(profile.spectra[l.name], int(ratio * l.eq_rank), power) for l in members])
        scores, handling[kind] = _svdllm_scores(losses, guard)
        if scores is None:
            keep.update({l.name: ratio for l in members})
            continue
        remove = len(members) * (1.0 - ratio) * scores / scores.sum()
        keep.update({l.name: float(1.0 - r) for l, r in zip(members, remove)})
    return keep, handling


def allocate_svdllm_v2(profile: Profile, ratio: float, power: int = 1, guard: str = "rescale") -> Allocation:
    """SVD-LLM V2 heterogeneous allocation by matrix type (methods.md §4.3).

    ``power=1`` is the reference's sum of singular values beyond the uniform rank;
    ``power=2`` the paper's Frobenius loss. Ranks are int(keep*eq) clipped to
    [1, min(m, n)] (keep >= 1 or rank >= eq: dense); if the clipping at rank 1 makes
    the total overshoot the budget, ``_repair_budget`` trims ranks deterministically.
    """
    ratio = _check_ratio(ratio)
    if power not in (1, 2):
        raise ValueError("power must be 1 (reference) or 2 (paper)")
    keep, handling = svdllm_v2_keep_ratios(profile, ratio, power, guard)
    ranks = {l.name: _rank_at_ratio(l, keep[l.name]) for l in profile.layers}
    _require_budget(profile, {l.name: 1 for l in profile.layers}, ratio, "svdllm_v2", "rank 1 everywhere")
    ranks, trimmed = _repair_budget(profile, ranks, ratio)
    info = {"keep_ratios": keep, "group_handling": handling, "power": power, "guard": guard, "repair_steps": trimmed}
    return _finish(profile, Allocation("svdllm_v2", ratio, ranks, info=info))


def _repair_budget(profile: Profile, ranks: Ranks, ratio: float) -> tuple[Ranks, int]:
    """Lower ranks until the budget holds: always the layer with the highest kept fraction
    r/eq (dense counts as 1; ties: earliest layer) by one rank. Deterministic; returns
    (ranks, number of one-rank steps)."""
    ranks = dict(ranks)
    excess = params_of(profile, ranks) - _budget(profile, ratio)
    if excess <= 0:
        return ranks, 0
    heap = []
    for i, l in enumerate(profile.layers):
        r = ranks[l.name]
        if (r is None and l.eq_rank >= 2) or (r is not None and r > 1):
            heapq.heappush(heap, (-(1.0 if r is None else r / l.eq_rank), i))
    steps = 0
    while excess > _budget(profile, ratio) * BUDGET_TOL and heap:
        _, i = heapq.heappop(heap)
        layer = profile.layers[i]
        old = ranks[layer.name]
        new = layer.eq_rank - 1 if old is None else old - 1
        ranks[layer.name] = new
        excess -= layer_param_cost(layer.out_features, layer.in_features, old) - layer.rank_params(new)
        steps += 1
        if new > 1:
            heapq.heappush(heap, (-(new / layer.eq_rank), i))
    return ranks, steps


# =========================================================================== MRCS (§4.4)
class _SpectralLoss:
    """Fraction of singular-value mass removed at rank r, for all layers at once (energy1/2)."""

    def __init__(self, profile: Profile, power: int):
        cums = [np.concatenate([[0.0], np.cumsum(np.asarray(profile.spectra[l.name], np.float64) ** power)])
                for l in profile.layers]
        self.offsets = np.cumsum([0] + [len(c) for c in cums[:-1]])
        self.lengths = np.array([len(c) - 1 for c in cums])
        self.flat = np.concatenate(cums)
        self.totals = np.array([c[-1] if c[-1] > 0 else 1.0 for c in cums])

    def __call__(self, idx: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        ranks = np.clip(ranks, 0, self.lengths[idx])
        return 1.0 - self.flat[self.offsets[idx] + ranks] / self.totals[idx]


def _mrcs_lower_bounds(profile: Profile, lower_bound: float, multiple: int | None) -> np.ndarray:
    """floor(lb*eq) rounded up to the rank multiple, at most eq, at least 1 (reference rule)."""
    bounds = []
    for l in profile.layers:
        raw = int(math.floor(l.eq_rank * lower_bound))
        if multiple and multiple > 1:
            raw = min(int(math.ceil(raw / multiple) * multiple), l.eq_rank)
        bounds.append(max(1, raw))
    return np.array(bounds, dtype=np.int64)


def _project_down(ranks: np.ndarray, multiple: int | None) -> np.ndarray:
    if multiple and multiple > 1:
        ranks = (ranks // multiple) * multiple
    return np.maximum(ranks, 1)


def allocate_mrcs(
    profile: Profile,
    ratio: float,
    loss: str = "energy1",
    multiple: int | None = 8,
    lower_bound: float = 0.3,
    schedule_gamma: float = 80.0,
    max_iter: int = 500,
    params: ErrorModelParams | None = None,
    clamp_to_lower_bound: bool = False,
) -> Allocation:
    """MRCS greedy rank reduction with an exponential schedule (methods.md §4.4).

    Phase 1 (reference): at step t the schedule N_t = P* + (P_0 - P*) e^{-t/gamma_s} asks
    for Delta = N_{t-1} - N_t fewer parameters; every layer above its lower bound proposes
    r' = floor(r - Delta/(m+n)) rounded down to the multiple (skipped if below the bound),
    and the proposal with the smallest loss is applied. ``params`` adds the depth bias
    (score = loss x beta_b, the reference's memvit_plus ablation). With
    ``clamp_to_lower_bound`` a proposal below the bound is clamped to it instead of
    skipped, which keeps the schedule working when Delta is large against every layer
    (small models at low ratios, where the reference halts at step 1).

    Phase 2 (ours): the reference may stop above the budget (schedule saturated, max_iter,
    or every proposal skipped because Delta is large). Then the same greedy continues
    one rank-multiple step at a time (clamped at the lower bound) until the budget holds.

    Accounting differs from the reference on purpose: untouched layers count as dense
    (m*n, as they are), not eq(m+n).
    """
    ratio = _check_ratio(ratio)
    if loss not in ("energy1", "energy2"):
        raise ValueError("loss must be 'energy1' or 'energy2'")
    layers = profile.layers
    lb = _mrcs_lower_bounds(profile, lower_bound, multiple)
    _require_budget(profile, {l.name: int(b) for l, b in zip(layers, lb)}, ratio, "mrcs",
                    f"every layer at its lower bound {lower_bound:g}*eq")
    width = np.array([l.out_features + l.in_features for l in layers], dtype=np.float64)
    dense_cost = np.array([l.params for l in layers], dtype=np.float64)
    eq = np.array([l.eq_rank for l in layers], dtype=np.int64)
    bias = _block_biases(profile, params) if params is not None else np.ones(len(layers))
    spectral = _SpectralLoss(profile, 1 if loss == "energy1" else 2)
    idx_all = np.arange(len(layers))

    ranks = eq.copy()  # the reference starts at eq; eq means "untouched = dense" here
    touched = np.zeros(len(layers), dtype=bool)
    target = _budget(profile, ratio)
    p_total = float(dense_cost.sum())

    def current() -> float:
        return float(np.where(touched, ranks * width, dense_cost).sum())

    def apply(i: int, new_rank: int) -> None:
        ranks[i], touched[i] = new_rank, True

    start = time.perf_counter()
    steps, t, p = 0, 1, p_total
    while p > target and t <= max_iter:
        delta = _schedule(p_total, target, t - 1, schedule_gamma) - _schedule(p_total, target, t, schedule_gamma)
        if delta <= 0:
            break
        proposal = _project_down(np.floor(ranks - delta / width).astype(np.int64), multiple)
        if clamp_to_lower_bound:
            proposal = np.maximum(proposal, lb)
        valid = (ranks > lb) & (proposal < ranks) & (proposal >= lb)
        if not valid.any():
            break
        scores = np.where(valid, spectral(idx_all, proposal) * bias, np.inf)
        i = int(np.argmin(scores))
        apply(i, int(proposal[i]))
        p, t, steps = current(), t + 1, steps + 1
    phase1 = steps

    while p > target * (1 + BUDGET_TOL):  # phase 2: finish the budget one step at a time
        proposal = np.maximum(_next_multiple_below(ranks, multiple), lb)
        valid = proposal < ranks
        if not valid.any():  # cannot happen after the feasibility check above
            raise BudgetBelowMinimumError("mrcs", ratio, p / p_total, profile.total_params, "lower bounds reached")
        scores = np.where(valid, spectral(idx_all, proposal) * bias, np.inf)
        i = int(np.argmin(scores))
        apply(i, int(proposal[i]))
        p, steps = current(), steps + 1
    seconds = time.perf_counter() - start

    final = {l.name: (_dense_if_break_even(l, int(ranks[i])) if touched[i] else None) for i, l in enumerate(layers)}
    info = {"loss": loss, "multiple": multiple, "lower_bound": lower_bound, "clamp_to_lower_bound": clamp_to_lower_bound,
            "schedule_steps": phase1,
            "completion_steps": steps - phase1, "schedule_gamma": schedule_gamma, "max_iter": max_iter,
            "error_model": params.to_dict() if params is not None else None}
    return _finish(profile, Allocation("mrcs", ratio, final, solve_seconds=seconds, info=info))


def _next_multiple_below(ranks: np.ndarray, multiple: int | None) -> np.ndarray:
    """The largest multiple of ``multiple`` strictly below each rank (rank - 1 without one)."""
    step = multiple if multiple and multiple > 1 else 1
    return ((ranks - 1) // step) * step


def _schedule(p0: float, target: float, t: int, gamma: float) -> float:
    """N_t = P* + (P_0 - P*) exp(-t/gamma) (MRCS Eq. 9)."""
    return target + (p0 - target) * math.exp(-t / gamma)


# =========================================================================== ATP (§4.5)
def atp_block_ratios(num_blocks: int, ratio: float, beta_total: float) -> np.ndarray:
    """k_b = ratio + beta_total (0.5 - b/(B-1)): linear, denser early, mean = ratio."""
    if num_blocks < 2:
        return np.full(num_blocks, ratio)
    b = np.arange(num_blocks)
    return ratio + beta_total * (0.5 - b / (num_blocks - 1))


def atp_grid(ratio: float, steps: int = ATP_STEPS) -> list[float]:
    """beta_total in {0, 0.2h, ..., 2h}, h = min(ratio, 1 - ratio) (11 values)."""
    headroom = min(ratio, 1.0 - ratio)
    return [headroom * 2 / steps * i for i in range(steps + 1)]


def allocate_atp(profile: Profile, ratio: float, score_fn: ScoreFn, steps: int = ATP_STEPS) -> Allocation:
    """ATP: per-block keep ratios in arithmetic progression; the spread is picked by
    evaluating ``score_fn`` (lower is better, e.g. search-set PPL) on each of the grid's
    allocations (methods.md §4.5). The first best wins, as in the reference.

    Blocks of unequal size can make a spread miss the budget; such grid points are
    skipped (recorded in info["trials"]).
    """
    ratio = _check_ratio(ratio)
    trials, best = [], None
    start = time.perf_counter()
    for beta in atp_grid(ratio, steps):
        keep = atp_block_ratios(profile.num_blocks, ratio, beta)
        ranks = {l.name: _rank_at_ratio(l, float(keep[l.block])) for l in profile.layers}
        feasible = _within_budget(profile, ranks, ratio)
        score = _finite_score(score_fn(ranks)) if feasible else None
        trials.append({"beta_total": beta, "score": score, "feasible": feasible,
                       "realised_ratio": realised_ratio(profile, ranks)})
        if feasible and (best is None or score < best[0]):
            best = (score, beta, ranks)
    seconds = time.perf_counter() - start
    if best is None:
        lowest = min(t["realised_ratio"] for t in trials)
        raise BudgetBelowMinimumError("atp", ratio, lowest, profile.total_params, "no grid point meets the budget")
    score, beta, ranks = best
    info = {"beta_total": beta, "trials": trials}
    return _finish(profile, Allocation("atp", ratio, ranks, objective=score, solve_seconds=seconds, info=info))


# =========================================================================== ASVD STRS (§4.2)
def _asvd_table(profile: Profile, sensitivity: dict[float, np.ndarray] | None) -> dict[float, np.ndarray]:
    """The sensitivity table {ratio: per-layer score} at the ASVD points, from
    ``sensitivity`` or else ``profile.measured``; a clear error names missing points."""
    source = sensitivity if sensitivity is not None else profile.measured
    where = "the given sensitivity table" if sensitivity is not None else "profile.measured"
    table, missing = {}, []
    for point in ASVD_POINTS:
        match = [k for k in source if math.isclose(float(k), point, abs_tol=1e-9)]
        if not match:
            missing.append(point)
            continue
        values = np.asarray(source[match[0]], dtype=np.float64)
        if values.shape != (len(profile.layers),):
            raise ValueError(f"asvd: sensitivity at ratio {point} must have one value per layer ({len(profile.layers)})")
        table[point] = values
    if missing:
        raise ValueError(
            f"asvd needs per-layer sensitivities measured at ratios {list(ASVD_POINTS)}; {where} lacks "
            f"{missing}. Measure them (KL or PPL with only that layer compressed) or pass `sensitivity`."
        )
    return table


def allocate_asvd(
    profile: Profile,
    ratio: float,
    sensitivity: dict[float, np.ndarray] | None = None,
    cost_model: str = "params",
) -> Allocation:
    """ASVD's sensitivity-based truncation-rank search (STRS, methods.md §4.2).

    All (layer, c, score) triples are sorted by score, most harmful first; a cut index
    is binary-searched so that every triple after it is allowed, each layer takes its
    smallest allowed c (dense if none), and the budget just holds. The largest such cut
    is kept, as in the LEMS re-implementation. ``cost_model="params"`` checks the budget
    with real costs int(c*eq)(m+n); "reference" uses the reference's c*m*n.
    """
    ratio = _check_ratio(ratio)
    table = _asvd_table(profile, sensitivity)
    triples = [(i, c, float(table[c][i])) for i in range(len(profile.layers)) for c in ASVD_POINTS]
    triples.sort(key=lambda x: -x[2])  # stable: ties keep layer order
    start = time.perf_counter()

    def cost_ratio(cut: int) -> tuple[float, dict[int, float]]:
        chosen: dict[int, float] = {}
        for i, c, _ in triples[cut:]:
            chosen[i] = min(chosen.get(i, 1.0), c)
        return _asvd_cost(profile, chosen, cost_model), chosen

    low, high, best = 0, len(triples) - 1, None
    while low <= high:
        mid = (low + high) // 2
        if cost_ratio(mid)[0] <= ratio * (1 + BUDGET_TOL):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    if best is None:
        raise BudgetBelowMinimumError("asvd", ratio, cost_ratio(0)[0], profile.total_params,
                                      f"every layer at ratio {ASVD_POINTS[0]}")
    _, chosen = cost_ratio(best)
    ranks = {l.name: (_rank_at_ratio(l, chosen[i]) if i in chosen else None) for i, l in enumerate(profile.layers)}
    objective = float(sum(table[c][i] for i, c in chosen.items()))
    info = {"cut_index": best, "num_triples": len(triples), "layer_ratios": {profile.layers[i].name: c for i, c in chosen.items()},
            "cost_model": cost_model}
    alloc = Allocation("asvd", ratio, ranks, objective=objective, solve_seconds=time.perf_counter() - start, info=info)
    return _finish(profile, alloc)


def _asvd_cost(profile: Profile, chosen: dict[int, float], cost_model: str) -> float:
    total = 0.0
    for i, l in enumerate(profile.layers):
        if i not in chosen:
            total += l.params
        elif cost_model == "reference":
            total += chosen[i] * l.params
        elif cost_model == "params":
            total += layer_param_cost(l.out_features, l.in_features, _rank_at_ratio(l, chosen[i]))
        else:
            raise ValueError(f"cost_model must be 'params' or 'reference', got {cost_model!r}")
    return total / profile.total_params


# =========================================================================== registry
ALLOCATORS: dict[str, Callable[..., Allocation]] = {}


# Allocators that score candidate plans on the model: name -> the score they want
# ("ppl": search-set perplexity, "kl": KL to the dense model; see pipeline.score_function).
# erc_plc and lcsvd_search are registered by seed_methods. ASVD needs no scorer: it reads
# sensitivities measured into the profile.
MODEL_SCORED: dict[str, str] = {"atp": "ppl", "erc_plc": "kl", "lcsvd_search": "ppl"}


def register_allocator(name: str, fn: Callable[..., Allocation]) -> None:
    """Make ``fn(profile, ratio, ...) -> Allocation`` available to ``allocate`` under ``name``.

    ``allocate`` passes ``params`` / ``score_fn`` only to functions that take them, and
    rejects results that exceed the budget.
    """
    ALLOCATORS[_normalise_method(name)] = fn


def _normalise_method(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


for _name, _fn in {"uniform": allocate_uniform, "lems": allocate_lems, "svdllm_v2": allocate_svdllm_v2,
                   "mrcs": allocate_mrcs, "atp": allocate_atp, "asvd": allocate_asvd}.items():
    register_allocator(_name, _fn)


PLUGIN_MODULES = ("ars", "seed_methods")  # modules that register allocators of their own on import


def register_plugin_allocators() -> None:
    """Import the modules registering ARS and the seed-method allocators (erc_plc, lcsvd_search).

    Lazy because they import this module; after it, ``ALLOCATORS`` lists every method.
    """
    for name in PLUGIN_MODULES:
        importlib.import_module(f"{__package__}.{name}")


def allocator_names() -> list[str]:
    """Every allocation method ``allocate`` accepts, sorted."""
    register_plugin_allocators()
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
    key = _normalise_method(method)
    if key not in ALLOCATORS:
        register_plugin_allocators()
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
    _check_result(profile, alloc)
    return alloc
