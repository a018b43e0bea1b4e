"""Benchmark: exact numpy MCKP solver vs PuLP+HiGHS and PuLP+CBC on LLM-shaped instances.

Run as `python -m bench.mckp` (about 2-3 minutes, dominated by the ILP solvers).
Instances are synthetic but shaped like the real allocation problem (docs/reference/methods.md §1.4):
candidate ranks are multiples of 8 in [0.3 eq, 0.95 eq) plus the dense option, cost is
rank * (m + n) (dense: m * n), error = KL scale * normalised residual energy of a
decaying spectrum * depth bias, budget = 0.8 of the dense parameter count.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import pulp

from lems_core.solver import objective, run_pulp_mckp, solve_mckp, total_cost
from lems_core.error_model import residual_energy


def pulp_version() -> str:
    return getattr(pulp, "__version__", "?")


@dataclass
class Instance:
    name: str
    costs: list[np.ndarray]
    errors: list[np.ndarray]
    budget: float

    @property
    def shape_text(self) -> str:
        sizes = [c.size for c in self.costs]
        return f"{len(sizes)} groups x {min(sizes)}-{max(sizes)} options"


def transformer_shapes(blocks: int, hidden: int, kv: int, intermediate: int) -> list[tuple[int, int, int]]:
    """(block, out_features, in_features) of the 7 linear layers of each decoder block."""
    per_block = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),  # q k v o
                 (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]  # gate up down
    return [(b, m, n) for b in range(blocks) for m, n in per_block]


def candidate_ranks(m: int, n: int, low: float = 0.3, high: float = 0.95) -> np.ndarray:
    """Ranks that are multiples of 8 in [low * eq, high * eq), eq = m n / (m + n)."""
    eq = m * n / (m + n)
    ranks = np.arange(8 * int(np.ceil(low * eq / 8)), int(np.ceil(high * eq)), 8)
    return ranks[ranks < high * eq]


def layer_options(rng: np.random.Generator, m: int, n: int, block: int, blocks: int,
                  ranks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Costs and errors of one matrix: its truncation ranks plus the dense option (error 0)."""
    ranks = candidate_ranks(m, n) if ranks is None else ranks
    eq = m * n / (m + n)
    decay = rng.uniform(0.25, 0.9)  # sigma_i ~ i^-decay, a typical LLM weight spectrum
    sigma = np.arange(1, min(m, n) + 1, dtype=np.float64) ** -decay
    ref_rank = max(1, int(0.1 * eq))
    shape = residual_energy(sigma, ranks) / residual_energy(sigma, [ref_rank])[0]
    kl_scale = rng.lognormal(mean=-3.0, sigma=1.0)
    depth_bias = 1.0 + 5.0 / (block + 1) * (1 - block / blocks)  # early blocks matter more
    costs = np.append(ranks * float(m + n), float(m * n))
    errors = np.append(kl_scale * depth_bias * shape, 0.0)
    return costs, errors


def llm_instance(name: str, blocks: int, hidden: int, kv: int, intermediate: int,
                 ratio: float = 0.8, seed: int = 0) -> Instance:
    rng = np.random.default_rng(seed)
    shapes = transformer_shapes(blocks, hidden, kv, intermediate)
    options = [layer_options(rng, m, n, b, blocks) for b, m, n in shapes]
    dense = sum(m * n for _, m, n in shapes)
    return Instance(name, [c for c, _ in options], [e for _, e in options], ratio * dense)


def wide_instance(groups: int = 560, options: int = 250, ratio: float = 0.8, seed: int = 1) -> Instance:
    """`groups` matrices of assorted shapes, each with `options` ranks (the last one dense)."""
    rng = np.random.default_rng(seed)
    dims = [1024, 2048, 4096, 5120, 8192, 14336]
    costs, errors, dense = [], [], 0.0
    for g in range(groups):
        m, n = (int(d) for d in rng.choice(dims, size=2))
        eq = m * n / (m + n)
        ranks = np.linspace(0.1 * eq, 0.95 * eq, options - 1).astype(np.int64)
        c, e = layer_options(rng, m, n, g * 40 // groups, 40, ranks=ranks)
        costs.append(c)
        errors.append(e * (1 + 0.01 * rng.standard_normal(e.size)))  # measurement noise
        dense += m * n
    return Instance(f"synthetic {groups}x{options}", costs, errors, ratio * dense)


def time_exact(inst: Instance, repeats: int) -> tuple[float, float, list[int]]:
    """Median wall-clock and median CPU seconds of solve_mckp, and its choice."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        choice = solve_mckp(inst.costs, inst.errors, inst.budget)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=20.0, help="PuLP solver limit (s)")
    parser.add_argument("--repeats", type=int, default=30, help="runs of the exact solver")
    parser.add_argument("--skip-cbc", action="store_true")
    args = parser.parse_args()

    instances = [
        llm_instance("Llama-3-8B shape", blocks=32, hidden=4096, kv=1024, intermediate=14336),
        wide_instance(),
        llm_instance("SmolLM2-135M shape", blocks=30, hidden=576, kv=192, intermediate=1536),
    ]
    solvers = ["highs"] + ([] if args.skip_cbc else ["cbc"])
    print(f"PuLP {pulp_version()}: gap 0, time limit {args.time_limit:g} s, PuLP time = model build + solve;")
    print(f"exact = median of {args.repeats} runs (wall clock; CPU time in brackets); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    header = f"{'instance':<20}{'shape':<31}{'solver':<12}{'time':>19}{'PuLP/exact':>12}  objective"
    print(header)
    print("-" * (len(header) + 40))
    for inst in instances:
        exact_s, exact_cpu, choice = time_exact(inst, args.repeats)
        best = objective(inst.errors, choice)
        used = total_cost(inst.costs, choice) / inst.budget
        exact_time = f"{exact_s * 1e3:.1f} ms ({exact_cpu * 1e3:.1f})"
        print(f"{inst.name:<20}{inst.shape_text:<31}{'exact':<12}{exact_time:>19}{'':>12}  "
              f"{best:.12g} (budget used {used:.7f})")
        for solver in solvers:
            run = run_pulp_mckp(inst.costs, inst.errors, inst.budget, solver=solver,
                                time_limit=args.time_limit)
            value = objective(inst.errors, run.choice) if run.choice else float("nan")
            rel = (value - best) / abs(best) if best else value - best
            if abs(rel) <= 1e-7:
                agree = "agrees"
            elif rel > 0:
                agree = f"worse than exact by {rel:.2e} relative"
            else:
                agree = f"BETTER than exact by {-rel:.2e} relative: exact solver wrong?"
            note = "" if run.proven_optimal else f"  [{run.status}: time limit hit, not proven optimal]"
            print(f"{'':<20}{'':<31}{'pulp+' + solver:<12}{run.seconds:>17.2f} s{run.seconds / exact_s:>12.0f}  "
                  f"{value:.12g} ({agree}){note}")
        print()


if __name__ == "__main__":
    main()
