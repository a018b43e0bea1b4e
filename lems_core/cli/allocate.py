"""``allocate``: allocate ranks over a profile under a budget and write a rank plan."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import run_from_args
from .types import finite_float, kept_fraction, positive_int

NAME = "allocate"
HELP = "allocate ranks over a profile and write a rank plan"  # its line in `-h`


def add_parser(subparsers):
    """The ``allocate`` subparser, with all its options."""
    from ..allocators import MODEL_SCORED, allocator_names

    sp = subparsers.add_parser(NAME, help=HELP)
    sp.add_argument("--profile", required=True, help="profile folder (contains profile.json)")
    sp.add_argument("--method", default="lems",
                    help=f"one of {', '.join(allocator_names())} (default lems); {', '.join(MODEL_SCORED)} "
                         "score candidates on the model (loads it)")
    sp.add_argument("--ratio", type=kept_fraction, required=True,
                    help="kept fraction of compressible params (with --cost latency: of their dense latency)")
    _add_error_model_options(sp)
    sp.add_argument("--device", default=None,
                    help="cuda / cpu for the methods that load the model (default: cuda when available)")
    sp.add_argument("-o", "--output", required=True, help="write the rank plan (JSON) here")
    sp.add_argument("--loadconfig", default=None, help="also write the reference {layer: ratio} format here")
    _add_constraint_options(sp)
    _add_cost_options(sp)
    sp.set_defaults(fn=run)
    return sp


def _add_error_model_options(sp) -> None:
    """The error model's energy power, scale and depth bias, and the bias fit."""
    sp.add_argument("--energy-power", type=positive_int, choices=(1, 2), default=2,
                    help="error model energy of the dropped singular values: 2 sums sigma^2 (default), 1 sigma")
    sp.add_argument("--no-scale", action="store_true",
                    help="do not multiply each layer's error by its measured KL at the reference rank")
    sp.add_argument("--alpha", type=finite_float, default=None,
                    help="depth-bias alpha of lems_fixed (default 0); lems uses the profile's fitted value")
    sp.add_argument("--gamma", type=finite_float, default=None,
                    help="depth-bias gamma of lems_fixed (default 5); lems uses the profile's fitted value")
    sp.add_argument("--fit-bias", action="store_true", help="fit (alpha, gamma) by seeded search scored by KL (loads the model)")
    sp.add_argument("--trials", type=positive_int, default=10, help="trials of the --fit-bias search (default 10)")


def _add_constraint_options(sp) -> None:
    """--lock-dense / --exclude / --min-kept / --max-kept / --rank-multiple."""
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


def _add_cost_options(sp) -> None:
    """--cost / --workload / --device-profile: allocate under a measured latency budget (docs/latency.md)."""
    sp.add_argument("--cost", choices=("params", "latency"), default="params",
                    help="what the budget counts: params (default, r(m+n) per layer) or latency (measured time of "
                         "each layer's option in --workload; lems, lems_fixed, lems_mp exactly; uniform, svdllm_v2, "
                         "mrcs by a search of their parameter ratio; other methods refuse)")
    sp.add_argument("--workload", choices=("prefill", "decode"), default=None,
                    help="the latency that counts: decode (batch 1, one token; the default when measuring) or "
                         "prefill (batch 1, 256 tokens); with --device-profile it must match the profile's")
    sp.add_argument("--device-profile", default=None, metavar="FILE",
                    help="measured layer times (JSON, schema lems-device-profile/1); default: measured here on "
                         "--device (about a minute on a CPU) and cached under the cache folder. With --cost params "
                         "it only reports the plan's predicted latency")


def _latency_cost(args, profile):
    """The latency cost of --cost latency / --device-profile, or None (parameters only)."""
    if args.cost == "params" and args.device_profile is None:
        return None
    from ..allocators.latency_budget import UnsupportedCostError
    from ..allocators.registry import latency_methods, normalise_method
    from ..latency import Workload, latency_cost

    if args.cost == "latency" and normalise_method(args.method) not in latency_methods():
        raise UnsupportedCostError(f"{normalise_method(args.method)} allocates under a parameter budget only; "
                                   f"--cost latency is supported by {', '.join(latency_methods())}")

    workload = Workload.named(args.workload) if args.workload else None
    if args.device_profile is not None:
        return latency_cost(profile.layers, workload, args.device_profile)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workload = workload or Workload.named("decode")
    print(f"latency: the {workload.describe()} device profile of {device} (measured once, then cached)",
          file=sys.stderr)
    return latency_cost(profile.layers, workload, device=device)


