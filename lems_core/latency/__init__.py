"""Latency as a cost: measured device profiles and the latency cost model of the allocators.

Every allocator budgets parameters, r(m+n); users pay in latency, which is not linear in
rank (two GEMMs instead of one, tile sizes, memory-bound decode). This package measures
what a dense and a factorised Linear of each layer shape take on one device, in one
workload, and turns it into per-option costs that the exact knapsack solver accepts
like parameter counts (see docs/latency.md).

Modules: ``device_profile`` (the measured times, their JSON and validation,
interpolation in rank), ``measure`` (timing and the cache), ``cost`` (``LatencyCost``,
the allocators' view).
"""
from .cost import LatencyCost, latency_cost
from .device_profile import (DEVICE_PROFILE_SCHEMA, WORKLOAD_KINDS, DeviceProfile, DeviceProfileError, ProfileKey,
                             ShapeTimes, Workload)
from .measure import (cache_path, current_key, device_name, device_profile_for, isotonic, measure_device_profile,
                      median_times, rank_grid)

__all__ = [
    "DEVICE_PROFILE_SCHEMA", "WORKLOAD_KINDS", "DeviceProfile", "DeviceProfileError", "LatencyCost", "ProfileKey",
    "ShapeTimes", "Workload", "cache_path", "current_key", "device_name", "device_profile_for", "isotonic",
    "latency_cost", "measure_device_profile", "median_times", "rank_grid",
]
