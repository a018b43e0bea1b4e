"""Command line: `python -m lems_core <command> ...` (run with -h for each command)."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

from .model import DEMO_SOURCE


MAX_NUMBER_CHARS = 40  # a double holds 17 significant digits: a longer number is a typo or an attack
MAX_COUNT = 2**31 - 1  # counts and sizes (tokens, windows, samples, trials): a C int, beyond any real run
MAX_SEED = 2**32 - 1


def _number_text(text: str) -> str:
    """``text`` stripped; too long to be a number anyone meant (400 nines) is an argparse error."""
    text = str(text).strip()
    if len(text) > MAX_NUMBER_CHARS:
        raise argparse.ArgumentTypeError(f"{text[:20]!r}… ({len(text)} characters) is too long to be a number "
                                         f"(at most {MAX_NUMBER_CHARS})")
    return text


def int_in(low: int, high: int, what: str):
    """argparse type: an integer in [low, high]; ``what`` ("a positive integer") heads the message."""

    def parse(text: str) -> int:
        text = _number_text(text)
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what} in [{low}, {high}], got {value}")
        return value

    parse.__name__ = what
    return parse


# 0 windows, samples or tokens would mean nothing to measure
positive_int = int_in(1, MAX_COUNT, "a positive integer")
seed_int = int_in(0, MAX_SEED, "a seed")


def window_cap(text: str) -> int | str:
    """argparse type of --max-windows: a positive cap, or "all". 0 and negatives are refused:
    a zero cap would measure nothing (it used to print perplexity Infinity)."""
    if str(text).strip().lower() == "all":
        return "all"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or 'all', every window)") from None


def finite_float(text: str) -> float:
    """argparse type: a finite number of at most MAX_NUMBER_CHARS characters (nan / inf are refused)."""
    text = _number_text(text)
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def kept_fraction(text: str) -> float:
    """argparse type: a budget, the kept fraction of the compressible parameters, in (0, 1]."""
    value = finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text.strip()} is not a kept fraction in (0, 1]")
    return value


def kept_fractions(text: str) -> list[float]:
    """argparse type: comma-separated kept fractions ("0.8,0.6"), in the order given; "" is none."""
    return [kept_fraction(token) for token in str(text).split(",") if token.strip()]


def bias_fit_ratios(text: str) -> tuple[float, ...]:
    """argparse type of --bias-fit-ratios: "0.6,0.8" -> (0.6, 0.8), sorted and unique; "" or "none" -> ()."""
    if str(text).strip().lower() in ("", "none"):
        return ()
    return tuple(sorted({round(value, 6) for value in kept_fractions(text)}))


def memory_size(text: str) -> int:
    """argparse type of --max-memory: 24GB, 512MB, 1.5G or bytes (binary units)."""
    from .memory import MemoryBudgetError, parse_bytes

    try:
        return parse_bytes(text)
    except MemoryBudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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


def cmd_layers(args) -> int:
    from .model import compressible_layers
    from .pipeline import get_model

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


def cmd_ppl(args) -> int:
    from .data import evaluation_split, load_text
    from .evaluation import perplexity, token_windows
    from .pipeline import get_model

    loaded = get_model(args.model, args.device)
    for ds in args.datasets.split(","):
        text, origin = load_text(ds, args.split or evaluation_split(ds, args.download), allow_download=args.download)
        windows = token_windows(loaded.tokenizer, text, args.seq_len,
                                None if args.max_windows == "all" else args.max_windows)  # None = all
        with progress_bar(f"ppl {ds}") as bar:
            result = perplexity(loaded.model, windows, progress=bar)
        print(f"{ds} {origin.split} ({origin.origin}): ppl {result.ppl:.3f} over {result.windows} windows "
              f"x {args.seq_len} tokens")
    return 0


def _calibration(args):
    from .calibration import default_preset, preset
    from .model import default_device

    overrides = {k: v for k, v in {"n_samples": args.n_samples, "seq_len": args.seq_len, "seed": args.seed,
                                   "dataset": args.calib_dataset, "split": args.calib_split, "n_search": args.n_search,
                                   "sampling": args.sampling}.items()
                 if v is not None}
    return preset(args.preset or default_preset(args.device or default_device()), **overrides)


def cmd_profile(args) -> int:
    from . import distributed
    from .pipeline import build_profile

    ratios = tuple(args.extra_ratios)
    ctx = distributed.context()  # under torchrun: rank, world, this rank's GPU
    device = args.device or (ctx.device if ctx.world > 1 else None)
    offload = _offload_spec(args)
    if offload:
        from .offload import load_with

        source = load_with(offload, args.model, device)
    else:
        source = args.model
    with (progress_bar(f"profile {args.decomposition}") if ctx.main else contextlib.nullcontext(None)) as bar:
        folder = build_profile(source, args.decomposition, _calibration(args), extra_ratios=ratios,
                               device=device, progress=bar, force=args.force,
                               cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                               max_memory=args.max_memory, factor_dtype=args.factor_dtype,
                               bias_fit_ratios=args.bias_fit_ratios)
    if ctx.main:
        print(folder)
    return 0


def _offload_args(sp) -> None:
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


def _offload_spec(args):
    """The OffloadSpec of --weights-memory / --offload-folder, or None when neither is given."""
    from .offload import OffloadSpec

    if args.weights_memory is None and not args.offload_folder:
        return None
    return OffloadSpec(args.weights_memory, args.offload_folder)


def cmd_allocate(args) -> int:
    from .allocators import MODEL_SCORED, allocate, fit_bias
    from .pipeline import score_function
    from .error_model import ErrorModelParams
    from .plan import plan_from_allocation
    from .profile import Profile

    profile = Profile.load(args.profile)
    method = args.method.replace("-", "_")
    params = _allocate_params(args, profile, method, ErrorModelParams)
    constraints = _constraints(args)
    if args.fit_bias:
        if method not in ("lems", "lems_fixed"):
            raise ValueError("--fit-bias applies to --method lems")
        fit = fit_bias(profile, args.ratio, score_function(profile, "kl", args.device), params, n_trials=args.trials,
                       constraints=constraints)
        params, allocation = fit.params, fit.allocation
        for t in fit.trials:
            print(f"trial {t['trial']}: alpha {t['alpha']:.3f} gamma {t['gamma']:.3f} KL {t['score']:.5f}")
    else:
        score_fn = score_function(profile, MODEL_SCORED[method], args.device) if method in MODEL_SCORED else None
        allocation = allocate(profile, method, args.ratio, params=params, score_fn=score_fn, constraints=constraints)
    plan = plan_from_allocation(profile, allocation, params)
    plan.save(args.output)
    if args.loadconfig:
        Path(args.loadconfig).write_text(json.dumps(plan.to_loadconfig(), indent=1))
    s = plan.summary
    print(f"{method} at {args.ratio}: kept {s['params_kept']:,}/{s['params_total']:,} "
          f"(realised {s['realised_ratio']:.4f}), solve {allocation.solve_seconds * 1000:.1f} ms -> {args.output}")
    if plan.constraints and plan.constraints["exclude"]:
        print(f"excluded layers are outside the budget: {args.ratio} of the others is {plan.budget:.4f} of all layers")
    return 0


def _allocate_params(args, profile, method: str, ErrorModelParams):
    """The error model of ``allocate``: for ``lems`` the bias is the profile's fit (the reference's
    always-on fit), so --alpha/--gamma belong to ``lems_fixed`` (default 0, 5) and other methods."""
    from .allocators import fitted_params

    base = ErrorModelParams(energy_power=args.energy_power, ref_ratio=profile.ref_ratio, use_scale=not args.no_scale)
    given = args.alpha is not None or args.gamma is not None
    if method == "lems" and not args.fit_bias:
        if given:
            raise ValueError("--alpha/--gamma set a fixed bias: use --method lems_fixed (lems uses the bias fitted in "
                             "the profile; --fit-bias refits it on the model at this ratio)")
        found = fitted_params(profile, args.ratio, base)
        if found is not None:
            print(f"lems: bias fitted in the profile at {found[1]:g}: alpha {found[0].alpha:.3f} "
                  f"gamma {found[0].gamma:.3f}", file=sys.stderr)
            return found[0]
        print("lems: the profile has no bias fit; using the fixed default alpha=0, gamma=5 "
              "(rebuild the profile, or pass --fit-bias)", file=sys.stderr)
    from dataclasses import replace

    defaults = ErrorModelParams()
    return replace(base, alpha=defaults.alpha if args.alpha is None else args.alpha,
                   gamma=defaults.gamma if args.gamma is None else args.gamma)


def _constraints(args):
    """LayerConstraints from allocate's --lock-dense/--exclude/--min-kept/--max-kept/--rank-multiple."""
    from .constraints import LayerConstraints, parse_fractions, parse_selectors

    return LayerConstraints(lock_dense=parse_selectors(args.lock_dense), exclude=parse_selectors(args.exclude),
                            min_kept=parse_fractions(args.min_kept), max_kept=parse_fractions(args.max_kept),
                            rank_multiple=args.rank_multiple)


