"""The README study: WikiText-2 perplexity of the demo model under each allocator.

Table 1 (KFAC-SVD decomposition, every allocator) at kept ratios 0.8 and 0.6, and
Table 2 (uniform allocation, each decomposition) at 0.8 and 0.6, on the committed
demo profiles. Every row is a real compression + perplexity run; nothing is copied.

    python -m studies.study [--windows 16] [--seq-len 512] [--out studies/results/study_results.md]
        [--allocators uniform,lems] [--decompositions kfac,svd_llm]   (subsets, e.g. to add a row)
"""
from __future__ import annotations

import argparse
import math
import time
import traceback
from pathlib import Path

import torch

from lems_core.allocators import allocate, fit_bias
from lems_core.cache import DEMO_DIR
from lems_core.calibration import CalibrationConfig
from lems_core.data import load_text
from lems_core.evaluation import perplexity, token_windows
from lems_core.pipeline import (calibration_windows, compressed, factorizations_for, get_model, make_kl_scorer,
                                make_ppl_scorer, plan_factorizations)
from lems_core.profile import Profile

ALLOCATORS = ["uniform", "lems", "lems_fixed", "lems_fit", "lems_mp", "svdllm_v2", "atp", "mrcs", "asvd", "ars", "erc_plc", "lcsvd_search"]
DECOMPOSITIONS = ["svd", "asvd", "fwsvd", "svd_llm", "svd_llm_v2", "kfac", "saes", "erc", "lcsvd"]


def run(args) -> list[str]:
    loaded = get_model("demo", "cpu")
    kfac = Profile.load(DEMO_DIR / "smollm2-135m-kfac")
    cfg = CalibrationConfig.from_dict(kfac.calibration)
    _, search = calibration_windows(loaded, cfg)
    text, _ = load_text("wikitext2", "test")
    windows = token_windows(loaded.tokenizer, text, args.seq_len, args.windows)
    dense = perplexity(loaded.model, windows).ppl
    lines = [f"Dense: {dense:.2f}", ""]

    def measure(profile: Profile, alloc) -> str:
        factors = plan_factorizations(loaded, cfg, profile.decomposition, alloc.ranks)
        with compressed(loaded, alloc.ranks, factors):
            ppl = perplexity(loaded.model, windows).ppl
        return f"{ppl:.2f}" if math.isfinite(ppl) else "inf"

    kfac_factors = factorizations_for(loaded, cfg, "kfac")
    kl_score = make_kl_scorer(loaded, kfac_factors, search)
    ppl_score = make_ppl_scorer(loaded, kfac_factors, search)
    table1 = {}
    for ratio in args.ratios:
        for method in args.allocators:
            started = time.perf_counter()
            try:
                if method == "lems_fit":
                    alloc = fit_bias(kfac, ratio, kl_score).allocation
                else:
                    score = ppl_score if method in ("atp", "lcsvd_search") else kl_score
                    alloc = allocate(kfac, method, ratio, score_fn=score)
                cell = f"{measure(kfac, alloc)} ({alloc.info.get('realised_ratio', 0):.3f})"
            except Exception as exc:  # a row that cannot run says why, the table goes on
                cell = f"n/a: {type(exc).__name__}: {str(exc)[:60]}"
                traceback.print_exc()
            table1[(method, ratio)] = cell
            print(f"[{time.perf_counter() - started:6.1f}s] kfac {method} {ratio}: {cell}", flush=True)
    lines += _table("Table 1: KFAC-SVD, each allocator (WikiText-2 PPL, realised ratio)", args.allocators, args.ratios, table1)

    table2 = {}
    for decomposition in args.decompositions:
        for ratio in args.ratios:
            started = time.perf_counter()
            try:
                profile = _profile_like(kfac, decomposition)
                alloc = allocate(profile, "uniform", ratio)
                cell = measure(profile, alloc)
            except Exception as exc:
                cell = f"n/a: {type(exc).__name__}: {str(exc)[:60]}"
                traceback.print_exc()
            table2[(decomposition, ratio)] = cell
            print(f"[{time.perf_counter() - started:6.1f}s] uniform {decomposition} {ratio}: {cell}", flush=True)
    lines += [""] + _table("Table 2: uniform allocation, each decomposition (WikiText-2 PPL)", args.decompositions, args.ratios, table2)
    lines += ["", f"Settings: demo SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32), CPU; calibration "
              f"{cfg.n_samples}x{cfg.seq_len} tokens of WikiText-2 validation (seed {cfg.seed}), search set "
              f"{cfg.n_search}x{cfg.seq_len}; perplexity on the first {windows.shape[0]} non-overlapping "
              f"{args.seq_len}-token windows of WikiText-2 test; lems = the reference LEMS (energy power 2, "
              f"ref ratio 0.1, KL scale, harmonic bias fitted in the profile at the nearest of its fit ratios); "
              f"lems_fixed = the same with the fixed bias alpha=0 gamma=5; lems_fit = 10-trial seeded (alpha, gamma) "
              f"search scored by KL on the search set at exactly this ratio."]
    return lines


def _profile_like(profile: Profile, decomposition: str) -> Profile:
    """Uniform allocation needs only the layer table, shared by every decomposition."""
    from dataclasses import replace

    return replace(profile, decomposition=decomposition)


def _table(title: str, rows: list[str], ratios: list[float], cells: dict) -> list[str]:
    out = [f"**{title}**", "", "| method | " + " | ".join(f"ratio {r}" for r in ratios) + " |",
           "|---|" + "---|" * len(ratios)]
    out += [f"| {m} | " + " | ".join(cells[(m, r)] for r in ratios) + " |" for m in rows]
    return out


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--out", default="studies/results/study_results.md")
    parser.add_argument("--allocators", type=_names, default=ALLOCATORS, help="comma-separated subset of Table 1")
    parser.add_argument("--decompositions", type=_names, default=DECOMPOSITIONS, help="comma-separated subset of Table 2")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when other jobs share the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = run(args)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
