"""Benchmark: LEMS under a measured latency budget against LEMS under a parameter budget (demo, CPU).

Run as `python -m bench.latency_alloc` (a few minutes), then `python -m bench.latency_alloc --evaluate`
(a few minutes per plan) for perplexity and KL on the quick protocol. ``--workload prefill``
does the same for a prompt pass of 1 x 256 tokens (the prefill device profile's default)
instead of a decode step, with its plans in a folder of their own.

1. The device profile of the demo's four layer shapes for the workload is measured (or
   read from the cache): ``latency.latency_cost``.
2. For each target t (0.85, 0.75 of the dense latency of the compressible
   Linears) the latency-budget LEMS plan is built; then parameter-budget LEMS plans at
   five parameter ratios around the one of equal predicted latency are timed with it, a
   line is fitted through their measured fractions, and the ratio where it meets the
   latency plan's *measured* fraction is taken; that parameter plan is built, and all
   plans are timed again together.
3. Timing: one decode step (batch 1, one token, no KV cache), or one prefill forward
   (batch 1, 256 fixed random tokens, no KV cache), of the demo model, whose
   compressible Linears are swapped between plans (random factors at the plan's ranks:
   time does not depend on the values; each low-rank module prepared as an export runs it,
   the path the device profile times). Forward hooks on every compressible module sum
   its time inside the step; plans are timed round-robin (one step of each in turn), so
   load changes hit all alike. The measured fraction is the median over rounds of
   plan / dense of that sum; the whole step's fraction (timed without hooks) is
   reported beside it.

The load average, thread count and clock are printed beside the figures. Plans are saved
under --plans-dir (one folder per workload) for ``--evaluate``; every mode appends its
output to the results file, so a prefill run keeps the decode figures before it.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lems_core import pipeline
from lems_core.allocators import allocate
from lems_core.compression import LowRankLinear, is_dense_rank, set_module
from lems_core.fused import prepare_modules
from lems_core.latency import Workload, latency_cost
from lems_core.latency.measure import clock_of
from lems_core.model import compressible_layers
from lems_core.plan import RankPlan
from lems_core.profile import Profile

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "cache" / "demo" / "smollm2-135m-kfac"
RESULTS = ROOT / "bench" / "results" / "latency_alloc.txt"
PLANS_DIRS = {"decode": ROOT / "cache" / "latency_alloc_plans", "prefill": ROOT / "cache" / "latency_alloc_plans_prefill"}
REPEATS = {"decode": 31, "prefill": 11}  # a prefill forward takes ~1 s here against ~0.08 s for a decode step
TARGETS = (0.85, 0.75)
BRACKET = (-0.08, -0.04, 0.0, 0.04, 0.08)  # parameter ratios timed around the one of equal predicted latency


class SwappableModel:
    """The demo model with its compressible Linears swappable between variants (name -> module per variant).

    Every compressible module of every variant carries a pre- and a post-forward hook that,
    while ``recording``, add the time between them to ``linear_seconds``: the time of the
    compressible Linears inside a real decode step (``tokens`` = 1) or prefill forward
    (``tokens`` fixed random prompt tokens).
    """

    def __init__(self, model: nn.Module, clock: str, tokens: int = 1):
        self.model, self.layers = model, compressible_layers(model)
        self.input_ids = torch.tensor([[42]]) if tokens == 1 else torch.randint(
            0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        self.tick, self.recording, self.linear_seconds = clock_of(clock, "cpu"), False, 0.0
        self.variants = {"dense": {l.name: model.get_submodule(l.name) for l in self.layers}}
        self.hooked: set[int] = set()
        self._hook(self.variants["dense"].values())

    def _hook(self, modules) -> None:
        for module in modules:
            if id(module) not in self.hooked:
                self.hooked.add(id(module))
                module.register_forward_pre_hook(self._start)
                module.register_forward_hook(self._stop)

    def _start(self, module, args) -> None:
        if self.recording:
            module._lems_started = self.tick()

    def _stop(self, module, args, output) -> None:
        if self.recording:
            self.linear_seconds += self.tick() - module._lems_started

    def add_plan(self, label: str, ranks: dict) -> None:
        """A variant with ``ranks``: its low-rank modules prepared as an export runs them (as the
        device profile times them: second factors column-major, factors called directly)."""
        dense = self.variants["dense"]
        self.variants[label] = {l.name: dense[l.name] if is_dense_rank(l, ranks[l.name]) else
                                LowRankLinear(l.in_features, l.out_features, int(ranks[l.name]), False)
                                for l in self.layers}
        for module in self.variants[label].values():
            prepare_modules(module, [module])  # a dense one is left as it is
        self._hook(self.variants[label].values())

    def install(self, label: str) -> None:
        for name, module in self.variants[label].items():
            set_module(self.model, name, module)

    def time(self, labels: list[str], repeats: int) -> dict[str, dict[str, np.ndarray]]:
        """Per variant and round: the whole step or forward ("step") and its compressible Linears ("linears").

        ``repeats`` rounds, each installing every variant in turn for one untimed warm-up
        step, one timed step without recording and one recorded step.
        """
        token = self.input_ids
        samples = {label: {"step": [], "linears": []} for label in labels}
        with torch.inference_mode():
            for _ in range(repeats):
                for label in labels:
                    self.install(label)
                    self.model(input_ids=token, use_cache=False)
                    start = self.tick()
                    self.model(input_ids=token, use_cache=False)
                    samples[label]["step"].append(self.tick() - start)
                    self.recording, self.linear_seconds = True, 0.0
                    self.model(input_ids=token, use_cache=False)
                    self.recording = False
                    samples[label]["linears"].append(self.linear_seconds)
        self.install("dense")
        return {label: {k: np.asarray(v) for k, v in s.items()} for label, s in samples.items()}


def compressible_fraction(times: dict, label: str, part: str = "linears") -> float:
    """Median over rounds of plan / dense (each round's pair taken together) for ``part``."""
    return float(np.median(round_fractions(times, label, part)))


def round_fractions(times: dict, label: str, part: str = "linears") -> np.ndarray:
    return times[label][part] / times["dense"][part]


def quartiles(values: np.ndarray) -> str:
    low, high = np.percentile(values, [25, 75])
    return f"[{low:.3f}, {high:.3f}]"


def lems_plan(profile: Profile, ratio: float, cost=None):
    """The LEMS allocation (profile's bias fit) under a parameter budget, or a latency one with ``cost``."""
    return allocate(profile, "lems", ratio) if cost is None else allocate(profile, "lems", ratio, cost=cost)


def equal_predicted_ratio(profile: Profile, cost, fraction: float) -> float:
    """The parameter ratio whose LEMS plan the cost model predicts at ``fraction`` (bisection)."""
    low, high = 0.3, 1.0
    for _ in range(14):
        mid = (low + high) / 2
        low, high = (mid, high) if cost.fraction(profile.layers, lems_plan(profile, mid).ranks) <= fraction else (low, mid)
    return low


def matching_ratio(ratios: list[float], fractions: list[float], wanted: float) -> float:
    """The parameter ratio at which a least-squares line through (ratio, measured fraction) reaches ``wanted``."""
    slope, intercept = np.polyfit(ratios, fractions, 1)
    if slope <= 0:
        raise RuntimeError(f"measured fractions {fractions} do not rise with the parameter ratio: too noisy to match")
    return float(np.clip((wanted - intercept) / slope, min(ratios), max(ratios)))


def workload_cost(args, profile: Profile, refresh: bool = False):
    """The latency cost of ``args.workload`` on the CPU (device profile measured, or read from the cache)."""
    return latency_cost(profile.layers, Workload.named(args.workload), device="cpu", cache_dir=args.cache_dir,
                        clock=args.clock, repeats=args.profile_repeats, refresh=refresh)


def swappable(args) -> SwappableModel:
    """The demo model, ready to time plans inside a step of ``args.workload``."""
    return SwappableModel(pipeline.get_model("demo", "cpu").model, args.clock, Workload.named(args.workload).tokens)


def run_timing(args, out) -> None:
    profile = Profile.load(DEMO)
    started = time.perf_counter()
    cost = workload_cost(args, profile, args.refresh_profile)
    dp = cost.device_profile
    out(f"# device profile {dp.profile_id}: {dp.key.device}, {dp.key.dtype}, torch {dp.key.torch}, "
        f"{dp.key.threads} thread(s), {dp.key.workload.describe()}, clock {dp.settings.get('clock')}, "
        f"{len(dp.shapes)} shapes ({time.perf_counter() - started:.0f} s incl. cache lookup); load "
        f"{os.getloadavg()[0]:.2f}")
    for shape, t in sorted(dp.shapes.items()):
        grid = ", ".join(f"r{r}: {s / t.dense_seconds:.2f}" for r, s in zip(t.ranks, t.lowrank_seconds))
        out(f"#   {shape[0]}x{shape[1]}: dense {t.dense_seconds * 1e6:.0f} us; low rank / dense: {grid}")
    swap = swappable(args)
    plans = {}
    for target in TARGETS:
        lat = lems_plan(profile, target, cost)
        plans[f"latency@{target}"] = lat
        base = equal_predicted_ratio(profile, cost, cost.fraction(profile.layers, lat.ranks))
        bracket = [round(base + d, 4) for d in BRACKET]
        for ratio in bracket:
            plans[f"params@{ratio}"] = lems_plan(profile, ratio)
        for label in [f"latency@{target}"] + [f"params@{r}" for r in bracket]:
            swap.add_plan(label, plans[label].ranks)
        times = swap.time(["dense", f"latency@{target}"] + [f"params@{r}" for r in bracket], args.repeats)
        wanted = compressible_fraction(times, f"latency@{target}")
        matched = round(matching_ratio(bracket, [compressible_fraction(times, f"params@{r}") for r in bracket],
                                       wanted), 4)
        out(f"# target {target}: latency plan measured {wanted:.4f}; parameter ratios {bracket} measured "
            f"{[round(compressible_fraction(times, f'params@{r}'), 4) for r in bracket]} -> line fit equal at {matched} "
            f"(load {os.getloadavg()[0]:.2f})")
        plans[f"params~{target}"] = lems_plan(profile, matched)
        swap.add_plan(f"params~{target}", plans[f"params~{target}"].ranks)
    final = ["dense"] + [f"{kind}{sep}{t}" for t in TARGETS for kind, sep in (("latency", "@"), ("params", "~"))]
    load_before = os.getloadavg()[0]
    times = swap.time(final, args.repeats)
    out(f"\n# final timing, round-robin, {args.repeats} samples per variant, clock {args.clock}, "
        f"{torch.get_num_threads()} thread(s), load {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    out(f"# dense {args.workload} step (median) {np.median(times['dense']['step']) * 1e3:.1f} ms, of which the compressible "
        f"Linears {np.median(times['dense']['linears']) * 1e3:.1f} ms (the device profile's dense sum: "
        f"{cost.dense_total(profile.layers) * 1e3:.1f} ms); measured = median over rounds of plan / dense of the "
        f"Linears' time, quartiles beside it")
    out(f"{'plan':16s} {'param ratio':>11s} {'predicted':>9s} {'measured':>8s} {'quartiles':>16s} {'error':>7s} "
        f"{'whole step':>10s}")
    for label in final[1:]:
        alloc = plans[label]
        predicted = cost.fraction(profile.layers, alloc.ranks)
        measured = compressible_fraction(times, label)
        whole = compressible_fraction(times, label, "step")
        out(f"{label:16s} {alloc.info['realised_ratio']:11.4f} {predicted:9.4f} {measured:8.4f} "
            f"{quartiles(round_fractions(times, label)):>16s} {100 * (predicted - measured) / measured:+6.1f}% "
            f"{whole:10.4f}")
        alloc.to_plan(profile, meta={"calibration": profile.calibration}).save(args.plans_dir / f"{label}.json")


def run_retiming(args, out) -> None:
    """Time the saved plans again, together, with ``--repeats`` rounds: a second, independent measurement."""
    profile = Profile.load(DEMO)
    cost = workload_cost(args, profile)
    plans = {path.stem: RankPlan.load(path) for path in sorted(args.plans_dir.glob("*.json"))}
    swap = swappable(args)
    for label, plan in plans.items():
        swap.add_plan(label, plan.ranks())
    load_before = os.getloadavg()[0]
    times = swap.time(["dense", *plans], args.repeats)
    out(f"\n# retiming of the saved plans, round-robin, {args.repeats} rounds, clock {args.clock}, "
        f"{torch.get_num_threads()} thread(s), load {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    out(f"{'plan':16s} {'param ratio':>11s} {'predicted':>9s} {'measured':>8s} {'quartiles':>16s} {'error':>7s} "
        f"{'whole step':>10s}")
    for label, plan in plans.items():
        predicted = cost.fraction(profile.layers, plan.ranks())
        measured = compressible_fraction(times, label)
        out(f"{label:16s} {plan.summary['realised_ratio']:11.4f} {predicted:9.4f} {measured:8.4f} "
            f"{quartiles(round_fractions(times, label)):>16s} {100 * (predicted - measured) / measured:+6.1f}% "
            f"{compressible_fraction(times, label, 'step'):10.4f}")


def run_per_kind(args, out) -> None:
    """Dense time of each layer kind inside a step of the workload against the device profile's (median over layers and rounds)."""
    profile = Profile.load(DEMO)
    cost = workload_cost(args, profile)
    swap = swappable(args)
    per_kind: dict[str, list[float]] = {}

    def record(module, inputs, output) -> None:
        if swap.recording:
            per_kind.setdefault(module.lems_kind, []).append(swap.tick() - module._lems_started)
    for layer in swap.layers:
        module = swap.variants["dense"][layer.name]
        module.lems_kind = layer.kind
        module.register_forward_hook(record)
    load_before = os.getloadavg()[0]
    swap.time(["dense"], args.repeats)
    out(f"\n# dense Linears inside the {args.workload} step against the device profile {cost.device_profile.profile_id}, "
        f"{args.repeats} rounds, clock {args.clock}, load {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    for kind, seconds in per_kind.items():
        layer = next(l for l in profile.layers if l.kind == kind)
        in_step, alone = float(np.median(seconds)), cost.dense_cost(layer)
        out(f"{kind:5s} {layer.out_features:5d}x{layer.in_features:<5d} in the step {in_step * 1e6:6.0f} us, "
            f"profile {alone * 1e6:6.0f} us, ratio {in_step / alone:.2f}")


def target_first(path: Path) -> tuple:
    """Sort key of a saved plan: lowest target first, so the pair of the deepest cut is evaluated first."""
    target = path.stem.replace("~", "@").rpartition("@")[2]
    try:
        return float(target), path.stem
    except ValueError:
        return float("inf"), path.stem


def run_evaluation(args, out) -> None:
    """Perplexity (WikiText-2) and KL of every saved plan on the quick protocol, one at a time."""
    from lems_core.evaluation import QUICK_EVAL

    out(f"\n# quick protocol ({QUICK_EVAL.max_windows} x {QUICK_EVAL.seq_len}, WikiText-2), KFAC factors; load "
        f"{os.getloadavg()[0]:.2f}, {torch.get_num_threads()} thread(s)")
    for path in sorted(args.plans_dir.glob("*.json"), key=target_first):
        plan = RankPlan.load(path)
        started = time.perf_counter()
        result = pipeline.evaluate_plan(plan, ["wikitext2"], QUICK_EVAL,
                                        run=pipeline.Run(device="cpu", cache_dir=args.cache_dir))
        out(f"{path.stem:16s} param ratio {plan.summary['realised_ratio']:.4f}  ppl {result.ppl['wikitext2']:.3f} "
            f"(dense {result.dense_ppl['wikitext2']:.3f})  KL {result.kl:.5f}  "
            f"({time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--clock", default="cpu", choices=("wall", "cpu"),
                        help="cpu (default): process CPU time, which leaves out the time other jobs hold the core "
                             "on a shared machine; wall: elapsed time")
    parser.add_argument("--workload", choices=("decode", "prefill"), default="decode",
                        help="decode (default): one token, no KV cache; prefill: one forward of 1 x 256 tokens")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds of each round-robin timing (default 31 for decode, 11 for prefill)")
    parser.add_argument("--profile-repeats", type=int, default=21, help="samples per configuration of the device profile")
    parser.add_argument("--refresh-profile", action="store_true", help="measure the device profile again (else cached)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--plans-dir", type=Path, default=None,
                        help="where plans are saved and read (default: one folder per workload under cache/)")
    parser.add_argument("--evaluate", action="store_true", help="evaluate the saved plans (quick protocol) instead")
    parser.add_argument("--retime", action="store_true", help="time the saved plans again (appended to the results)")
    parser.add_argument("--per-kind", action="store_true",
                        help="dense time of each layer kind inside the step against the profile (appended)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.repeats = args.repeats or REPEATS[args.workload]
    args.plans_dir = args.plans_dir or PLANS_DIRS[args.workload]
    args.plans_dir.mkdir(parents=True, exist_ok=True)
    lines = []

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    modes = {"evaluate": run_evaluation, "retime": run_retiming, "per_kind": run_per_kind}
    chosen = [name for name in modes if getattr(args, name)]
    mode = f" --workload {args.workload}" + "".join(f" --{name.replace('_', '-')}" for name in chosen)
    out(f"# bench/latency_alloc.py{mode}: load average "
        f"{os.getloadavg()[0]:.2f} / {os.getloadavg()[1]:.2f} (1/5 min), {os.cpu_count()} CPUs, torch "
        f"{torch.get_num_threads()} thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for run in [modes[name] for name in chosen] or [run_timing]:
        run(args, out)
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
