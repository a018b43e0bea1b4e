"""``layers``: list the compressible Linears of a model."""
from __future__ import annotations

import json

from .common import add_model_options

NAME = "layers"
HELP = "list the compressible Linears"  # its line in `-h`


def add_parser(subparsers):
    """The ``layers`` subparser, with all its options."""
    sp = subparsers.add_parser(NAME, help=HELP)
    add_model_options(sp)
    sp.add_argument("--json", action="store_true", help="print the fingerprint and the layers as JSON")
    sp.set_defaults(fn=run)
    return sp


def run(args) -> int:
    """Load the model and print its compressible Linears (a table, or JSON with --json)."""
    from ..model import compressible_layers
    from ..pipeline import get_model

    loaded = get_model(args.model, args.device)
    layers = compressible_layers(loaded.model)
    if args.json:
        print(json.dumps({"fingerprint": loaded.fingerprint, "layers": [l.to_dict() for l in layers]}, indent=1))
        return 0
    print(f"{loaded.source}  fingerprint {loaded.fingerprint}  {len(layers)} compressible Linears")
    print(f"{'name':<40} {'block':>5} {'kind':>5} {'out':>6} {'in':>6} {'eq rank':>8}")
    for l in layers:
        print(f"{l.name:<40} {l.block:5d} {l.kind:>5} {l.out_features:6d} {l.in_features:6d} {l.eq_rank:8d}")
    print(f"total params in compressible Linears: {sum(l.params for l in layers):,}")
    return 0
