"""Recovery on the demo model: WikiText-2 test perplexity and KL to the dense model, before and after healing.

The plan is compressed with the KFAC demo profile's factors, measured (perplexity on the
first ``--windows`` x ``--eval-seq-len`` tokens of WikiText-2 *test* and PTB validation,
KL(dense || compressed) at temperature 0.6 on the WikiText-2 windows), healed with ``lems_core.recovery`` on the profile's
calibration split (WikiText-2 validation here; the test split is refused) and measured again.

    python -m studies.recovery_demo --plan /tmp/lems08.json --steps 100 [--out studies/results/recovery_lems08.json]
    python -m studies.recovery_demo --uniform 0.6 --steps 100
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lems_core.cache import DEMO_DIR
from lems_core.calibration import CalibrationConfig
from lems_core.compression import compress_model
from lems_core.data import evaluation_split, load_text
from lems_core.evaluation import kl_to_reference, model_logits, perplexity, token_windows
from lems_core.profile import Profile
from lems_core.recovery import RecoveryConfig, recover
from lems_core.run import Run


def plan_ranks(args, profile: Profile) -> tuple[str, dict]:
    """(label, ranks) of the plan file or of a uniform allocation at ``--uniform``."""
    if args.plan:
        from lems_core.plan import RankPlan

        plan = RankPlan.load(args.plan)
        return f"{plan.method} {plan.budget:g}", plan.ranks()
    from lems_core.allocators import allocate

    return f"uniform {args.uniform:g}", allocate(profile, "uniform", args.uniform).ranks


def measure(model, windows: dict[str, torch.Tensor], reference) -> dict:
    """Perplexity on every dataset's windows and KL to the dense model on the first dataset's."""
    started = time.perf_counter()
    ppl = {ds: round(perplexity(model, ids).ppl, 3) for ds, ids in windows.items()}
    kl = kl_to_reference(model, next(iter(windows.values())), reference)
    return {"ppl": ppl, "kl": round(kl, 5), "seconds": round(time.perf_counter() - started, 1)}


def evaluation_windows(tokenizer, datasets: list[str], seq_len: int, count: int) -> dict[str, torch.Tensor]:
    """The quick protocol's windows of each dataset's evaluation split (PTB: validation, as shipped)."""
    return {ds: token_windows(tokenizer, load_text(ds, evaluation_split(ds))[0], seq_len, count) for ds in datasets}


def run(args) -> dict:
    from lems_core.pipeline import get_model, plan_factorizations

    loaded = get_model("demo", "cpu")
    profile = Profile.load(DEMO_DIR / "smollm2-135m-kfac")
    cfg = CalibrationConfig.from_dict(profile.calibration)
    label, ranks = plan_ranks(args, profile)
    windows = evaluation_windows(loaded.tokenizer, args.datasets, args.eval_seq_len, args.windows)
    dense_ppl = {ds: round(perplexity(loaded.model, ids).ppl, 3) for ds, ids in windows.items()}
    reference = model_logits(loaded.model, next(iter(windows.values())))
    factors = plan_factorizations(loaded, cfg, profile.decomposition, ranks)
    compress_model(loaded.model, ranks, lambda layer: factors[layer.name])
    before = measure(loaded.model, windows, reference)
    print(f"{label}: before {before}", flush=True)
    config = RecoveryConfig(mode=args.mode, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch,
                            lr=args.lr, seed=args.seed, dataset=cfg.dataset, split=cfg.split)
    healed = recover(loaded.model, loaded.tokenizer, config, Run(progress=_print_progress), evaluation=tuple(windows))
    after = measure(loaded.model, windows, reference)
    print(f"{label}: after {after}", flush=True)
    return {"plan": label, "dense_ppl": dense_ppl, "before": before, "after": after,
            "recovery": healed.record(), "losses": [round(x, 4) for x in healed.losses],
            "protocol": {"eval": {ds: f"{ds} {evaluation_split(ds)}, first {ids.shape[0]} x {args.eval_seq_len} tokens"
                                  for ds, ids in windows.items()},
                         "kl": f"KL(dense || model), T=0.6, positions after the first 1/8, the {args.datasets[0]} windows"},
            "machine": {"threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()],
                        "device": "cpu"}}


def _print_progress(fraction: float, message: str) -> None:
    print(f"\r{100 * fraction:5.1f}% {message:<70}", end="" if fraction < 1 else "\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--plan", help="a plan JSON (e.g. from lems allocate)")
    which.add_argument("--uniform", type=float, help="a uniform allocation at this kept ratio")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=512, help="training window length (tokens)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lr", type=float, default=None, help="default: the mode's (recovery.DEFAULT_LR)")
    parser.add_argument("--mode", choices=("lora", "factors"), default="lora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--datasets", type=lambda t: [d for d in t.split(",") if d], default=["wikitext2", "ptb"],
                        help="perplexity datasets, comma-separated (KL on the first)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))


if __name__ == "__main__":
    main()
