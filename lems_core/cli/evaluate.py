"""``evaluate``: compress with a plan and measure perplexity, KL and optionally zero-shot accuracy."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import (add_decomposition_option, add_offload_options, add_plan_options, eval_protocol, plan_inputs,
                     progress_bar, run_from_args, split_names)
from .types import latency_repeats, latency_tokens, positive_int, window_cap

NAME = "evaluate"
HELP = "compress with a plan and measure perplexity + KL (+ zero-shot accuracy)"  # its line in `-h`


def add_parser(subparsers):
    """The ``evaluate`` subparser, with all its options."""
    sp = subparsers.add_parser(NAME, help=HELP)
    sp.add_argument("--plan", required=True, help="rank plan file (JSON, from allocate or ars)")
    sp.add_argument("--datasets", default="wikitext2", help="perplexity datasets, comma separated ('' = none)")
    sp.add_argument("--tasks", nargs="?", const="paper", default=None,
                    help="zero-shot accuracy through lm-eval: lm-eval task names and/or local task YAML paths, comma "
                         "separated; 'paper' or the bare flag = the paper's eight (piqa, openbookqa, hellaswag, "
                         "arc_challenge, arc_easy, winogrande, boolq, mathqa; these need the Hugging Face hub)")
    sp.add_argument("--task-limit", type=positive_int, default=None,
                    help="score at most this many documents per task (default: all, the reference protocol)")
    sp.add_argument("--quick", action="store_true",
                    help="quick protocol: the first 8 windows of 512 tokens (default: the reference protocol, "
                         "all 2048-token windows); the result records which")
    sp.add_argument("--seq-len", type=positive_int, default=None, help="override the protocol's window length")
    sp.add_argument("--max-windows", type=window_cap, default=None, help="override the protocol's window cap (a positive number, or 'all')")
    sp.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    add_latency_options(sp)
    add_plan_options(sp)
    add_decomposition_option(sp)
    add_offload_options(sp)
    sp.set_defaults(fn=run)
    return sp


def add_latency_options(sp) -> None:
    """--measure-latency and how: prompt tokens, repeats."""
    sp.add_argument("--measure-latency", action="store_true",
                    help="also time the dense and the compressed model in turns on --device: prefill of 1 x "
                         "--latency-tokens tokens and decode after them (medians of --latency-repeats); the result "
                         "records it (field 'latency') and a table of measured against predicted speedup is printed "
                         "to stderr. Costs about 2 x (repeats + 1) prefills and short decodes")
    sp.add_argument("--latency-tokens", type=latency_tokens, default=None,
                    help="prompt length of the latency timing (default 256, the prefill device profile's)")
    sp.add_argument("--latency-repeats", type=latency_repeats, default=None,
                    help="timed turns of each model and workload (default 5)")


def latency_settings(args):
    """The TimingSettings of --measure-latency, None without it; its options alone are an error."""
    from ..latency.model_timing import TimingSettings

    if not args.measure_latency:
        if args.latency_tokens is not None or args.latency_repeats is not None:
            raise ValueError("--latency-tokens and --latency-repeats need --measure-latency")
        return None
    chosen = {"tokens": args.latency_tokens, "repeats": args.latency_repeats}
    return TimingSettings(**{k: v for k, v in chosen.items() if v is not None})


def print_latency(record: dict) -> None:
    """The measured against predicted speedup table of a result's ``latency``, to stderr."""
    from ..latency.model_timing import ModelTiming, comparison_rows

    timing = ModelTiming.from_dict(record)

    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    print(f"latency on {timing.device} ({timing.threads} threads, load average {timing.load_average}, medians of "
          f"{timing.repeats}); measured: the whole model; predicted: the compressible Linears only", file=sys.stderr)
    for row in comparison_rows(timing):
        print("  " + ", ".join(f"{name} {cell(value)}" for name, value in row.items()), file=sys.stderr)


def run(args) -> int:
    """Evaluate the plan, print the result as JSON; zero-shot results are also stored with the app's."""
    from ..pipeline import check_decomposition, evaluate_plan
    from ..plan import RankPlan

    tasks = _zero_shot_tasks(args.tasks)  # a missing task YAML fails before the model loads
    latency = latency_settings(args)
    plan = RankPlan.load(args.plan)
    decomposition = check_decomposition(args.decomposition or plan.decomposition)
    plan, calibration = plan_inputs(args, plan)
    protocol = eval_protocol(args)
    with progress_bar(f"evaluate {plan.method} ({decomposition}, {protocol.name} protocol)") as bar:
        result = evaluate_plan(plan, split_names(args.datasets), protocol, decomposition=decomposition,
                               calibration=calibration, tasks=tasks, task_limit=args.task_limit,
                               latency=latency, run=run_from_args(args, bar))
    record = result.to_dict()
    print(json.dumps(record, indent=1))
    if record.get("latency") is not None:
        print_latency(record["latency"])
    if tasks:  # zero-shot runs are long: keep them where the app's results table reads them
        from ..results import ResultStore

        ResultStore().add(result)
        print("zero-shot result stored with the app's results", file=sys.stderr)
    return 0


def _zero_shot_tasks(text: str | None) -> list[str]:
    """--tasks: none, the paper's eight ("paper", or the bare flag), names and/or local task YAML paths."""
    from ..zero_shot import is_local_task, parse_tasks

    if text is None:
        return []
    tasks = parse_tasks(text)
    missing = [t for t in tasks if is_local_task(t) and not Path(t).expanduser().is_file()]
    if missing:
        raise FileNotFoundError(f"task YAML not found: {', '.join(missing)}")
    return tasks
