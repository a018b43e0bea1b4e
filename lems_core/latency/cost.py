"""The latency cost model of the allocators: an option costs its measured time, not r(m+n).

``LatencyCost`` wraps a device profile. A layer's dense option costs its dense time, a
factorised one its interpolated low-rank time; the budget is a fraction of the dense
model's compressible latency (the sum of dense times). The exact knapsack solver works
for any additive cost, so LEMS stays exact with these costs swapped in
(``budget.candidate_cost`` / ``budget.dense_cost`` dispatch to it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable

import numpy as np

from ..budget import normalise_rank
from ..model import LayerInfo
from ..plan_cost import PlanCost
from .device_profile import DeviceProfile, DeviceProfileError, Workload


@dataclass(frozen=True, eq=False)
class LatencyCost:
    """Per-layer option costs in seconds of one workload, from a device profile."""

    device_profile: DeviceProfile
    kind: ClassVar[str] = "latency"

    @property
    def key(self) -> str:
        """Identifies the costs (for caches of option tables)."""
        return f"latency:{self.device_profile.profile_id}"

    @property
    def workload(self) -> Workload:
        return self.device_profile.key.workload

    def dense_cost(self, layer: LayerInfo) -> float:
        return self.device_profile.dense_time((layer.out_features, layer.in_features))

    def candidate_cost(self, layer: LayerInfo, ranks) -> np.ndarray:
        """Interpolated low-rank times of factorised candidate ranks."""
        return self.device_profile.lowrank_time((layer.out_features, layer.in_features), ranks)

    def layer_time(self, layer: LayerInfo, rank: int | None) -> float:
        """Time of one layer at ``rank`` (dense when None or at break-even, unless forced factorised)."""
        rank = normalise_rank(layer.out_features, layer.in_features, rank)
        return self.dense_cost(layer) if rank is None else float(self.candidate_cost(layer, [rank])[0])

    def dense_total(self, layers: Iterable[LayerInfo]) -> float:
        """The dense model's compressible latency: the budget's denominator."""
        return float(sum(self.dense_cost(l) for l in layers))

    def plan_time(self, layers: Iterable[LayerInfo], ranks: dict) -> float:
        return float(sum(self.layer_time(l, ranks[l.name]) for l in layers))

    def fraction(self, layers: list[LayerInfo], ranks: dict) -> float:
        """Predicted compressible latency of ``ranks`` as a fraction of dense."""
        return self.plan_time(layers, ranks) / self.dense_total(layers)

    def check_layers(self, layers: Iterable[LayerInfo]) -> None:
        self.device_profile.check_covers((l.out_features, l.in_features) for l in layers)

    def record(self, budget: float, predicted: float) -> dict:
        """The plan's ``meta.cost`` (``plan_cost.PlanCost``)."""
        profile = self.device_profile
        return PlanCost("latency", float(budget), float(predicted), self.workload.to_dict(),
                        {"id": profile.profile_id, "key": profile.key.to_dict()}).to_dict()


def latency_cost(layers: list[LayerInfo], workload: Workload | None = None,
                 device_profile: DeviceProfile | str | Path | None = None, device: str = "cpu",
                 dtype: str = "float32", cache_dir: Path | None = None, **measure_options) -> LatencyCost:
    """The latency cost for ``layers``: from ``device_profile`` (a profile or its file), else measured here
    (cached, ``measure.device_profile_for``).

    A given profile must cover every layer shape and, when ``workload`` is given, be of that
    workload; otherwise DeviceProfileError.
    """
    if device_profile is None:
        from .measure import device_profile_for

        if workload is None:
            raise DeviceProfileError("measuring a device profile needs a workload (prefill or decode)")
        shapes = [(l.out_features, l.in_features) for l in layers]
        device_profile = device_profile_for(shapes, workload, device, dtype, cache_dir, **measure_options)
    elif not isinstance(device_profile, DeviceProfile):
        device_profile = DeviceProfile.load(device_profile)
    if workload is not None and device_profile.key.workload != workload:
        raise DeviceProfileError(f"the device profile times the {device_profile.key.workload.describe()} workload, "
                                 f"not the {workload.describe()} one asked for")
    cost = LatencyCost(device_profile)
    cost.check_layers(layers)
    return cost
