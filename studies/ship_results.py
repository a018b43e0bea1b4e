"""Measure the demo results the app ships (`cache/demo/results.json`).

Every record is a real compression + evaluation through the app's own job path
(`pipeline.evaluate_and_store`): WikiText-2 test perplexity on the quick protocol
(8 x 512 tokens, `evaluation.QUICK_EVAL`), KL to the dense model on the profile's
search windows, the realised ratio and the plan's ranks (for predicted vs measured).
Nothing is copied from elsewhere; a cell that cannot run is reported and skipped.

    python -m studies.ship_results [--profile cache/demo/smollm2-135m-kfac] [--cache-dir DIR]
        [--methods uniform,lems,...] [--ratios 0.8 0.6] [--out cache/demo/results.json]
        [--protocol quick|reference] [--datasets wikitext2,ptb] [--decomposition saes] [--log-every 60]

``--protocol reference`` measures on the paper's protocol (2048-token windows, all of them)
instead of the quick one. Records already in ``--out`` for the same (method, decomposition,
budget, protocol) are kept and not measured again (a dataset a record lacks is measured and
added to it), and each record is written as soon as it is measured, so a long run can be
stopped and resumed. ``--decomposition`` factorises the profile's plans with another
decomposition (e.g. LEMS ranks with SAES or LC-SVD factors). ``--log-every`` prints the
job's progress (e.g. the perplexity window) at most that often, so the time per window of
a long cell can be read while it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

import torch

from lems_core.allocators import MODEL_SCORED, allocate, fit_bias
from lems_core.cache import DEMO_DIR
from lems_core.evaluation import QUICK_EVAL, REFERENCE_EVAL, protocol_name
from lems_core.pipeline import PlanRequest, evaluate_and_store, score_function
from lems_core.run import Run
from lems_core.safe_io import advisory_lock
from lems_core.profile import Profile

SCHEMA = "lems-results/1"
DEFAULT_METHODS = ["uniform", "lems", "lems_fixed", "lems_fit", "svdllm_v2", "atp", "mrcs", "asvd", "ars",
                   "erc_plc", "lcsvd_search"]


def _plan_item(profile: Profile, method: str, ratio: float, cache_dir: Path):
    """A RankPlan to evaluate, or a PlanRequest the job solves on the model (model-scored methods)."""
    if method in MODEL_SCORED:
        return PlanRequest(method, ratio)
    if method == "lems_fit":  # the reference's fit at exactly this ratio, on the model
        alloc = fit_bias(profile, ratio, score_function(profile, "kl", run=Run(cache_dir=cache_dir, device="cpu"))).allocation
    else:
        alloc = allocate(profile, method, ratio)
    return alloc.to_plan(profile, meta={"calibration": profile.calibration})


def _progress_printer(every: float):
    """A progress callback that prints the job's message and elapsed seconds at most every ``every`` s (0: never)."""
    started = last = time.perf_counter()

    def report(fraction: float, message: str) -> None:
        nonlocal last
        now = time.perf_counter()
        if every > 0 and now - last >= every:
            last = now
            print(f"  [{now - started:7.1f}s load {os.getloadavg()[0]:.1f}] {fraction:5.1%} {message}", flush=True)
    return report


def _key(record: dict) -> tuple:
    return record["method"], record["decomposition"], round(float(record["budget"]), 4), protocol_name(record.get("settings"))


def _read(out: Path) -> list[dict]:
    return json.loads(out.read_text())["results"] if out.is_file() else []


def _store(out: Path, record: dict, note: str) -> dict:
    """Add ``record`` to ``out`` (merged into a stored record of its cell, ``_with_datasets``); returns what is stored.

    The file is re-read and replaced under a lock, so two runs writing one file at once
    (say a reference cell and a quick one) keep each other's records.
    """
    with advisory_lock(out):
        records = _read(out)
        at = next((i for i, r in enumerate(records) if _key(r) == _key(record)), None)
        if at is None:
            records.append(record)
        else:
            record = records[at] = _with_datasets(records[at], record)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"schema": SCHEMA, "note": note, "results": records}, indent=1))
        os.replace(tmp, out)
    return record


def run(args) -> None:
    profile = Profile.load(args.profile)
    out = Path(args.out)
    stored = {_key(r): r for r in _read(out)}  # cells finished before this run, skipped
    load = os.getloadavg()[0]
    protocol = REFERENCE_EVAL if args.protocol == "reference" else QUICK_EVAL
    note = (f"measured by studies/ship_results.py on {profile.model_source} ({profile.decomposition} profile "
            f"{Path(args.profile).name}), CPU (the last run with torch threads {torch.get_num_threads()}; "
            f"the thread count does not change the numbers); each record names its protocol "
            f"(quick: the first {QUICK_EVAL.max_windows} x {QUICK_EVAL.seq_len} tokens of WikiText-2 test; "
            f"reference: {REFERENCE_EVAL.seq_len}-token windows, all of them)")
    decomposition = args.decomposition or profile.decomposition
    for ratio in args.ratios:
        for method in args.methods:
            key = (method, decomposition, round(ratio, 4), protocol.name)
            have = stored.get(key)
            datasets = [d for d in args.datasets if have is None or d not in (have.get("ppl") or {})]
            if not datasets:
                continue
            started = time.perf_counter()
            try:
                item = _plan_item(profile, method, ratio, args.cache_dir)
                job = Run(cache_dir=args.cache_dir, device="cpu", progress=_progress_printer(args.log_every))
                record = evaluate_and_store(item, profile=profile, run=job, decomposition=args.decomposition,
                                            datasets=datasets, protocol=protocol)
            except Exception as exc:  # a cell that cannot run says why; the others go on
                traceback.print_exc()
                print(f"{method} {ratio}: n/a ({type(exc).__name__}: {exc})", flush=True)
                continue
            if "error" in record:
                print(f"{method} {ratio}: n/a ({record['error']})", flush=True)
                continue
            record["method"] = method  # lems_fit plans are named lems by the allocation
            record["source"] = "shipped"
            stored[key] = _store(out, record, note)
            print(f"[{time.perf_counter() - started:6.1f}s load {os.getloadavg()[0]:.1f} (start {load:.1f})] "
                  f"{method} ({decomposition}) {ratio} {protocol.name}: ppl {record['ppl']} kl {record['kl']:.4f} "
                  f"ratio {record['realised_ratio']:.3f}", flush=True)


