"""What a rank plan records about the cost its budget was counted in (``meta.cost`` of the plan JSON).

Parameters (r(m+n) per factorised layer, docs/reference/methods.md §0) are the default and need no
record: a plan without ``meta.cost`` was allocated under a parameter budget. A plan
allocated under a latency budget records the kind, its target (a fraction of the dense
model's compressible latency), the latency fraction its ranks are predicted to take,
the workload and which device profile the times came from (``lems_core.latency``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

COST_KINDS = ("params", "latency")


class PlanCostError(ValueError):
    """A plan's ``meta.cost`` record is malformed."""


@dataclass(frozen=True)
class PlanCost:
    """The cost model a plan was allocated under.

    kind: "params" or "latency"; budget: the target fraction of the dense cost;
    predicted_fraction: the fraction the plan's ranks are predicted to cost;
    workload: {kind, batch, tokens}; device_profile: {"id", "key"} of the measured times.
    """

    kind: str = "params"
    budget: float | None = None
    predicted_fraction: float | None = None
    workload: dict | None = None
    device_profile: dict | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "budget": self.budget, "predicted_latency_fraction": self.predicted_fraction,
                "workload": self.workload, "device_profile": self.device_profile}

    @staticmethod
    def from_dict(raw) -> "PlanCost":
        """Validate a ``meta.cost`` record; PlanCostError names the fault."""
        if not isinstance(raw, dict):
            raise PlanCostError(f"meta.cost must be an object, got {type(raw).__name__}")
        kind = raw.get("kind")
        if kind not in COST_KINDS:
            raise PlanCostError(f"meta.cost kind must be one of {COST_KINDS}, got {kind!r}")
        budget = _fraction(raw.get("budget"), "budget")
        predicted = _fraction(raw.get("predicted_latency_fraction"), "predicted_latency_fraction", upper=None)
        workload, profile = raw.get("workload"), raw.get("device_profile")
        if kind == "latency":
            if budget is None or predicted is None:
                raise PlanCostError("meta.cost of a latency plan needs its budget and predicted_latency_fraction")
            if not isinstance(workload, dict) or not isinstance(profile, dict) or "id" not in profile:
                raise PlanCostError("meta.cost of a latency plan needs its workload and device_profile {id, key}")
        return PlanCost(kind, budget, predicted, workload, profile)


def plan_cost(plan) -> PlanCost:
    """The cost record of ``plan`` (a ``RankPlan``); plans without one were allocated under parameters."""
    raw = plan.meta.get("cost") if isinstance(plan.meta, dict) else None
    return PlanCost() if raw is None else PlanCost.from_dict(raw)


def _fraction(value, name: str, upper: float | None = 1.0) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0 \
            or (upper is not None and value > upper):
        bound = f"(0, {upper:g}]" if upper is not None else "> 0"
        raise PlanCostError(f"meta.cost {name} must be a number in {bound}, got {value!r}")
    return float(value)
