"""Benchmark: a new user's first evaluation of a demo plan, stage by stage.

Run as `python -m bench.first_run` (minutes). Two scenarios, each in a process of
its own with an empty temporary cache folder (plus the committed `cache/demo`):
"fresh", where the demo GGUF is converted too (an empty `$LEMS_GGUF_CACHE_DIR`), and
"converted", with the conversion the first one made and otherwise nothing cached.
Each builds the LEMS plan at budget 0.8 from the committed KFAC demo profile, with
the error model the Allocate page starts from, and evaluates it through the app's
background-job entry point (`pipeline.evaluate_and_store`, as `app_pages/compress.py`
submits it) with the quick protocol (`evaluation.QUICK_EVAL`: 8 windows x 512 tokens,
WikiText-2) and KL on the profile's search windows. Goals: under 2 minutes fresh,
under 90 s converted.

Stages are timed by wrapping the pipeline functions of each step (the code path is
the app's; only timers are added): GGUF conversion, model load, calibration windows,
statistics, decomposition (factorisation and its cache write), reference logits and
KL, dense and compressed perplexity, compression. Each stage's time excludes the
stages it calls. The job's progress reports are recorded too: when the first one
came, the longest wait between two, and whether each carried a time estimate. The
load average, the cores other processes used at the start (``cpu_share``) and the
job's thread count are printed with each result, since other jobs slow every stage.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from lems_core import gguf_cache, pipeline
from lems_core.cpu_share import others_load
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
GOALS = {"fresh": 120.0, "converted": 90.0}  # seconds, per scenario
SCENARIO_TITLES = {"fresh": "fresh cache, GGUF conversion included", "converted": "model converted, cache otherwise empty"}
SUMMARY_PREFIX = "# summary: "
ABSORBING = {"dense perplexity"}  # its inner timed calls count to it (dense ppl runs perplexity)
# (module, function, stage): the pipeline's steps as evaluate_and_store reaches them, wrapped in each
# module that looks them up.
STAGES = [
    (gguf_cache, "convert_gguf", "GGUF conversion"),  # looked up by model.load_model at each call
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
    """Exclusive wall and process CPU time per stage: a wrapped call's time minus the wrapped calls inside it.

    The CPU time (all threads) tells what the stage cost apart from waiting for cores
    other processes hold: at one thread it is about the stage's wall time on an idle machine.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._stack: list[list] = []  # [stage, wall start, cpu start, inner wall, inner cpu]

    @contextmanager
    def stage(self, name: str):
        self._stack.append([name, time.perf_counter(), time.process_time(), 0.0, 0.0])
        try:
            yield
        finally:
            name, start, cpu_start, inner, inner_cpu = self._stack.pop()
            spent, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - inner
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + cpu - inner_cpu
            if self._stack:
                self._stack[-1][3] += spent
                self._stack[-1][4] += cpu

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
    parser.add_argument("--scenario", choices=["both", *GOALS], default="both",
                        help="both (default: each in a process of its own, fresh first), or one in this process "
                             "(converted: converts first, untimed, when $LEMS_GGUF_CACHE_DIR lacks the conversion)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="do not print the progress reports as they come")
    parser.add_argument("--ship-dense-ppl", action="store_true",
                        help=f"measure the demo's dense perplexity under the quick protocol ({', '.join(SHIP_DATASETS)}) "
                             f"and write cache/demo/{pipeline.SHIPPED_DENSE_PPL}, then stop")
    args = parser.parse_args()
    if args.ship_dense_ppl:
        ship_dense_ppl()
    elif args.scenario == "both":
        run_both(args.device, args.quiet)
    else:
        run_scenario(args.scenario, args.device, args.quiet)


def run_both(device: str, quiet: bool) -> None:
    """Both scenarios, fresh first, each in a new process sharing one temporary GGUF cache; their summaries last."""
    summaries = []
    with tempfile.TemporaryDirectory(prefix="lems-first-run-gguf-") as gguf_dir:
        env = {**os.environ, gguf_cache.CACHE_ENV: gguf_dir}
        for scenario in GOALS:
            command = [sys.executable, "-m", "bench.first_run", "--scenario", scenario, "--device", device]
            child = subprocess.run(command + (["--quiet"] if quiet else []), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                   text=True, check=True)
            print(child.stdout, end="", flush=True)
            summaries += [line for line in child.stdout.splitlines() if line.startswith(SUMMARY_PREFIX)]
    print("\n".join(summaries))


def run_scenario(scenario: str, device: str, quiet: bool) -> None:
    """One timed first evaluation in this process, with an empty temporary cache folder; prints its stages."""
    if scenario == "converted":
        convert_demo_untimed()
    elif gguf_cache.CACHE_ENV not in os.environ:  # not the default cache/models, which may hold the conversion
        os.environ[gguf_cache.CACHE_ENV] = tempfile.mkdtemp(prefix="lems-first-run-gguf-")
    load_before, busy_before = os.getloadavg()[0], others_load(os.cpu_count() or 1)
    print(f"## {SCENARIO_TITLES[scenario]}")
    print(f"# bench/first_run.py: load average {load_before:.2f} / {os.getloadavg()[1]:.2f} (1/5 min), other "
          f"processes on {busy_before:.2f} cores, {os.cpu_count()} CPUs, torch {torch.get_num_threads()} thread(s), "
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
    with tempfile.TemporaryDirectory(prefix="lems-first-run-") as cache_dir:
        started = time.perf_counter()
        log = ProgressLog(started, verbose=not quiet)
        with timer.stage("other"):
            result = pipeline.evaluate_and_store(
                plan, log, threading.Event(), profile=profile, run=Run(cache_dir=Path(cache_dir), device=device),
                params=params, decomposition=None, datasets=["wikitext2"], protocol=QUICK_EVAL)
        total = time.perf_counter() - started
    goal = GOALS[scenario]
    verdict = f"goal < {goal:.0f} s: {'met' if total < goal else 'NOT met'}"
    print(f"{'stage':24s} {'seconds':>8s} {'CPU s':>8s}")
    for name in [*dict.fromkeys(n for _, _, n in STAGES), "other"]:
        print(f"{name:24s} {timer.seconds.get(name, 0.0):8.1f} {timer.cpu_seconds.get(name, 0.0):8.1f}")
    print(f"{'total':24s} {total:8.1f} {sum(timer.cpu_seconds.values()):8.1f}  ({verdict})")
    print(f"# the job ran with {used or ['(unrecorded)']} intra-op thread(s) (pipeline.free_core_threads)")
    print(f"# result: wikitext2 ppl {result['ppl']['wikitext2']!r} (dense {result['dense_ppl']['wikitext2']!r}), "
          f"KL {result['kl']!r}")
    print(f"# progress: {log.summary(total)}")
    print(f"{SUMMARY_PREFIX}{SCENARIO_TITLES[scenario]}: {total:.1f} s ({verdict}), CPU "
          f"{sum(timer.cpu_seconds.values()):.1f} s; load average {load_before:.2f} -> "
          f"{os.getloadavg()[0]:.2f}, others on {busy_before:.2f} cores at the start, job threads "
          f"{used or ['(unrecorded)']}", flush=True)


def convert_demo_untimed() -> None:
    """Make sure the demo's GGUF conversion is in the GGUF cache (the converted scenario starts from it)."""
    import functools

    from lems_core.model import demo_gguf_path, model_fingerprint

    gguf_cache.converted_folder(demo_gguf_path(),
                                converter=functools.partial(gguf_cache.convert_gguf, fingerprint=model_fingerprint))


if __name__ == "__main__":
    main()
