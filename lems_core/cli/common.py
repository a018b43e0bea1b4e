"""What several commands share: option groups, the run context of the options, the progress bar,
plan inputs, the evaluation protocol, and the exit-2 handling of expected failures.

Nothing heavy is imported at module level (torch, transformers, the pipeline load inside the
functions that need them), so building the parser for ``-h`` stays fast.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

from .types import memory_size

# PlanError, ProfileError and ModelLoadError are ValueErrors
EXPECTED_ERRORS = (ValueError, OSError, KeyError)
EXIT_BAD_INPUT = 2  # argparse's own status for a bad command line: fix the input, then run again
EXIT_DISTRIBUTED = 3  # a rank of a torchrun job died, hung or was unreachable: the input may be fine


def run_reporting_errors(command, args) -> int:
    """``command(args)``'s exit code; an expected failure prints one line instead of a traceback.

    A bad file or value exits ``EXIT_BAD_INPUT``; a failed or timed-out collective of a
    torchrun job (``distributed.DistributedError``) exits ``EXIT_DISTRIBUTED``, so a script
    can tell "fix the input" from "check the other ranks, then retry".
    """
    try:
        return command(args)
    except EXPECTED_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as exc:
        if not _is_distributed_error(exc):
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line: backend causes span several
        return EXIT_DISTRIBUTED


def _is_distributed_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``DistributedError``, without importing torch: only a process that imported
    ``lems_core.distributed`` can raise one."""
    module = sys.modules.get("lems_core.distributed")
    error_class = getattr(module, "DistributedError", None)
    return error_class is not None and isinstance(exc, error_class)


@contextmanager
def progress_bar(desc: str):
    """A tqdm bar driven by (fraction, message) callbacks."""
    from tqdm import tqdm

    with tqdm(total=1000, desc=desc, bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}", file=sys.stderr) as bar:
        def update(fraction: float, message: str) -> None:
            bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
            bar.set_postfix_str(message[-60:], refresh=False)
            bar.refresh()
        yield update


def add_model_options(sp) -> None:
    """--model / --device of the commands that load a model by itself (layers, ppl, profile)."""
    from ..model import DEMO_SOURCE

    sp.add_argument("--model", default=DEMO_SOURCE, help="hub id, local folder, .gguf file, or 'demo' (default)")
    sp.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")


def add_offload_options(sp) -> None:
    """--max-memory / --weights-memory / --offload-folder of profile, evaluate, evaluate-plans and compress."""
    sp.add_argument("--max-memory", type=memory_size, default=None,
                    help="memory for statistics + decomposition, e.g. 24GB (default: what the device has free); "
                         "blocks are processed in windows that fit it, and the dense reference logits of the KL "
                         "wait in CPU RAM or on disk when they do not fit it")
    sp.add_argument("--weights-memory", type=memory_size, default=None,
                    help="load with accelerate: at most this much of the weights on the device (e.g. 20GB), the rest "
                         "in CPU RAM, then in --offload-folder")
    sp.add_argument("--offload-folder", default=None,
                    help="load with accelerate, offloading what fits neither device nor CPU to this folder "
                         "(memory-mapped safetensors)")


def offload_spec(args):
    """The OffloadSpec of --weights-memory / --offload-folder, or None when neither is given."""
    from ..offload import OffloadSpec

    if args.weights_memory is None and not args.offload_folder:
        return None
    return OffloadSpec(args.weights_memory, args.offload_folder)


def run_from_args(args, progress=None):
    """The ``Run`` of a command's parsed options: whichever of --cache-dir, --device, --max-memory,
    --factor-dtype and the offload options the command has (the others keep their defaults), and ``progress``."""
    from ..run import Run

    cache_dir = getattr(args, "cache_dir", None)
    return Run(cache_dir=Path(cache_dir) if cache_dir else None, device=getattr(args, "device", None),
               max_memory=getattr(args, "max_memory", None), factor_dtype=getattr(args, "factor_dtype", "fp32"),
               offload=offload_spec(args) if hasattr(args, "weights_memory") else None, progress=progress)


def add_plan_options(sp) -> None:
    """--model / --calib-dataset / --calib-split of the commands that apply a plan (evaluate, compress)."""
    sp.add_argument("--model", default=None,
                    help="model to apply the plan to (default: the plan's source if it is 'demo' or a hub id; "
                         "a local path in a plan is never opened, pass it here)")
    sp.add_argument("--calib-dataset", default=None,
                    help="calibration corpus (name or file) for the factorisations; default: the plan's dataset name")
    sp.add_argument("--calib-split", default=None,
                    help="split of --calib-dataset, read only with it (default: the plan's split)")


def add_decomposition_option(sp) -> None:
    """--decomposition of evaluate and compress: factorise the plan's ranks with another decomposition."""
    from ..decompositions import decomposition_names

    sp.add_argument("--decomposition", default=None,
                    help=f"factorise the plan's ranks with this decomposition instead of the plan's own: "
                         f"{', '.join(decomposition_names())} "
                         "(saes, erc, lcsvd are computed for the plan's ranks: closed-loop / trained, slower)")


def plan_inputs(args, plan):
    """(plan, calibration) of ``--plan`` with nothing it names opened as given.

    The model comes from ``--model``, else the plan's source when it is ``demo`` or a
    hub id (a local path in a plan is refused: pass it as ``--model``); the
    calibration data from ``--calib-dataset``/``--calib-split``, else the plan's
    dataset *name* (``calibration.untrusted_calibration``: known names only).
    """
    from dataclasses import replace

    from ..calibration import CalibrationConfig, untrusted_calibration
    from ..model import DEMO_SOURCE, looks_like_path

    source = args.model or plan.model_source
    if not args.model and source != DEMO_SOURCE and (looks_like_path(source) or Path(source).expanduser().exists()):
        raise ValueError(f"the plan names its model by a local path ({source!r}); paths in plans are never opened: "
                         f"pass --model {source} to use it")
    stored = plan.meta.get("calibration") or {}
    if args.calib_dataset:
        overrides = {"dataset": args.calib_dataset, **({"split": args.calib_split} if args.calib_split else {})}
        calibration = CalibrationConfig.from_dict({**stored, **overrides})
    else:
        calibration = untrusted_calibration(stored)
    return replace(plan, model_source=source), calibration


def eval_protocol(args):
    """--quick (512 x 8) or the reference protocol (2048 x all), with --seq-len / --max-windows overriding."""
    from dataclasses import replace

    from ..evaluation import QUICK_EVAL, REFERENCE_EVAL

    protocol = QUICK_EVAL if args.quick else REFERENCE_EVAL
    if args.seq_len is not None:
        protocol = replace(protocol, seq_len=args.seq_len)
    if args.max_windows is not None:
        protocol = replace(protocol, max_windows=None if args.max_windows == "all" else args.max_windows)
    return protocol


def split_names(text: str) -> list[str]:
    """A comma-separated list option ("wikitext2,ptb") as its non-empty names; "" is none."""
    return [name for name in text.split(",") if name.strip()]
