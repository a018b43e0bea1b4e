"""Command line: `python -m lems_core <command> ...` (run with -h for each command)."""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from .model import DEMO_SOURCE


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
    from .data import load_text
    from .evaluation import perplexity, token_windows
    from .pipeline import get_model

    loaded = get_model(args.model, args.device)
    for ds in args.datasets.split(","):
        text, origin = load_text(ds, args.split or ("validation" if ds == "ptb" else "test"), allow_download=args.download)
        windows = token_windows(loaded.tokenizer, text, args.seq_len, args.max_windows)
        with progress_bar(f"ppl {ds}") as bar:
            result = perplexity(loaded.model, windows, progress=bar)
        print(f"{ds} ({origin.origin}): ppl {result.ppl:.3f} over {result.windows} windows x {args.seq_len} tokens")
    return 0


def _calibration(args):
    from .calibration import preset

    overrides = {k: v for k, v in {"n_samples": args.n_samples, "seq_len": args.seq_len, "seed": args.seed,
                                   "dataset": args.calib_dataset, "split": args.calib_split, "n_search": args.n_search}.items()
                 if v is not None}
    return preset(args.preset, **overrides)


def cmd_profile(args) -> int:
    from .pipeline import build_profile

    ratios = tuple(float(x) for x in args.extra_ratios.split(",")) if args.extra_ratios else ()
    with progress_bar(f"profile {args.decomposition}") as bar:
        folder = build_profile(args.model, args.decomposition, _calibration(args), extra_ratios=ratios,
                               device=args.device, progress=bar, force=args.force,
                               cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    print(folder)
    return 0


def cmd_allocate(args) -> int:
    from .allocators import MODEL_SCORED, allocate, fit_bias
    from .pipeline import score_function
    from .error_model import ErrorModelParams
    from .plan import plan_from_allocation
    from .profile import Profile

    profile = Profile.load(args.profile)
    params = ErrorModelParams(energy_power=args.energy_power, ref_ratio=profile.ref_ratio, use_scale=not args.no_scale,
                              alpha=args.alpha, gamma=args.gamma)
    method = args.method.replace("-", "_")
    if args.fit_bias:
        if method != "lems":
            raise ValueError("--fit-bias applies to --method lems")
        fit = fit_bias(profile, args.ratio, score_function(profile, "kl", args.device), params, n_trials=args.trials)
        params, allocation = fit.params, fit.allocation
        for t in fit.trials:
            print(f"trial {t['trial']}: alpha {t['alpha']:.3f} gamma {t['gamma']:.3f} KL {t['score']:.5f}")
    else:
        score_fn = score_function(profile, MODEL_SCORED[method], args.device) if method in MODEL_SCORED else None
        allocation = allocate(profile, method, args.ratio, params=params, score_fn=score_fn)
    plan = plan_from_allocation(profile, allocation, params)
    plan.save(args.output)
    if args.loadconfig:
        Path(args.loadconfig).write_text(json.dumps(plan.to_loadconfig(), indent=1))
    s = plan.summary
    print(f"{method} at {args.ratio}: kept {s['params_kept']:,}/{s['params_total']:,} "
          f"(realised {s['realised_ratio']:.4f}), solve {allocation.solve_seconds * 1000:.1f} ms -> {args.output}")
    return 0


def cmd_evaluate(args) -> int:
    from .pipeline import check_decomposition, evaluate_plan
    from .plan import RankPlan

    plan = RankPlan.load(args.plan)
    decomposition = check_decomposition(args.decomposition or plan.decomposition)
    with progress_bar(f"evaluate {plan.method} ({decomposition})") as bar:
        result = evaluate_plan(plan, args.datasets.split(","), args.max_windows, args.seq_len, args.device, progress=bar,
                               decomposition=decomposition)
    print(json.dumps(result.to_dict(), indent=1))
    return 0


def cmd_compress(args) -> int:
    from .compression import count_parameters, save_compressed
    from .pipeline import check_decomposition, compressed, get_model, plan_factorizations
    from .calibration import CalibrationConfig
    from .plan import RankPlan

    plan = RankPlan.load(args.plan)
    decomposition = check_decomposition(args.decomposition or plan.decomposition)
    loaded = get_model(plan.model_source, args.device)
    plan = RankPlan.load(args.plan, layers=None, fingerprint=loaded.fingerprint)
    cfg = CalibrationConfig.from_dict(plan.meta.get("calibration") or {})
    with progress_bar(f"factorise ({decomposition})") as bar:
        factors = plan_factorizations(loaded, cfg, decomposition, plan.ranks(), progress=bar)
    dense_params = count_parameters(loaded.model)
    with compressed(loaded, plan.ranks(), factors) as applied:
        params = count_parameters(loaded.model)
        save_compressed(loaded.model, loaded.tokenizer, applied, args.output,
                        meta={"plan": json.loads(plan.to_json()), "decomposition": decomposition,
                              "dense_params": dense_params})
    print(f"saved {args.output}: {params:,} parameters (dense {dense_params:,}), factorised with {decomposition}")
    return 0


def cmd_ars(args) -> int:
    """Train ARS for a profile at each ratio (cached), print the budget bookkeeping, write the plans."""
    from . import pipeline

    ratios = [float(x) for x in str(args.ratio).split(",") if x.strip()]
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    plans = pipeline.run_ars_job(args.profile, ratios, args.preset, args.device, cache_dir,
                                 progress=lambda f, m: print(f"\r{100 * f:5.1f}% {m[-70:]:<70}", end="", flush=True))
    print()
    for ratio, doc in zip(ratios, plans):
        s = doc["summary"]
        info = doc["meta"]["ars"]
        print(f"ARS at {ratio:g}: learned {info['learned_ratio']:.4f}, realised {s['realised_ratio']:.4f} "
              f"after {info['repair_cuts']} repair cuts, {info['seconds']:.0f} s")
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
    sp.add_argument("--seq-len", type=int, default=2048)
    sp.add_argument("--max-windows", type=int, default=None)
    sp.add_argument("--download", action="store_true", help="allow fetching datasets from the hub")
    sp.set_defaults(fn=cmd_ppl)

    sp = sub.add_parser("profile", help="build a profile (spectra + sensitivities)")
    model_args(sp)
    sp.add_argument("--decomposition", default="kfac", help=f"one of {decompositions} (default kfac)")
    sp.add_argument("--preset", default="cpu", help="reference | gpu-small | cpu | cpu-tiny")
    for name, typ in [("n-samples", int), ("seq-len", int), ("seed", int), ("n-search", int)]:
        sp.add_argument(f"--{name}", type=typ, default=None)
    sp.add_argument("--calib-dataset", default=None)
    sp.add_argument("--calib-split", default=None)
    sp.add_argument("--extra-ratios", default="", help="extra measured ratios, e.g. 0.4,0.5,0.6,0.7,0.8,0.9")
    sp.add_argument("--cache-dir", default=None)
    sp.add_argument("--force", action="store_true")
    sp.set_defaults(fn=cmd_profile)

    sp = sub.add_parser("allocate", help="allocate ranks over a profile and write a rank plan")
    sp.add_argument("--profile", required=True)
    sp.add_argument("--method", default="lems",
                    help=f"one of {', '.join(allocator_names())} (default lems); {', '.join(MODEL_SCORED)} "
                         "score candidates on the model (loads it)")
    sp.add_argument("--ratio", type=float, required=True, help="kept fraction of compressible params")
    sp.add_argument("--energy-power", type=int, default=2)
    sp.add_argument("--no-scale", action="store_true")
    sp.add_argument("--alpha", type=float, default=0.0)
    sp.add_argument("--gamma", type=float, default=5.0)
    sp.add_argument("--fit-bias", action="store_true", help="fit (alpha, gamma) by seeded search scored by KL (loads the model)")
    sp.add_argument("--trials", type=int, default=10)
    sp.add_argument("--device", default=None)
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--loadconfig", default=None, help="also write the reference {layer: ratio} format here")
    sp.set_defaults(fn=cmd_allocate)

    sp = sub.add_parser("evaluate", help="compress with a plan and measure perplexity + KL")
    sp.add_argument("--plan", required=True)
    sp.add_argument("--datasets", default="wikitext2")
    sp.add_argument("--seq-len", type=int, default=512)
    sp.add_argument("--max-windows", type=int, default=16)
    sp.add_argument("--device", default=None)
    sp.add_argument("--decomposition", default=None,
                    help=f"factorise the plan's ranks with this decomposition instead of the plan's own: {decompositions} "
                         "(saes, erc, lcsvd are computed for the plan's ranks: closed-loop / trained, slower)")
    sp.set_defaults(fn=cmd_evaluate)

    sp = sub.add_parser("compress", help="compress with a plan and save the low-rank model")
    sp.add_argument("--plan", required=True)
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--device", default=None)
    sp.add_argument("--decomposition", default=None,
                    help=f"factorise the plan's ranks with this decomposition instead of the plan's own: {decompositions} "
                         "(saes, erc, lcsvd are computed for the plan's ranks: closed-loop / trained, slower)")
    sp.set_defaults(fn=cmd_compress)

    sp = sub.add_parser("ars", help="train ARS (learned rank selection) for a profile; results are cached")
    sp.add_argument("--profile", required=True, help="profile folder (contains profile.json)")
    sp.add_argument("--ratio", required=True, help="kept fraction(s), comma separated, e.g. 0.8,0.6")
    sp.add_argument("--preset", default="cpu-small", choices=sorted(ARS_PRESETS))
    sp.add_argument("--device", default=None)
    sp.add_argument("--cache-dir", default=None)
    sp.add_argument("-o", "--output", default=None, help="write the plan here ({ratio} is replaced)")
    sp.set_defaults(fn=cmd_ars)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
