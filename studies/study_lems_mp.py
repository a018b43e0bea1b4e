"""LEMS-MP study on the demo: WikiText-2 test and PTB validation perplexity at kept ratios
0.8 and 0.6 for one-point LEMS (fixed bias, registered as ``lems_fixed``), LEMS with the bias
fit, LEMS-MP (all measured points, with and without the same bias fit, and {0.1, 0.5, 0.9})
and adaptive LEMS-MP, with the model evaluations each one used.

    python -m studies.study_lems_mp [--windows 16] [--rounds 5] [--per-round 30] [--threads 1]
        [--methods lems,lems_fit,lems_mp,lems_mp_fit,lems_mp3,lems_adaptive] [--out studies/results/study_lems_mp.md]

Costs are counted as single-layer suffix runs (one layer compressed, search set, blocks
b..B-1: what the profile's sensitivity sweep does per layer and ratio) and full-model
KL evaluations of a candidate plan on the search set (what the bias fit does).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from lems_core.adaptive_measure import model_measure
from lems_core.allocators import allocate_lems, fit_bias
from lems_core.allocators.lems_adaptive import adaptive_lems_mp
from lems_core.allocators.lems_mp import allocate_lems_mp, fit_bias_mp
from lems_core.cache import DEMO_DIR
from lems_core.calibration import CalibrationConfig
from lems_core.data import load_text
from lems_core.evaluation import perplexity, token_windows
from lems_core.pipeline import (calibration_windows, compressed, factorizations_for, get_model, make_kl_scorer,
                                plan_factorizations)
from lems_core.profile import Profile

METHODS = ["lems", "lems_fit", "lems_mp", "lems_mp_fit", "lems_mp3", "lems_adaptive"]
DATASETS = [("wikitext2", "test"), ("ptb", "validation")]


def run(args) -> list[str]:
    loaded = get_model("demo", "cpu")
    kfac = Profile.load(DEMO_DIR / "smollm2-135m-kfac")
    layers = len(kfac.layers)
    cfg = CalibrationConfig.from_dict(kfac.calibration)
    _, search = calibration_windows(loaded, cfg)
    windows = {name: token_windows(loaded.tokenizer, load_text(name, split)[0], args.seq_len, args.windows)
               for name, split in DATASETS}
    factors = factorizations_for(loaded, cfg, "kfac")
    kl_score = make_kl_scorer(loaded, factors, search)
    full_evals = {"n": 0}

    def counted_kl(ranks):
        full_evals["n"] += 1
        return kl_score(ranks)

    measure, floor, runs = (model_measure(kfac) if "lems_adaptive" in args.methods else (None, None, None))
    dense = {name: perplexity(loaded.model, w).ppl for name, w in windows.items()}
    cells, plans, adaptive_log = {}, {}, {}
    for ratio in args.ratios:
        for method in args.methods:
            started = time.perf_counter()
            full_evals["n"] = 0
            suffix = layers  # the reference KL at 0.1 every LEMS variant starts from
            if method == "lems":  # the fixed reference bias (registered as ``lems_fixed``)
                alloc = allocate_lems(kfac, ratio)
            elif method == "lems_fit":
                alloc = fit_bias(kfac, ratio, counted_kl).allocation
            elif method == "lems_mp":
                alloc = allocate_lems_mp(kfac, ratio)
                suffix = layers * (1 + len(kfac.measured))
            elif method == "lems_mp_fit":
                alloc = fit_bias_mp(kfac, ratio, counted_kl)[1]
                suffix = layers * (1 + len(kfac.measured))
            elif method == "lems_mp3":
                alloc = allocate_lems_mp(kfac, ratio, fit_ratios=(0.5, 0.9))
                suffix = layers * 3
            elif method == "lems_adaptive":
                before = runs["runs"]
                result = adaptive_lems_mp(kfac, ratio, measure, rounds=args.rounds, per_round=args.per_round,
                                          fit_ratios=(), floor=floor)
                alloc = result.allocation
                suffix = layers + (runs["runs"] - before) + 1  # + the dense floor run
                adaptive_log[ratio] = [{"round": r.round, "changed_layers": r.changed_layers,
                                        "objective": r.objective, "measured": r.measured} for r in result.rounds]
            else:
                raise ValueError(f"unknown method {method}")
            plan_factors = plan_factorizations(loaded, cfg, "kfac", alloc.ranks)
            with compressed(loaded, alloc.ranks, plan_factors):
                ppl = {name: perplexity(loaded.model, w).ppl for name, w in windows.items()}
            cells[(method, ratio)] = (ppl, suffix, full_evals["n"], alloc.info["realised_ratio"], alloc.info["dense_layers"])
            plans[f"{method}@{ratio}"] = alloc.ranks
            print(f"[{time.perf_counter() - started:6.1f}s] {method} {ratio}: {ppl} suffix runs {suffix} "
                  f"full evals {full_evals['n']}", flush=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"plans": plans, "adaptive_rounds": {str(k): v for k, v in adaptive_log.items()}, "kl_floor_measured": floor},
        indent=1))
    return _table(cells, args, dense, floor)


def _fmt(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "inf"


def _table(cells, args, dense, floor) -> list[str]:
    lines = [f"Dense: WikiText-2 {_fmt(dense['wikitext2'])}, PTB {_fmt(dense['ptb'])}"
             + (f"; measured KL floor {floor:.3e}" if floor is not None else ""), "",
             "| method | ratio | WikiText-2 PPL | PTB PPL | single-layer suffix runs | full-model KL evals | dense layers |",
             "|---|---|---|---|---|---|---|"]
    for ratio in args.ratios:
        for method in args.methods:
            ppl, suffix, full, realised, dense_layers = cells[(method, ratio)]
            lines.append(f"| {method} | {ratio} ({realised:.3f}) | {_fmt(ppl['wikitext2'])} | {_fmt(ppl['ptb'])} | "
                         f"{suffix} | {full} | {dense_layers} |")
    lines += ["", f"Settings: demo SmolLM2-135M-Instruct, KFAC-SVD, CPU; perplexity on the first {args.windows} "
              f"non-overlapping {args.seq_len}-token windows of WikiText-2 test and PTB validation; fixed bias "
              f"(harmonic, alpha=0 gamma=5) for lems (= the registered lems_fixed), lems_mp, lems_mp3, lems_adaptive; "
              f"lems_fit = 10-trial (alpha, gamma) search scored by KL on the search set; lems_mp = all measured "
              f"points (0.1, 0.4-0.9); lems_mp_fit = lems_mp with the same bias search; lems_mp3 = {{0.1, 0.5, 0.9}}; "
              f"lems_adaptive = 0.1 + {args.rounds} rounds x {args.per_round} measurements at the plan's ranks + 1 "
              f"dense floor run, per ratio."]
    return lines


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--methods", type=_names, default=METHODS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="studies/results/study_lems_mp.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = run(args)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
