"""Latency as a cost: measured device profiles and the latency cost model of the allocators.

Every allocator budgets parameters, r(m+n); users pay in latency, which is not linear in
rank (two GEMMs instead of one, tile sizes, memory-bound decode). This package measures
what a dense and a factorised Linear of each layer shape take on one device, in one
workload, and turns it into per-option costs that the exact knapsack solver accepts
like parameter counts (see docs/latency.md).

Modules: ``device_profile`` (the measured times, their JSON and validation,
interpolation in rank), ``measure`` (timing and the cache), ``cost`` (``LatencyCost``,
the allocators' view), ``model_timing`` (the whole model, dense against compressed, in
prefill and decode, against the predicted fraction).
"""
from .cost import LatencyCost, latency_cost
from .device_profile import (DEVICE_PROFILE_SCHEMA, WORKLOAD_KINDS, DeviceProfile, DeviceProfileError, ProfileKey,
                             ShapeTimes, Workload)
from .model_timing import (ModelTiming, ModelTimingError, PredictedFraction, TimingSettings, WorkloadTiming,
                           comparison_rows, predicted_fractions, time_dense_and_compressed)
from .measure import (cache_path, current_key, device_name, device_profile_for, isotonic, measure_device_profile,
                      median_times, rank_grid)

__all__ = [
    "DEVICE_PROFILE_SCHEMA", "WORKLOAD_KINDS", "DeviceProfile", "DeviceProfileError", "LatencyCost", "ModelTiming",
    "ModelTimingError", "PredictedFraction", "ProfileKey", "ShapeTimes", "TimingSettings", "Workload", "WorkloadTiming",
    "cache_path", "comparison_rows", "current_key", "device_name", "device_profile_for", "isotonic", "latency_cost",
    "measure_device_profile", "median_times", "predicted_fractions", "rank_grid", "time_dense_and_compressed",
]
