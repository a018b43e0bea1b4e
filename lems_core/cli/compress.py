"""``compress``: compress a model with a plan and save it (lems format, or a Hugging Face folder)."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from .common import (add_decomposition_option, add_offload_options, add_plan_options, offload_spec, plan_inputs,
                     progress_bar, run_from_args)

NAME = "compress"
HELP = "compress with a plan and save the low-rank model"  # its line in `-h`


def add_parser(subparsers):
    """The ``compress`` subparser, with all its options."""
    sp = subparsers.add_parser(NAME, help=HELP)
    sp.add_argument("--plan", required=True, help="rank plan file (JSON, from allocate or ars)")
    sp.add_argument("-o", "--output", required=True, help="folder to save the compressed model in")
    sp.add_argument("--force", action="store_true",
                    help="replace an earlier export in the output folder as a whole (never the model's source "
                         "folder, never a folder of other files)")
    add_plan_options(sp)
    sp.add_argument("--format", default="lems", choices=("lems", "hf"),
                    help="lems (default): reload with lems_core.compression.load_compressed; hf: also loads with "
                         "transformers' AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True), with its "
                         "tokenizer, model card and plan")
    sp.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    add_decomposition_option(sp)
    add_offload_options(sp)
    sp.set_defaults(fn=run)
    return sp


def run(args) -> int:
    """Factorise the plan's ranks, swap them into the model and save it to --output."""
    from ..compression import count_parameters, save_compressed
    from ..offload import weights_in_memory
    from ..pipeline import check_decomposition, compressed, plan_factorizations
    from ..plan import RankPlan

    plan = RankPlan.load(args.plan)
    decomposition = check_decomposition(args.decomposition or plan.decomposition)
    plan, cfg = plan_inputs(args, plan)
    _check_output_folder(Path(args.output), plan.model_source, args.force)
    loaded = _load_model_of(plan, args)
    with progress_bar(f"factorise ({decomposition})") as bar:
        factors = plan_factorizations(loaded, cfg, decomposition, plan.ranks(), run=run_from_args(args, bar))
    dense_params = count_parameters(loaded.model)
    with compressed(loaded, plan.ranks(), factors, per_block=False) as applied, weights_in_memory(loaded.model):
        params = count_parameters(loaded.model)
        meta = {"plan": json.loads(plan.to_json()), "decomposition": decomposition, "dense_params": dense_params}
        if args.format == "hf":
            _export_hf(loaded, plan, applied, decomposition, dense_params, args.output, meta, args.force)
        else:
            save_compressed(loaded.model, loaded.tokenizer, applied, args.output, meta=meta, overwrite=args.force)
    print(f"saved {args.output}: {params:,} parameters (dense {dense_params:,}), factorised with {decomposition}"
          + (" (Hugging Face format: load with trust_remote_code=True)" if args.format == "hf" else ""))
    return 0


def _load_model_of(plan, args):
    """Load the plan's model; a PlanError when it is not the model the plan was made for."""
    from ..model import compressible_layers
    from ..pipeline import get_model
    from ..plan import PlanError, check_plan_layers

    loaded = get_model(plan.model_source, args.device, offload_spec(args))
    if plan.fingerprint != loaded.fingerprint:
        raise PlanError(f"plan was made for another model: plan fingerprint {plan.fingerprint!r}, "
                        f"{plan.model_source} loads as {loaded.fingerprint!r}")
    check_plan_layers(plan, compressible_layers(loaded.model))
    return loaded


def _check_output_folder(out: Path, source: str, force: bool) -> None:
    """Refuse to write a compressed model over its source, a file, a non-empty folder without --force, or
    (even with --force, which replaces the whole folder) a folder that is not an earlier export."""
    from ..compression import check_output_folder
    from ..model import resolve_source

    src = None
    with contextlib.suppress(OSError, ValueError):  # a source that does not resolve fails when it is loaded
        src = Path(resolve_source(source)[0]).expanduser().resolve()
    if src is not None and src.is_dir() and out.expanduser().resolve() in (src, *src.parents):
        raise ValueError(f"-o {out} is the model's source folder (or contains it): writing there would overwrite "
                         "the weights being read; choose another folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"-o {out} is not empty; pass --force to replace it (an earlier export only)")
    check_output_folder(out, overwrite=force)


def _export_hf(loaded, plan, applied, decomposition: str, dense_params: int, output: str, meta: dict,
               overwrite: bool) -> None:
    """Write the Hugging Face folder; its model card lists the results stored for this plan."""
    from ..cache import CacheIndexError
    from ..hf_export import card_for, export_hf
    from ..results import ResultStore

    try:
        records = ResultStore().all()
    except CacheIndexError as exc:  # an unreadable index must not stop the export; the card says none were found
        print(f"warning: stored results not read for the model card: {exc}", file=sys.stderr)
        records = []
    card = card_for(loaded.model, plan, decomposition, applied, dense_params, records)
    export_hf(loaded.model, loaded.tokenizer, applied, output, plan.to_dict(), card, meta=meta, overwrite=overwrite)