def _report_latency(cost, profile, allocation, args) -> None:
    """The plan's predicted latency next to its parameter ratio."""
    predicted = cost.fraction(profile.layers, allocation.ranks)
    target = f" (budget {args.ratio})" if args.cost == "latency" else ""
    print(f"predicted {cost.workload.describe()} latency of the compressible Linears: {predicted:.4f} of dense"
          f"{target}, device profile {cost.device_profile.profile_id} ({cost.device_profile.key.device})")


def run(args) -> int:
    """Allocate, save the plan (and the reference loadconfig), print the budget bookkeeping."""
    from ..allocators import MODEL_SCORED, allocate, fit_bias
    from ..pipeline import score_function
    from ..plan import plan_from_allocation
    from ..profile import Profile

    profile = Profile.load(args.profile)
    method = args.method.replace("-", "_")
    params = _error_model_params(args, profile, method)
    constraints = _constraints(args)
    cost = _latency_cost(args, profile)
    under = {"cost_model": cost} if args.cost == "latency" else {}
    if args.fit_bias:
        if method not in ("lems", "lems_fixed"):
            raise ValueError("--fit-bias applies to --method lems")
        fit = fit_bias(profile, args.ratio, score_function(profile, "kl", run=run_from_args(args)), params,
                       n_trials=args.trials, constraints=constraints, **under)
        params, allocation = fit.params, fit.allocation
        for t in fit.trials:
            print(f"trial {t['trial']}: alpha {t['alpha']:.3f} gamma {t['gamma']:.3f} KL {t['score']:.5f}")
    else:
        scored = MODEL_SCORED.get(method)
        score_fn = score_function(profile, scored, run=run_from_args(args)) if scored else None
        allocation = allocate(profile, method, args.ratio, params=params, score_fn=score_fn, constraints=constraints,
                              cost=cost if args.cost == "latency" else "params")
    plan = plan_from_allocation(profile, allocation, params)
    plan.save(args.output)
    if args.loadconfig:
        Path(args.loadconfig).write_text(json.dumps(plan.to_loadconfig(), indent=1))
    s = plan.summary
    print(f"{method} at {args.ratio}: kept {s['params_kept']:,}/{s['params_total']:,} "
          f"(realised {s['realised_ratio']:.4f}), solve {allocation.solve_seconds * 1000:.1f} ms -> {args.output}")
    if cost is not None:
        _report_latency(cost, profile, allocation, args)
    if plan.constraints and plan.constraints["exclude"]:
        print(f"excluded layers are outside the budget: {args.ratio} of the others is {plan.budget:.4f} of all layers")
    return 0


def _error_model_params(args, profile, method: str):
    """The error model of ``allocate``: for ``lems`` the bias is the profile's fit (the reference's
    always-on fit), so --alpha/--gamma belong to ``lems_fixed`` (default 0, 5) and other methods."""
    from dataclasses import replace

    from ..allocators import fitted_params
    from ..error_model import ErrorModelParams

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
    defaults = ErrorModelParams()
    return replace(base, alpha=defaults.alpha if args.alpha is None else args.alpha,
                   gamma=defaults.gamma if args.gamma is None else args.gamma)


def _constraints(args):
    """LayerConstraints from --lock-dense/--exclude/--min-kept/--max-kept/--rank-multiple."""
    from ..constraints import LayerConstraints, parse_fractions, parse_selectors

    return LayerConstraints(lock_dense=parse_selectors(args.lock_dense), exclude=parse_selectors(args.exclude),
                            min_kept=parse_fractions(args.min_kept), max_kept=parse_fractions(args.max_kept),
                            rank_multiple=args.rank_multiple)
