"""``evaluate-plans``: evaluate several plans of one model, spread over the ranks under torchrun."""
from __future__ import annotations

import json

from .common import add_offload_options, add_plan_options, eval_protocol, plan_inputs, run_from_args, split_names
from .types import positive_int, window_cap

NAME = "evaluate-plans"
HELP = "evaluate several plans (spread over the ranks under torchrun)"  # its line in `-h`


def add_parser(subparsers):
    """The ``evaluate-plans`` subparser, with all its options."""
    sp = subparsers.add_parser(NAME, help=HELP)
    sp.add_argument("--plans", required=True, help="plan files, comma separated (all for one model)")
    sp.add_argument("--datasets", default="wikitext2", help="perplexity datasets, comma separated")
    sp.add_argument("--quick", action="store_true", help="quick protocol: the first 8 windows of 512 tokens")
    sp.add_argument("--seq-len", type=positive_int, default=None, help="override the protocol's window length")
    sp.add_argument("--max-windows", type=window_cap, default=None,
                    help="override the protocol's window cap (a positive number, or 'all')")
    sp.add_argument("--device", default=None,
                    help="cuda / cpu (default: cuda when available; each rank's own GPU under torchrun)")
    add_plan_options(sp)
    sp.add_argument("--decomposition", default=None,
                    help="factorise every plan's ranks with this decomposition instead of each plan's own")
    add_offload_options(sp)
    sp.set_defaults(fn=run)
    return sp


def run(args) -> int:
    """Evaluate the plans; under torchrun they are spread over the ranks, rank 0 prints them all as JSON."""
    from .. import distributed
    from ..multi_eval import evaluate_plans
    from ..plan import RankPlan

    protocol = eval_protocol(args)
    inputs = [plan_inputs(args, RankPlan.load(p)) for p in split_names(args.plans)]
    if not inputs:
        raise ValueError("--plans names no plan file")
    results = evaluate_plans([p for p, _ in inputs], datasets=split_names(args.datasets), protocol=protocol,
                             calibration=inputs[0][1], decomposition=args.decomposition, run=run_from_args(args))
    if distributed.context().main:
        print(json.dumps(results, indent=1))
    return 0