def _plan_inputs(args, plan):
    """(plan, calibration) of ``--plan`` with nothing it names opened as given.

    The model comes from ``--model``, else the plan's source when it is ``demo`` or a
    hub id (a local path in a plan is refused: pass it as ``--model``); the
    calibration data from ``--calib-dataset``/``--calib-split``, else the plan's
    dataset *name* (``calibration.untrusted_calibration``: known names only).
    """
    from dataclasses import replace

    from .calibration import CalibrationConfig, untrusted_calibration
    from .model import DEMO_SOURCE, looks_like_path

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


def _plan_args(sp) -> None:
    """--model / --calib-dataset / --calib-split of evaluate and compress."""
    sp.add_argument("--model", default=None,
                    help="model to apply the plan to (default: the plan's source if it is 'demo' or a hub id; "
                         "a local path in a plan is never opened, pass it here)")
    sp.add_argument("--calib-dataset", default=None,
                    help="calibration corpus (name or file) for the factorisations; default: the plan's dataset name")
    sp.add_argument("--calib-split", default=None)


def cmd_evaluate(args) -> int:
    from .pipeline import check_decomposition, evaluate_plan
    from .plan import RankPlan

    tasks = _zero_shot_tasks(args.tasks)  # a missing task YAML fails before the model loads
    plan = RankPlan.load(args.plan)
    decomposition = check_decomposition(args.decomposition or plan.decomposition)
    plan, calibration = _plan_inputs(args, plan)
    protocol = _eval_protocol(args)
    with progress_bar(f"evaluate {plan.method} ({decomposition}, {protocol.name} protocol)") as bar:
        result = evaluate_plan(plan, [d for d in args.datasets.split(",") if d.strip()], protocol.max_windows,
                               protocol.seq_len, args.device, progress=bar, decomposition=decomposition,
                               calibration=calibration, tasks=tasks, task_limit=args.task_limit,
                               offload=_offload_spec(args), max_memory=args.max_memory)
    print(json.dumps(result.to_dict(), indent=1))
    if tasks:  # zero-shot runs are long: keep them where the app's results table reads them
        from .results import ResultStore

        ResultStore().add(result)
        print("zero-shot result stored with the app's results", file=sys.stderr)
    return 0


