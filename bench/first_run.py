"""Benchmark: a new user's first evaluation of a demo plan, stage by stage.

Run as `python -m bench.first_run` (minutes). With an empty temporary cache folder
(plus the committed `cache/demo`), it builds the LEMS plan at budget 0.8 from the
committed KFAC demo profile, with the error model the Allocate page starts from, and
evaluates it through the app's background-job entry point
(`pipeline.evaluate_and_store`, as `app_pages/compress.py` submits it) with the quick
protocol (`evaluation.QUICK_EVAL`: 8 windows x 512 tokens, WikiText-2) and KL on
the profile's search windows. Goal: under 3 minutes on this machine.

Stages are timed by wrapping the pipeline functions of each step (the code path is
the app's; only timers are added): model load, calibration windows, statistics,
decomposition (factorisation and its cache write), reference logits and KL, dense and
compressed perplexity, compression. Each stage's time excludes the stages it calls.
The job's progress reports are recorded too: when the first one came, the longest
wait between two, and whether each carried a time estimate. The load average and
thread count are printed with the result, since other jobs slow every stage.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from lems_core import pipeline
from lems_core.pipeline import artefacts, evaluation, jobs, models, plan_factors
from lems_core.allocators import allocate, fitted_params
from lems_core.error_model import ErrorModelParams
from lems_core.evaluation import QUICK_EVAL
from lems_core.jobs import ETA_MIN_FRACTION
from lems_core.profile import Profile
from lems_core.run import Run

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "cache" / "demo" / "smollm2-135m-kfac"
BUDGET = 0.8
GOAL_SECONDS = 180.0
ABSORBING = {"dense perplexity", "model load"}  # their inner timed calls count to them (dense ppl runs perplexity)
# (module, function, stage): the pipeline's steps as evaluate_and_store reaches them, wrapped in each
# module that looks them up.
STAGES = [
    (models, "load_model", "model load"),
    *((module, "calibration_windows", "calibration windows") for module in (artefacts, plan_factors, evaluation)),
    *((module, "statistics_for", "statistics") for module in (artefacts, plan_factors)),
    (artefacts, "collect_grad_grams", "statistics"),
    *((module, "collect_kfac_statistics", "statistics") for module in (artefacts, plan_factors)),
    (evaluation, "plan_factorizations", "decomposition"),
    (evaluation, "reference_logits", "KL (reference logits)"),
    (evaluation, "dense_perplexity", "dense perplexity"),
    (evaluation, "compress_model", "compression"),
    (evaluation, "restore_dense", "compression"),
    (evaluation, "perplexity", "perplexity"),
    (evaluation, "kl_to_reference", "KL"),
]


class StageTimer:
    """Exclusive wall time per stage: a wrapped call's time minus the wrapped calls inside it."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = []  # [stage, start, inner seconds]

    @contextmanager
    def stage(self, name: str):
        self._stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            name, start, inner = self._stack.pop()
            spent = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - inner
            if self._stack:
                self._stack[-1][2] += spent

    def wrap(self, module, attr: str, name: str) -> None:
        original = getattr(module, attr)

        def timed(*args, **kwargs):
            if self._stack and self._stack[-1][0] in ABSORBING:
                return original(*args, **kwargs)
            with self.stage(name):
                return original(*args, **kwargs)
        setattr(module, attr, timed)


class ProgressLog:
    """The job's progress reports with their times (what the app's bar shows)."""

    def __init__(self, started: float, verbose: bool = False):
        self.started, self.reports, self.verbose = started, [], verbose

    def __call__(self, fraction: float, message: str = "") -> None:
        self.reports.append((time.perf_counter() - self.started, float(fraction), str(message)))
        if self.verbose and (not self.reports[:-1] or self.reports[-2][2] != message):
            self.print_live(fraction, message)

    def summary(self, total: float) -> str:
        times = [0.0] + [t for t, _, _ in self.reports] + [total]
        gap, at = max((b - a, i) for i, (a, b) in enumerate(zip(times, times[1:])))
        after = "the start" if at == 0 else repr(self.reports[at - 1][2])
        first = self.reports[0] if self.reports else (total, 0.0, "(none)")
        return (f"{len(self.reports)} progress reports; first after {first[0]:.1f} s ({first[2]!r}); longest wait "
                f"{gap:.1f} s, after {after}; {self.estimates(total)}")

    def estimates(self, total: float) -> str:
        """The job's linear time estimate (``JobState.seconds_left``: elapsed / fraction) at 1/4, 1/2, 3/4 of the run."""
        shown = []
        for part in (0.25, 0.5, 0.75):
            before = [(t, f) for t, f, _ in self.reports if t <= part * total and f >= ETA_MIN_FRACTION]
            if before:
                t, f = before[-1]
                shown.append(f"{t:.0f} s: total {t / f:.0f} s")
        return "estimated at " + ", ".join(shown) + f" (actual {total:.0f} s)" if shown else "no estimate"

    def print_live(self, fraction: float, message: str) -> None:
        """The report as a line on stderr, as the app's bar would show it."""
        print(f"  [{time.perf_counter() - self.started:6.1f} s] {100 * fraction:5.1f} % {message}", file=sys.stderr,
              flush=True)


