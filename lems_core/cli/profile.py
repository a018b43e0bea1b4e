"""``profile``: build a profile (spectra + sensitivities) of a model."""
from __future__ import annotations

import contextlib

from .common import add_model_options, add_offload_options, offload_spec, progress_bar, run_from_args
from .types import bias_fit_ratios, kept_fractions, positive_int, seed_int

NAME = "profile"
HELP = "build a profile (spectra + sensitivities)"  # its line in `-h`


def add_parser(subparsers):
    """The ``profile`` subparser, with all its options."""
    from ..decompositions import decomposition_names

    sp = subparsers.add_parser(NAME, help=HELP)
    add_model_options(sp)
    sp.add_argument("--decomposition", default="kfac",
                    help=f"one of {', '.join(decomposition_names())} (default kfac)")
    _add_calibration_options(sp)
    sp.add_argument("--extra-ratios", type=kept_fractions, default="", help="extra measured ratios, e.g. 0.4,0.5,0.6,0.7,0.8,0.9")
    sp.add_argument("--bias-fit-ratios", type=bias_fit_ratios, default="0.6,0.8",
                    help="ratios at which the reference LEMS's (alpha, gamma) search runs and is stored in the "
                         "profile (10 seeded trials each, scored by KL on the search windows); 'none' skips it")
    sp.add_argument("--cache-dir", default=None, help="cache folder (default ./cache, or $LEMS_CACHE_DIR)")
    sp.add_argument("--force", action="store_true", help="recompute the profile even when the cache holds it")
    sp.add_argument("--factor-dtype", default="fp32", choices=("fp32", "fp16"),
                    help="storage of the streamed factors on disk (default fp32)")
    add_offload_options(sp)
    sp.set_defaults(fn=run)
    return sp


def _add_calibration_options(sp) -> None:
    """--preset, --sampling and the calibration sizes and data that override the preset's."""
    sp.add_argument("--preset", default=None,
                    help="reference (256 x 2048, 32 search windows) | gpu-small | cpu | cpu-tiny "
                         "(default: reference on CUDA, cpu otherwise)")
    sp.add_argument("--sampling", default=None, choices=("reference", "chars10"),
                    help="calibration offset rule (default reference: randint(0, len - seq_len - 1))")
    sp.add_argument("--n-samples", type=positive_int, default=None,
                    help="calibration windows (default: the preset's)")
    sp.add_argument("--seq-len", type=positive_int, default=None,
                    help="tokens per calibration window (default: the preset's)")
    sp.add_argument("--seed", type=seed_int, default=None, help="seed of the calibration windows (default 42)")
    sp.add_argument("--n-search", type=positive_int, default=None,
                    help="search windows, scoring sensitivities and the KL (default: the preset's)")
    sp.add_argument("--calib-dataset", default=None,
                    help="calibration corpus, a known name or a text file (default wikitext2)")
    sp.add_argument("--calib-split", default=None,
                    help="split of the calibration corpus (default: validation; WikiText-2's train when a local "
                         "copy exists)")


def _calibration(args):
    """The CalibrationConfig of --preset with the options given overriding it."""
    from ..calibration import default_preset, preset
    from ..model import default_device

    overrides = {k: v for k, v in {"n_samples": args.n_samples, "seq_len": args.seq_len, "seed": args.seed,
                                   "dataset": args.calib_dataset, "split": args.calib_split, "n_search": args.n_search,
                                   "sampling": args.sampling}.items()
                 if v is not None}
    return preset(args.preset or default_preset(args.device or default_device()), **overrides)


def run(args) -> int:
    """Build (or reuse) the profile; rank 0 prints its folder (under torchrun every rank works)."""
    from .. import distributed
    from ..pipeline import ProfileSettings, build_profile

    ratios = tuple(args.extra_ratios)
    ctx = distributed.context()  # under torchrun: rank, world, this rank's GPU
    device = args.device or (ctx.device if ctx.world > 1 else None)
    offload = offload_spec(args)
    if offload:
        from ..offload import load_with

        source = load_with(offload, args.model, device)
    else:
        source = args.model
    with (progress_bar(f"profile {args.decomposition}") if ctx.main else contextlib.nullcontext(None)) as bar:
        settings = ProfileSettings(extra_ratios=ratios, bias_fit_ratios=args.bias_fit_ratios)
        folder = build_profile(source, args.decomposition, _calibration(args), settings, force=args.force,
                               run=run_from_args(args, bar).but(device=device))
    if ctx.main:
        print(folder)
    return 0
