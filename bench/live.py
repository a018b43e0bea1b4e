"""Benchmark: one budget-slider move on the Allocate page, server side, without a browser.

Run as `python -m bench.live` (about a minute). For each profile (the shipped demo
KFAC profile, and synthetic profiles shaped like Llama-3-8B and Llama-3-70B) it moves
the budget to values never solved before and times what the page's fragment does:
every default live allocator (LEMS, uniform, SVD-LLM V2, MRCS, ARS lookup), the
predicted-error tables and the comparison table, the current plan's JSON and
loadconfig (the download buttons), and every Plotly figure of the page, built and
serialised to JSON as Streamlit's st.plotly_chart does (``fig.to_dict()``, then
``plotly.io.to_json(..., validate=False)``). Goals: < 100 ms at 8B shape and
< 250 ms at 70B shape. Timings depend on the machine's load; the load average and
thread count are printed with them, and the CPU time of the whole move next to its
wall time (the part of a slow run that other jobs' load does not explain).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import plotly.io as pio

from app_pages import figures, tables
from lems_core.allocators import allocate
from lems_core.error_model import ErrorModelParams
from lems_core.profile import Profile, synthetic_profile

METHODS = ("lems", "uniform", "svdllm_v2", "mrcs", "ars")
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "cache" / "demo" / "smollm2-135m-kfac"


def profiles() -> dict[str, Profile]:
    found = {}
    if (DEMO / "profile.json").is_file():
        found["demo (SmolLM2-135M, 210 layers)"] = Profile.load(DEMO)
    found["8B shape (32 x 7, 4096/14336/1024)"] = synthetic_profile(num_blocks=32, hidden=4096, inter=14336, kv=1024)
    found["70B shape (80 x 7, 8192/28672/1024)"] = synthetic_profile(num_blocks=80, hidden=8192, inter=28672, kv=1024)
    return found


class _Clock:
    """Wall and CPU seconds per named stage (CPU time is less sensitive to other jobs' load)."""

    def __init__(self):
        self.wall, self.cpu = {}, {}
        self._marks = {}

    def start(self, name: str) -> None:
        self._marks[name] = (time.perf_counter(), time.process_time())

    def stop(self, name: str) -> None:
        wall, cpu = self._marks.pop(name)
        self.wall[name] = time.perf_counter() - wall
        self.cpu[name] = time.process_time() - cpu


def slider_move(profile: Profile, ratio: float, params: ErrorModelParams) -> _Clock:
    """The Allocate fragment's work for one new budget; seconds per stage."""
    clock = _Clock()
    clock.start("total")
    clock.start("allocators")
    allocations = {}
    for method in METHODS:
        clock.start(method)
        try:
            allocations[method] = allocate(profile, method, ratio, params=params)
        except ValueError:
            pass  # e.g. no trained ARS plan: the page shows a message
        clock.stop(method)
    clock.stop("allocators")
    clock.start("tables + plan")
    ranks = {label: a.ranks for label, a in allocations.items()}
    errors = tables.predicted_error_tables(profile, ranks, params)
    table = tables.comparison_table(profile, allocations, errors)
    plan = allocations["lems"].to_plan(profile, meta={"calibration": profile.calibration})
    plan.to_json(), json.dumps(plan.to_loadconfig())
    clock.stop("tables + plan")
    clock.start("figures")
    figs = [figures.heatmap_figure(tables.kept_fraction_grid(profile, r), label, "kept",
                                   text=tables.rank_grid(profile, r), zrange=(0.0, 1.0)) for label, r in ranks.items()]
    figs.append(figures.heatmap_figure(tables.difference_grid(profile, ranks["lems"], ranks["uniform"]), "diff", "Δ",
                                       diverging=True))
    figs.append(figures.error_by_block_figure(profile, errors))
    figs.append(figures.per_block_figure(profile, ranks))
    for fig in figs:
        pio.to_json(fig.to_dict(), validate=False)  # what st.plotly_chart sends
    clock.stop("figures")
    clock.stop("total")
    assert len(table) == len(allocations)
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=5, help="slider moves per profile (distinct budgets)")
    args = parser.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"# bench/live.py: load average {os.getloadavg()[0]:.2f} / {os.getloadavg()[1]:.2f} (1/5 min), "
          f"{os.cpu_count()} CPUs, {threading.active_count()} Python thread(s), OMP_NUM_THREADS={threads}")
    params = ErrorModelParams()
    for name, profile in profiles().items():
        params = ErrorModelParams(ref_ratio=profile.ref_ratio, use_scale=profile.kl_ref is not None)
        slider_move(profile, 0.805, params)  # warm-up: imports, per-profile caches (as the page's first draw)
        runs = [slider_move(profile, 0.80 - 0.01 * i, params) for i in range(args.moves)]
        stages = {k: 1000 * statistics.median(r.wall[k] for r in runs) for k in runs[0].wall}
        cpu = 1000 * statistics.median(r.cpu["total"] for r in runs)
        worst = 1000 * max(r.wall["total"] for r in runs)
        print(f"{name:38s} median {stages['total']:7.1f} ms (max {worst:7.1f}, CPU {cpu:6.1f}): "
              + ", ".join(f"{k} {stages[k]:.1f}" for k in ("allocators", "tables + plan", "figures"))
              + " | " + ", ".join(f"{m} {stages[m]:.1f}" for m in METHODS), flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