def _record_job_threads() -> list[int]:
    """The thread count(s) ``pipeline.free_core_threads`` picks for the job (it adapts to the load)."""
    used, original = [], jobs.free_core_threads

    @contextmanager
    def recorded():
        with original() as threads:
            used.append(threads)
            yield threads
    jobs.free_core_threads = recorded
    return used


def app_plan(profile: Profile):
    """The LEMS plan at BUDGET with the error model the Allocate page starts from (the profile's bias fit)."""
    found = fitted_params(profile, BUDGET)
    params = found[0] if found else ErrorModelParams(ref_ratio=profile.ref_ratio, use_scale=profile.kl_ref is not None)
    alloc = allocate(profile, "lems", BUDGET, params=params)
    return alloc.to_plan(profile, meta={"calibration": profile.calibration}), params


SHIP_DATASETS = ("wikitext2", "ptb")


def ship_dense_ppl() -> None:
    """Write cache/demo/dense_ppl.json: the demo's dense perplexity per dataset, quick protocol, CPU float32."""
    import json

    from lems_core.cache import DEMO_DIR
    from lems_core.data import evaluation_split, load_text
    from lems_core.evaluation import perplexity, token_windows

    loaded = pipeline.get_model("demo", "cpu")
    entries = []
    for dataset in SHIP_DATASETS:  # measured, never read back from the file being written
        split = evaluation_split(dataset)
        text, _ = load_text(dataset, split)
        windows = token_windows(loaded.tokenizer, text, QUICK_EVAL.seq_len, QUICK_EVAL.max_windows)
        entries.append(dict(zip(pipeline.DENSE_PPL_FIELDS, (loaded.fingerprint, dataset, split, QUICK_EVAL.seq_len,
                                                             QUICK_EVAL.max_windows)), ppl=perplexity(loaded.model, windows).ppl))
        print(entries[-1], flush=True)
    doc = {"schema": "lems-dense-ppl/1", "note": "dense perplexity of the demo model, measured on a CPU in float32 by "
           "`python -m bench.first_run --ship-dense-ppl` (pipeline.shipped_dense_perplexity)", "entries": entries}
    (DEMO_DIR / pipeline.SHIPPED_DENSE_PPL).write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache folder to use (default: a new empty temporary one, removed afterwards)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="do not print the progress reports as they come")
    parser.add_argument("--ship-dense-ppl", action="store_true",
                        help=f"measure the demo's dense perplexity under the quick protocol ({', '.join(SHIP_DATASETS)}) "
                             f"and write cache/demo/{pipeline.SHIPPED_DENSE_PPL}, then stop")
    args = parser.parse_args()
    if args.ship_dense_ppl:
        ship_dense_ppl()
        return
    print(f"# bench/first_run.py: load average {os.getloadavg()[0]:.2f} / {os.getloadavg()[1]:.2f} (1/5 min), "
          f"{os.cpu_count()} CPUs, torch {torch.get_num_threads()} thread(s), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    profile = Profile.load(DEMO)
    plan, params = app_plan(profile)
    summary = plan.summary
    print(f"# plan: LEMS @ {BUDGET} on {profile.model_source}/{profile.decomposition}: realised "
          f"{summary['realised_ratio']:.4f}, {summary['num_layers'] - summary['dense_layers']} of "
          f"{summary['num_layers']} layers factorised; protocol {QUICK_EVAL.max_windows} x {QUICK_EVAL.seq_len}")
    timer = StageTimer()
    for module, attr, name in STAGES:
        timer.wrap(module, attr, name)
    used = _record_job_threads()
    with tempfile.TemporaryDirectory(prefix="lems-first-run-") as tmp:
        cache_dir = args.cache_dir or Path(tmp)
        started = time.perf_counter()
        log = ProgressLog(started, verbose=not args.quiet)
        with timer.stage("other"):
            result = pipeline.evaluate_and_store(
                plan, log, threading.Event(), profile=profile, run=Run(cache_dir=cache_dir, device=args.device),
                params=params, decomposition=None, datasets=["wikitext2"], protocol=QUICK_EVAL)
        total = time.perf_counter() - started
    print(f"{'stage':24s} {'seconds':>8s}")
    for name in dict.fromkeys(n for _, _, n in STAGES):
        print(f"{name:24s} {timer.seconds.get(name, 0.0):8.1f}")
    print(f"{'other':24s} {timer.seconds.get('other', 0.0):8.1f}")
    print(f"{'total':24s} {total:8.1f}  (goal < {GOAL_SECONDS:.0f} s: {'met' if total < GOAL_SECONDS else 'NOT met'})")
    print(f"# the job ran with {used or ['(unrecorded)']} intra-op thread(s) (pipeline.free_core_threads)")
    print(f"# result: wikitext2 ppl {result['ppl']['wikitext2']!r} (dense {result['dense_ppl']['wikitext2']!r}), "
          f"KL {result['kl']!r}")
    print(f"# progress: {log.summary(total)}")
    print(f"# load average after: {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