def cmd_evaluate_plans(args) -> int:
    """Evaluate several plans; under torchrun the plans are spread over the ranks, rank 0 prints them all."""
    from . import distributed
    from .multi_eval import evaluate_plans
    from .plan import RankPlan

    protocol = _eval_protocol(args)
    offload = _offload_spec(args)
    inputs = [_plan_inputs(args, RankPlan.load(p)) for p in args.plans.split(",") if p.strip()]
    if not inputs:
        raise ValueError("--plans names no plan file")
    results = evaluate_plans([p for p, _ in inputs], datasets=[d for d in args.datasets.split(",") if d.strip()],
                             max_windows=protocol.max_windows, seq_len=protocol.seq_len, device=args.device,
                             calibration=inputs[0][1], decomposition=args.decomposition, offload=offload,
                             max_memory=args.max_memory)
    if distributed.context().main:
        print(json.dumps(results, indent=1))
    return 0


def _zero_shot_tasks(text: str | None) -> list[str]:
    """--tasks: none, the paper's eight ("paper", or the bare flag), names and/or local task YAML paths."""
    from .zero_shot import is_local_task, parse_tasks

    if text is None:
        return []
    tasks = parse_tasks(text)
    missing = [t for t in tasks if is_local_task(t) and not Path(t).expanduser().is_file()]
    if missing:
        raise FileNotFoundError(f"task YAML not found: {', '.join(missing)}")
    return tasks


