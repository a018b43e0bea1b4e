"""Adaptive measurement for LEMS-MP: measure single-layer KL where the plan needs it.

Start from the profile's measured points (usually the reference KL only: 210 suffix
runs on the demo), then for a few rounds: solve the LEMS-MP knapsack, pick the k
layers whose plan entry the model is least sure of, measure each one's KL at the rank
the plan chose, refit, re-solve. Cost: the starting points plus rounds x k
single-layer suffix runs (plus one dense run for the KL floor when it is measured),
against 1,260 for ASVD's six-point search.

"Least sure" is the score  beta_b * excess_l(r) * d_l(r): the layer's predicted error
at its chosen rank times d_l(r) = the distance, in the shape coordinate -log R
(``lems_mp``), from r to the layer's nearest measured point. It is 0 at a measured
rank and grows with both the extrapolation distance and the stakes. A dense layer is
scored at its largest candidate rank, the alternative the plan turned down.

The measurement is injected: ``measure([(layer name, rank), ...]) -> [KL, ...]``.
``sensitivity.layer_kl_at_ranks`` measures on the model; tests use a fake.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..budget import candidate_ranks, check_ratio
from ..error_model import ErrorModelParams
from ..profile import Profile
from .base import Allocation
from .lems_mp import FLOOR_RTOL, MultiPointModel, Points, shape_coordinate, fit_multipoint, profile_points, solve_with_model

MeasureFn = Callable[[list[tuple[str, int]]], Sequence[float]]


@dataclass
class AdaptiveRound:
    """One round: what was measured (layer, rank, KL), and the plan it led to."""

    round: int
    measured: list[tuple[str, int, float]]
    objective: float
    changed_layers: int  # layers whose rank differs from the previous round's plan


@dataclass
class AdaptiveResult:
    """The final allocation, every point measured on the way, and the cost in suffix runs."""

    allocation: Allocation
    extra_points: Points
    rounds: list[AdaptiveRound] = field(default_factory=list)
    start_runs: int = 0  # single-layer runs behind the profile's points that were used
    adaptive_runs: int = 0  # single-layer runs made here

    @property
    def suffix_runs(self) -> int:
        return self.start_runs + self.adaptive_runs


def uncertainty_scores(profile: Profile, model: MultiPointModel, ranks: dict, points: Points,
                       ratio: float, multiple: int | None = 8) -> tuple[np.ndarray, list[int | None]]:
    """(score per layer, the rank each score is for; None when it has no candidate)."""
    scores, at = np.zeros(len(profile.layers)), []
    for i, layer in enumerate(profile.layers):
        rank = ranks[layer.name]
        if rank is None:
            cands = candidate_ranks(layer, ratio, multiple)
            rank = int(cands[-1]) if cands.size else None
        at.append(rank)
        if rank is None:
            continue
        power = model.params.energy_power
        sigma = profile.spectra[layer.name]
        measured = shape_coordinate(sigma, [r for r, _ in points[layer.name]], power)
        distance = float(np.min(np.abs(shape_coordinate(sigma, [rank], power)[0] - measured)))
        scores[i] = float(model.errors(profile, i, [rank])[0]) * distance
    return scores, at


@dataclass(frozen=True)
class AdaptiveSchedule:
    """How much adaptive measurement to do: ``rounds`` rounds of ``per_round`` new
    single-layer measurements; ``floor_rtol``: how close to the KL floor a point counts as floor."""

    rounds: int = 3
    per_round: int = 16
    floor_rtol: float = FLOOR_RTOL


def adaptive_lems_mp(
    profile: Profile,
    ratio: float,
    measure: MeasureFn,
    params: ErrorModelParams = ErrorModelParams(),
    fit_ratios=(),
    floor: float | None = None,
    multiple: int | None = 8,
    cost_model: str = "params",
    schedule: AdaptiveSchedule | None = None,
    **schedule_options,
) -> AdaptiveResult:
    """Solve, measure the ``per_round`` most uncertain plan entries, refit, re-solve; ``rounds`` times.

    ``fit_ratios``: which of the profile's measured ratios to start from (default: the
    reference KL only). ``floor``: the KL floor (None: the profile's own, see ``lems_mp.kl_floor``).
    ``schedule`` (or its fields as keywords, ``rounds=2``): see ``AdaptiveSchedule``.
    """
    schedule = schedule or AdaptiveSchedule(**schedule_options)
    rounds, per_round, floor_rtol = schedule.rounds, schedule.per_round, schedule.floor_rtol
    ratio = check_ratio(ratio)
    if rounds < 0 or per_round < 1:
        raise ValueError("rounds must be >= 0 and per_round >= 1")
    extra: Points = {}
    fit = dict(params=params, ratios=fit_ratios, floor=floor, floor_rtol=floor_rtol)
    model = fit_multipoint(profile, extra_points=extra, **fit)
    alloc = solve_with_model(profile, ratio, model, "lems_adaptive", multiple, cost_model)
    used = {profile.ref_ratio, *(profile.measured if fit_ratios is None else fit_ratios)}
    result = AdaptiveResult(alloc, extra, start_runs=len(used) * len(profile.layers))
    for t in range(1, rounds + 1):
        points = profile_points(profile, fit_ratios, extra)
        scores, at = uncertainty_scores(profile, model, alloc.ranks, points, ratio, multiple)
        picked = [i for i in np.argsort(-scores, kind="stable")[:per_round] if scores[i] > 0]
        if not picked:
            break
        requests = [(profile.layers[i].name, int(at[i])) for i in picked]
        values = [float(v) for v in measure(requests)]
        if len(values) != len(requests):
            raise ValueError(f"measure returned {len(values)} values for {len(requests)} requests")
        for (name, rank), value in zip(requests, values):
            extra.setdefault(name, []).append((rank, value))
        result.adaptive_runs += len(requests)
        model = fit_multipoint(profile, extra_points=extra, **fit)
        previous, alloc = alloc, solve_with_model(profile, ratio, model, "lems_adaptive", multiple, cost_model)
        changed = sum(previous.ranks[n] != alloc.ranks[n] for n in alloc.ranks)
        result.rounds.append(AdaptiveRound(t, [(n, r, v) for (n, r), v in zip(requests, values)],
                                           float(alloc.objective), changed))
    alloc.info.update({"suffix_runs": result.suffix_runs, "adaptive_runs": result.adaptive_runs,
                       "rounds": len(result.rounds), "per_round": per_round})
    result.allocation = alloc
    return result