def _with_datasets(have: dict, new: dict) -> dict:
    """A stored cell with the datasets a later run measured added (a cell measured on WikiText-2 first
    gets PTB without measuring WikiText-2 again). The same plan (ranks) keeps the stored record's KL
    and adds the seconds; a different plan (the allocator changed since) replaces the record."""
    if have.get("ranks") != new.get("ranks"):
        return new
    merged = {**have, "ppl": {**have["ppl"], **new["ppl"]}, "dense_ppl": {**have["dense_ppl"], **new["dense_ppl"]},
              "seconds": round(have["seconds"] + new["seconds"], 1)}
    settings = dict(have.get("settings") or {})
    settings["splits"] = {**(settings.get("splits") or {}), **((new.get("settings") or {}).get("splits") or {})}
    merged["settings"] = settings
    return merged


def table(out: Path, dataset: str = "wikitext2", protocol: str = "quick") -> str:
    """The shipped records of one protocol as a markdown table: method x budget, PPL (realised ratio) and KL."""
    records = [r for r in json.loads(out.read_text())["results"]
               if protocol_name(r.get("settings")) == protocol]
    budgets = sorted({round(r["budget"], 4) for r in records}, reverse=True)
    methods = list(dict.fromkeys(_label(r, records) for r in records))
    cell = {(_label(r, records), round(r["budget"], 4)): r for r in records}
    lines = ["| allocator | " + " | ".join(f"kept {b:g}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for m in methods:
        row = [(f"{cell[(m, b)]['ppl'][dataset]:.2f} ({cell[(m, b)]['realised_ratio']:.3f}; KL {cell[(m, b)]['kl']:.3f})"
                if (m, b) in cell else "") for b in budgets]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _label(record: dict, records: list[dict]) -> str:
    """The record's method, with its decomposition in brackets when it is not the file's first one
    (so LEMS ranks with SAES factors are a row of their own, not a second value of the KFAC cell)."""
    first = records[0]["decomposition"] if records else None
    return record["method"] if record["decomposition"] == first else f"{record['method']} [{record['decomposition']}]"


def protocol_table(out: Path, dataset: str = "wikitext2") -> str:
    """Each cell measured on both protocols: quick and reference PPL, their ratio, and each protocol's ranking.

    The ranking compares the allocators (lower PPL first) at one budget among the cells
    that have both protocols, so a change of order is a change caused by the protocol.
    """
    records = json.loads(out.read_text())["results"]
    cells: dict[tuple, dict] = {}
    for r in records:
        if dataset in (r.get("ppl") or {}):
            cells.setdefault((_label(r, records), round(float(r["budget"]), 4)), {})[protocol_name(r.get("settings"))] \
                = r["ppl"][dataset]
    both = {k: v for k, v in cells.items() if "quick" in v and "reference" in v}
    lines = [f"| allocator | kept | {dataset} quick | {dataset} reference | reference / quick |", "|---|---|---|---|---|"]
    for (method, budget), v in sorted(both.items(), key=lambda kv: (-kv[0][1], kv[1]["reference"])):
        lines.append(f"| {method} | {budget:g} | {v['quick']:.2f} | {v['reference']:.2f} | {v['reference'] / v['quick']:.3f} |")
    for budget in sorted({b for _, b in both}, reverse=True):
        here = {m: v for (m, b), v in both.items() if b == budget}
        quick = sorted(here, key=lambda m: here[m]["quick"])
        reference = sorted(here, key=lambda m: here[m]["reference"])
        verdict = "the same" if quick == reference else "different"
        lines.append(f"\nkept {budget:g}: ranking {verdict} (quick: {' < '.join(quick)}; reference: {' < '.join(reference)})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", type=Path, default=DEMO_DIR / "smollm2-135m-kfac")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=DEFAULT_METHODS)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--out", default=str(DEMO_DIR / "results.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--protocol", choices=("quick", "reference"), default="quick")
    parser.add_argument("--datasets", type=lambda s: [d for d in s.split(",") if d], default=["wikitext2"])
    parser.add_argument("--decomposition", default=None,
                        help="factorise the plans with this decomposition (default: the profile's), e.g. saes, lcsvd")
    parser.add_argument("--log-every", type=float, default=60.0,
                        help="print the job's progress at most every this many seconds (0: only each cell's result)")
    parser.add_argument("--table", action="store_true", help="only print the stored records as a markdown table")
    parser.add_argument("--compare-protocols", metavar="DATASET", nargs="?", const="wikitext2",
                        help="only print the cells measured on both protocols, their PPL ratio and rankings")
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.out), protocol=args.protocol))
        return
    if args.compare_protocols:
        print(protocol_table(Path(args.out), args.compare_protocols))
        return
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
