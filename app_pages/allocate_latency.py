"""The Allocate page under a latency cost: the cost selector, this machine's latency cost, and the
latency-budget sweep.

A latency cost prices each layer's option by its measured time (``lems_core.latency``);
the budget is then a fraction of the dense model's compressible latency, so the slider's
floor, the sweep's budgets and its x axis are latency fractions too. Functions take the
page's profile and its id explicitly (the page module runs top to bottom and cannot be
imported).
"""
import pandas as pd
import streamlit as st

from lems_core.allocators import Allocation, allocate, predicted_errors
from lems_core.allocators.registry import latency_methods
from lems_core.error_model import ErrorModelParams
from lems_core.latency import DeviceProfileError, LatencyCost, Workload, cache_path, current_key, latency_cost
from lems_core.latency.measure import GRID_POINTS
from lems_core.profile import Profile
from app_pages import common, tables

COSTS = {"params": "Parameters", "decode": "Latency: decode", "prefill": "Latency: prefill"}
LATENCY_COSTS = "_latency_costs"  # session_state: {(profile id, workload, device): LatencyCost}
REMEASURE = "_remeasure_latency"  # session_state: measure the device profile again on this run
SWEEP_COLUMNS = ["method", "budget", "realised ratio", "predicted latency", "predicted error"]


def cost_controls(profile: Profile, profile_id: str) -> tuple[bool, LatencyCost | None]:
    """The cost selector: (usable, the latency cost, or None for a parameter budget).

    A latency cost needs this machine's device profile for the profile's layer shapes:
    read from the cache, or measured now (about a minute on a CPU); a broken cached
    profile is an error with the way out, never silently replaced."""
    kind = st.radio("Budget counts", list(COSTS), format_func=COSTS.get, horizontal=True,
                    **common.bind("cost_kind", "params", allowed=list(COSTS)),
                    help="Parameters: r(m+n) per layer. Latency: the measured time of each layer's option on this "
                         "machine, in decode (1 token) or prefill (256 tokens); see docs/latency.md.")
    if kind == "params":
        return True, None
    try:
        return True, latency_here(profile, profile_id, kind, measure=True,
                                  refresh=st.session_state.pop(REMEASURE, False))
    except DeviceProfileError as exc:
        st.error(f"{COSTS[kind]}: the device profile of this machine is unusable: {exc}")
        st.button("Measure it again", key="remeasure_latency", icon=":material/timer:",
                  on_click=st.session_state.__setitem__, args=(REMEASURE, True))
        return False, None


def latency_here(profile: Profile, profile_id: str, kind: str, measure: bool,
                 refresh: bool = False) -> LatencyCost | None:
    """This profile's latency cost in workload ``kind`` on the app's device, kept for the session.

    From the cache file when there is one (DeviceProfileError when it is broken), else
    measured under a status when ``measure`` (cached by lems_core.latency), else None."""
    device = common.devices()[0]
    memo = st.session_state.setdefault(LATENCY_COSTS, {})
    key = (profile_id, kind, device)
    if key in memo and not refresh:
        return memo[key]
    workload = Workload.named(kind)
    path = cache_path(current_key(workload, device), [(l.out_features, l.in_features) for l in profile.layers],
                      8, GRID_POINTS, cache_dir=common.cache_dir())
    if path.is_file() and not refresh:
        found = latency_cost(profile.layers, workload, path)
        found.device_profile.check_key(current_key(workload, device))
        memo[key] = found
    elif measure:
        with st.status(f"Measuring the {workload.describe()} device profile of {device} (once, then cached)…") as box:
            memo[key] = latency_cost(profile.layers, workload, device=device, cache_dir=common.cache_dir(),
                                     refresh=refresh)
            box.update(label=f"Measured the {workload.describe()} device profile of {device}.", state="complete",
                       expanded=False)
    return memo.get(key)


def known_latency(profile: Profile, profile_id: str) -> LatencyCost | None:
    """A latency cost already cached for this machine (decode first), to show parameter plans' latency."""
    for kind in ("decode", "prefill"):
        try:
            found = latency_here(profile, profile_id, kind, measure=False)
        except DeviceProfileError:
            continue
        if found is not None:
            return found
    return None


def selected_latency(profile: Profile, profile_id: str) -> LatencyCost | None:
    """The latency cost of the cost selector's workload when it is a latency one and already known, else None."""
    kind = common.kept("cost_kind", "params")
    if kind == "params":
        return None
    try:
        return latency_here(profile, profile_id, kind, measure=False)
    except DeviceProfileError:
        return None


def refused_under(cost: LatencyCost | None, methods: list[str]) -> list[str]:
    """The methods that allocate under a parameter budget only (none without a latency cost)."""
    return [] if cost is None else [m for m in methods if m not in latency_methods()]


def with_latency(table, allocations: dict[str, Allocation], cost: LatencyCost | None, profile: Profile):
    """The comparison table with each plan's predicted latency fraction next to its parameter ratio ("—" unknown)."""
    values = (["—"] * len(table) if cost is None
              else [cost.fraction(profile.layers, a.ranks) for a in allocations.values()])
    table.insert(table.columns.get_loc("realised ratio") + 1, "predicted latency", values)
    return table


def latency_sweep_frame(profile: Profile, methods, params: ErrorModelParams, cost: LatencyCost,
                        budgets=tables.SWEEP_BUDGETS, constraints=None) -> pd.DataFrame:
    """Predicted error of each method at each latency budget it can meet, with the plan's predicted latency.

    ``tables.sweep_frame`` under a latency cost: the budgets are fractions of the dense
    latency and each row carries the plan's predicted latency fraction (the sweep's x) next
    to its parameter ratio. Budgets a method cannot meet, and methods that take no latency
    budget, are left out."""
    rows = []
    for method in methods:
        for budget in budgets:
            try:
                alloc = allocate(profile, method, float(budget), params=params, constraints=constraints, cost=cost)
            except ValueError:
                continue
            rows.append({"method": tables.method_label(method), "budget": float(budget),
                         "realised ratio": alloc.info["realised_ratio"],
                         "predicted latency": cost.fraction(profile.layers, alloc.ranks),
                         "predicted error": float(sum(predicted_errors(profile, alloc.ranks, params).values()))})
    return pd.DataFrame(rows, columns=SWEEP_COLUMNS)
