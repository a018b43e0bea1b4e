"""``heal``: recovery fine-tuning of a compressed model folder on calibration text.

LoRA adapters on the factor Linears, merged back into the factors (or the factors trained
themselves, ``--mode factors``); the healed model keeps the folder's ranks and is saved in
the lems format and, with ``--hf-output``, as a Hugging Face folder (``lems_core.recovery``).
"""
from __future__ import annotations

from pathlib import Path

from .common import progress_bar, split_names
from .types import MAX_COUNT, finite_float, int_in, positive_int, seed_int

NAME = "heal"
HELP = "fine-tune a compressed model's factors on calibration text (recovery)"  # its line in `-h`
non_negative_int = int_in(0, MAX_COUNT, "a non-negative integer")


def add_parser(subparsers):
    """The ``heal`` subparser, with all its options."""
    sp = subparsers.add_parser(NAME, help=HELP)
    sp.add_argument("--model", required=True, help="compressed model folder (written by compress, either format)")
    sp.add_argument("-o", "--output", required=True, help="folder for the healed model (lems format)")
    sp.add_argument("--hf-output", default=None,
                    help="also write a Hugging Face folder (remote code; the adapters merged into the factors)")
    sp.add_argument("--force", action="store_true", help="replace earlier exports in the output folders as a whole")
    sp.add_argument("--mode", choices=("lora", "factors"), default="lora",
                    help="lora (default): LoRA adapters on the factor Linears, merged afterwards; factors: train "
                         "the factor weights themselves")
    sp.add_argument("--steps", type=positive_int, default=100, help="optimiser steps (default 100)")
    sp.add_argument("--lr", type=finite_float, default=None,
                    help="peak learning rate (default: 2e-4 for lora, 2e-5 for factors)")
    sp.add_argument("--warmup", type=non_negative_int, default=10,
                    help="linear warm-up steps before the cosine decay (default 10)")
    sp.add_argument("--seq-len", type=positive_int, default=512, help="tokens per training window (default 512)")
    sp.add_argument("--batch", type=positive_int, default=1, help="windows per step (default 1)")
    sp.add_argument("--lora-rank", type=positive_int, default=8, help="rank of each LoRA adapter (default 8)")
    sp.add_argument("--seed", type=seed_int, default=0, help="seed of the windows and the adapters (default 0)")
    sp.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute the blocks' activations in the backward pass (less memory, more time)")
    sp.add_argument("--no-autocast", action="store_true", help="keep float32 matmuls on CUDA (default: bf16 autocast)")
    sp.add_argument("--calib-dataset", default=None,
                    help="training text, a corpus name or file (default: the plan's calibration dataset, else wikitext2)")
    sp.add_argument("--calib-split", default=None,
                    help="its split (default: the plan's calibration split, else train when local, else validation)")
    sp.add_argument("--eval-datasets", type=split_names, default=["wikitext2"],
                    help="comma-separated datasets the healed model will be evaluated on: their evaluation split is "
                         "never trained on (default wikitext2)")
    sp.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    sp.set_defaults(fn=run)
    return sp


def run(args) -> int:
    """Load the folder in float32, heal it, save the healed model."""
    import torch

    from ..compression import load_compressed
    from ..model import check_device, default_device
    from ..recovery import HFTarget, recover, save_healed
    from ..run import Run

    _check_outputs(args)
    device = check_device(args.device or default_device())
    model, tokenizer, ranks, meta = load_compressed(args.model, device=device, dtype=torch.float32)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files: the training text cannot be tokenised")
    config = _config(args, meta)
    hf_parts = _hf_parts(model, ranks, meta) if args.hf_output else {}
    with progress_bar(f"heal ({config.mode})") as bar:
        result = recover(model, tokenizer, config, Run(device=device, progress=bar), tuple(args.eval_datasets))
    hf = HFTarget(args.hf_output, **hf_parts) if args.hf_output else None
    save_healed(model, tokenizer, ranks, result, args.output, hf, meta=meta, overwrite=args.force)
    record = result.record()
    print(f"healed {args.model} ({config.mode}, {result.steps} steps x {config.batch_size} x {config.seq_len} tokens "
          f"of {config.dataset}/{config.split}, {result.seconds:.0f} s): loss {record['loss_first']:.3f} -> "
          f"{record['loss_last']:.3f}; saved {args.output}" + (f" and {args.hf_output}" if args.hf_output else ""))
    return 0


def _check_outputs(args) -> None:
    """Refuse an output that is the input folder or holds it, two outputs in one folder, or what compress refuses."""
    from ..compression import check_output_folder

    source = Path(args.model).expanduser().resolve()
    outputs = [(flag, out) for flag, out in (("-o", args.output), ("--hf-output", args.hf_output)) if out is not None]
    for flag, out in outputs:
        if Path(out).expanduser().resolve() in (source, *source.parents):
            raise ValueError(f"{flag} {out} is the model folder being healed (or holds it): choose another folder")
        check_output_folder(out, overwrite=args.force)
    if len({Path(out).expanduser().resolve() for _, out in outputs}) < len(outputs):
        raise ValueError("-o and --hf-output name the same folder: give each format its own")


def _config(args, meta: dict):
    """The RecoveryConfig of the options; the training text defaults to the plan's calibration split."""
    from ..recovery import RecoveryConfig

    dataset, split = _training_text(args, meta)
    return RecoveryConfig(mode=args.mode, steps=args.steps, lr=args.lr, warmup_steps=args.warmup,
                          batch_size=args.batch, seq_len=args.seq_len, lora_rank=args.lora_rank,
                          lora_alpha=2.0 * args.lora_rank, gradient_checkpointing=args.gradient_checkpointing,
                          bf16_autocast=not args.no_autocast, seed=args.seed, dataset=dataset, split=split)


def _training_text(args, meta: dict) -> tuple[str, str]:
    """(dataset, split): the options, else the recorded plan's calibration (by corpus name only), else WikiText-2."""
    from ..calibration import untrusted_calibration
    from ..data import has_local

    recorded = ((meta.get("plan") or {}).get("meta") or {}).get("calibration") if isinstance(meta, dict) else None
    dataset, split = "wikitext2", "train" if has_local("wikitext2", "train") else "validation"
    if isinstance(recorded, dict) and args.calib_dataset is None:
        calibration = untrusted_calibration(recorded)
        dataset, split = calibration.dataset, calibration.split
    return args.calib_dataset or dataset, args.calib_split or split


def _hf_parts(model, ranks: dict, meta: dict) -> dict:
    """The plan document and model card a Hugging Face export needs, from the plan compress recorded."""
    import json

    from ..hf_export import card_for
    from ..plan import RankPlan

    plan_doc = meta.get("plan") if isinstance(meta, dict) else None
    if not isinstance(plan_doc, dict):
        raise ValueError("--hf-output needs the plan the folder was compressed with (ranks.json meta.plan); "
                         "this folder has none: heal it to -o only")
    plan = RankPlan.from_json(json.dumps(plan_doc))
    decomposition = str(meta.get("decomposition") or plan.decomposition)
    dense_params = int(meta.get("dense_params") or 0)
    card = card_for(model, plan, decomposition, ranks, dense_params, records=())
    return {"plan_doc": plan_doc, "card": card}