def _eval_protocol(args):
    """--quick (512 x 8) or the reference protocol (2048 x all), with --seq-len / --max-windows overriding."""
    from dataclasses import replace

    from .evaluation import QUICK_EVAL, REFERENCE_EVAL

    protocol = QUICK_EVAL if args.quick else REFERENCE_EVAL
    if args.seq_len is not None:
        protocol = replace(protocol, seq_len=args.seq_len)
    if args.max_windows is not None:
        protocol = replace(protocol, max_windows=None if args.max_windows == "all" else args.max_windows)
    return protocol


def cmd_compress(args) -> int:
    from .compression import count_parameters, save_compressed
    from .model import compressible_layers
    from .offload import weights_in_memory
    from .pipeline import check_decomposition, compressed, get_model, plan_factorizations
    from .plan import PlanError, RankPlan, check_plan_layers

    plan = RankPlan.load(args.plan)
    decomposition = check_decomposition(args.decomposition or plan.decomposition)
    plan, cfg = _plan_inputs(args, plan)
    _check_output_folder(Path(args.output), plan.model_source, args.force)
    loaded = get_model(plan.model_source, args.device, _offload_spec(args))
    if plan.fingerprint != loaded.fingerprint:
        raise PlanError(f"plan was made for another model: plan fingerprint {plan.fingerprint!r}, "
                        f"{plan.model_source} loads as {loaded.fingerprint!r}")
    check_plan_layers(plan, compressible_layers(loaded.model))
    with progress_bar(f"factorise ({decomposition})") as bar:
        factors = plan_factorizations(loaded, cfg, decomposition, plan.ranks(), progress=bar,
                                      max_memory=args.max_memory)
    dense_params = count_parameters(loaded.model)
    with compressed(loaded, plan.ranks(), factors) as applied, weights_in_memory(loaded.model):
        params = count_parameters(loaded.model)
        meta = {"plan": json.loads(plan.to_json()), "decomposition": decomposition, "dense_params": dense_params}
        if args.format == "hf":
            _export_hf(loaded, plan, applied, decomposition, dense_params, args.output, meta, args.force)
        else:
            save_compressed(loaded.model, loaded.tokenizer, applied, args.output, meta=meta, overwrite=args.force)
    print(f"saved {args.output}: {params:,} parameters (dense {dense_params:,}), factorised with {decomposition}"
          + (" (Hugging Face format: load with trust_remote_code=True)" if args.format == "hf" else ""))
    return 0


def _check_output_folder(out: Path, source: str, force: bool) -> None:
    """Refuse to write a compressed model over its source, a file, a non-empty folder without --force, or
    (even with --force, which replaces the whole folder) a folder that is not an earlier export."""
    from .compression import check_output_folder
    from .model import resolve_source

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
    from .cache import CacheIndexError
    from .hf_export import card_for, export_hf
    from .results import ResultStore

    try:
        records = ResultStore().all()
    except CacheIndexError as exc:  # an unreadable index must not stop the export; the card says none were found
        print(f"warning: stored results not read for the model card: {exc}", file=sys.stderr)
        records = []
    card = card_for(loaded.model, plan, decomposition, applied, dense_params, records)
    export_hf(loaded.model, loaded.tokenizer, applied, output, plan.to_dict(), card, meta=meta, overwrite=overwrite)


def cmd_ars(args) -> int:
    """Train ARS for a profile at each ratio (cached), print the budget bookkeeping, write the plans."""
    from . import pipeline

    ratios = list(args.ratio)
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    plans = pipeline.run_ars_job(args.profile, ratios, args.preset, args.device, cache_dir,
                                 progress=lambda f, m: print(f"\r{100 * f:5.1f}% {m[-70:]:<70}", end="", flush=True))
    print()
    for ratio, doc in zip(ratios, plans):
        s = doc["summary"]
        info = doc["meta"]["ars"]
        print(f"ARS at {ratio:g}: learned {info['learned_ratio']:.4f}, realised {s['realised_ratio']:.4f} "
              f"after {info['repair_cuts']} repair cuts, {info['seconds']:.0f} s")
        if "budget_model" in info:  # the reference rule trains against the whole model's kept fraction
            print(f"  {info.get('rule')} rule: {info['steps_run']} steps{' (early stop)' if info['stopped_early'] else ''}, "
                  f"whole-model target {info['budget_model']:.4f}, realised {info['realised_model_ratio']:.4f}")
        if args.output:
            out = Path(args.output.replace("{ratio}", f"{ratio:g}"))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1))
            print(f"  plan -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .allocators import MODEL_SCORED, allocator_names
    from .allocators.ars import PRESETS as ARS_PRESETS
    from .pipeline import decomposition_names

    decompositions = ", ".join(decomposition_names())
    p = argparse.ArgumentParser(prog="python -m lems_core", description="SVD compression and rank allocation for causal LMs")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", default=DEMO_SOURCE, help="hub id, local folder, .gguf file, or 'demo' (default)")
        sp.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")

    sp = sub.add_parser("layers", help="list the compressible Linears")
    model_args(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_layers)

    sp = sub.add_parser("ppl", help="perplexity of a (dense) model")
    model_args(sp)
    sp.add_argument("--datasets", default="wikitext2")
    sp.add_argument("--split", default=None)
    sp.add_argument("--seq-len", type=positive_int, default=2048)
    sp.add_argument("--max-windows", type=window_cap, default=None)
    sp.add_argument("--download", action="store_true", help="allow fetching datasets from the hub")
    sp.set_defaults(fn=cmd_ppl)

    sp = sub.add_parser("profile", help="build a profile (spectra + sensitivities)")
    model_args(sp)
    sp.add_argument("--decomposition", default="kfac", help=f"one of {decompositions} (default kfac)")
    sp.add_argument("--preset", default=None,
                    help="reference (256 x 2048, 32 search windows) | gpu-small | cpu | cpu-tiny "
                         "(default: reference on CUDA, cpu otherwise)")
    sp.add_argument("--sampling", default=None, choices=("reference", "chars10"),
                    help="calibration offset rule (default reference: randint(0, len - seq_len - 1))")
    for name, typ in [("n-samples", positive_int), ("seq-len", positive_int), ("seed", seed_int),
                      ("n-search", positive_int)]:
        sp.add_argument(f"--{name}", type=typ, default=None)
    sp.add_argument("--calib-dataset", default=None)
    sp.add_argument("--calib-split", default=None)
    sp.add_argument("--extra-ratios", type=kept_fractions, default="", help="extra measured ratios, e.g. 0.4,0.5,0.6,0.7,0.8,0.9")
    sp.add_argument("--bias-fit-ratios", type=bias_fit_ratios, default="0.6,0.8",
                    help="ratios at which the reference LEMS's (alpha, gamma) search runs and is stored in the "
                         "profile (10 seeded trials each, scored by KL on the search windows); 'none' skips it")
    sp.add_argument("--cache-dir", default=None)
    sp.add_argument("--force", action="store_true")
    sp.add_argument("--factor-dtype", default="fp32", choices=("fp32", "fp16"),
                    help="storage of the streamed factors on disk (default fp32)")
    _offload_args(sp)
    sp.set_defaults(fn=cmd_profile)

    sp = sub.add_parser("allocate", help="allocate ranks over a profile and write a rank plan")
    sp.add_argument("--profile", required=True)
    sp.add_argument("--method", default="lems",
                    help=f"one of {', '.join(allocator_names())} (default lems); {', '.join(MODEL_SCORED)} "
                         "score candidates on the model (loads it)")
    sp.add_argument("--ratio", type=kept_fraction, required=True, help="kept fraction of compressible params")
    sp.add_argument("--energy-power", type=int_in(1, 2, "the energy power"), default=2)
    sp.add_argument("--no-scale", action="store_true")
    sp.add_argument("--alpha", type=finite_float, default=None,
                    help="depth-bias alpha of lems_fixed (default 0); lems uses the profile's fitted value")
    sp.add_argument("--gamma", type=finite_float, default=None,
                    help="depth-bias gamma of lems_fixed (default 5); lems uses the profile's fitted value")
    sp.add_argument("--fit-bias", action="store_true", help="fit (alpha, gamma) by seeded search scored by KL (loads the model)")
    sp.add_argument("--trials", type=positive_int, default=10)
    sp.add_argument("--device", default=None)
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--loadconfig", default=None, help="also write the reference {layer: ratio} format here")
    sp.add_argument("--lock-dense", default="", metavar="SELECTORS",
                    help="keep these layers dense, their cost inside the budget: comma-separated block:N, block:A-B, "
                         "kind:K, name:PATTERN (e.g. 'block:0,kind:down')")
    sp.add_argument("--exclude", default="", metavar="SELECTORS",
                    help="leave these layers out of compression and out of the budget (the ratio applies to the rest)")
    sp.add_argument("--min-kept", default="", metavar="KIND=FRAC,...", help="minimum kept fraction r/eq per kind, e.g. q=0.3")
    sp.add_argument("--max-kept", default="", metavar="KIND=FRAC,...",
                    help="maximum kept fraction r/eq per kind (below 1 forbids dense)")
    sp.add_argument("--rank-multiple", type=positive_int, default=None, choices=(1, 8, 16, 32, 64, 128),
                    help="every factorised rank a multiple of this (LEMS: replaces its grid's 8)")
    sp.set_defaults(fn=cmd_allocate)

    sp = sub.add_parser("evaluate", help="compress with a plan and measure perplexity + KL (+ zero-shot accuracy)")
    sp.add_argument("--plan", required=True)
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
    sp.add_argument("--device", default=None)
    _plan_args(sp)
    sp.add_argument("--decomposition", default=None,
                    help=f"factorise the plan's ranks with this decomposition instead of the plan's own: {decompositions} "
                         "(saes, erc, lcsvd are computed for the plan's ranks: closed-loop / trained, slower)")
    _offload_args(sp)
    sp.set_defaults(fn=cmd_evaluate)

    sp = sub.add_parser("evaluate-plans", help="evaluate several plans (spread over the ranks under torchrun)")
    sp.add_argument("--plans", required=True, help="plan files, comma separated (all for one model)")
    sp.add_argument("--datasets", default="wikitext2", help="perplexity datasets, comma separated")
    sp.add_argument("--quick", action="store_true", help="quick protocol: the first 8 windows of 512 tokens")
    sp.add_argument("--seq-len", type=positive_int, default=None)
    sp.add_argument("--max-windows", type=window_cap, default=None)
    sp.add_argument("--device", default=None)
    _plan_args(sp)
    sp.add_argument("--decomposition", default=None)
    _offload_args(sp)
    sp.set_defaults(fn=cmd_evaluate_plans)

    sp = sub.add_parser("compress", help="compress with a plan and save the low-rank model")
    sp.add_argument("--plan", required=True)
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--force", action="store_true",
                    help="replace an earlier export in the output folder as a whole (never the model's source "
                         "folder, never a folder of other files)")
    _plan_args(sp)
    sp.add_argument("--format", default="lems", choices=("lems", "hf"),
                    help="lems (default): reload with lems_core.compression.load_compressed; hf: also loads with "
                         "transformers' AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True), with its "
                         "tokenizer, model card and plan")
    sp.add_argument("--device", default=None)
    sp.add_argument("--decomposition", default=None,
                    help=f"factorise the plan's ranks with this decomposition instead of the plan's own: {decompositions} "
                         "(saes, erc, lcsvd are computed for the plan's ranks: closed-loop / trained, slower)")
    _offload_args(sp)
    sp.set_defaults(fn=cmd_compress)

    sp = sub.add_parser("ars", help="train ARS (learned rank selection) for a profile; results are cached")
    sp.add_argument("--profile", required=True, help="profile folder (contains profile.json)")
    sp.add_argument("--ratio", type=kept_fractions, required=True, help="kept fraction(s), comma separated, e.g. 0.8,0.6")
    sp.add_argument("--preset", default="cpu-small", choices=sorted(ARS_PRESETS),
                    help="cpu-small (default: 101-200 steps, reference rule) | reference (at most 2000 steps) | "
                         "<name>-legacy: the earlier rule (fixed steps, one-sided penalty, compressible only, "
                         "one-way GRU)")
    sp.add_argument("--device", default=None)
    sp.add_argument("--cache-dir", default=None)
    sp.add_argument("-o", "--output", default=None, help="write the plan here ({ratio} is replaced)")
    sp.set_defaults(fn=cmd_ars)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError, KeyError) as exc:  # PlanError, ProfileError, ModelLoadError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
