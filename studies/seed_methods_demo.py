"""The other seed methods on the demo model: WikiText-2 perplexity at one kept ratio.

Rows (all at the same kept-parameter budget of the compressible Linears):
- uniform ranks with the decompositions svd_llm (baseline), svd_llm_v2, saes, erc (REC), lcsvd;
- ERC-SVD in full: the PLC allocator ``erc_plc`` (k scored by the final-block output
  error of REC factors on the search windows) with REC factors;
- LC-SVD in full: the ``lcsvd_search`` allocator (scored by search-window perplexity of
  SVD-LLM factors, which any rank slices) with LC-SVD factors.

Calibration is the demo profiles' (cpu preset: 16 x 512 tokens, 2 search windows), so
the SVD-LLM statistics come from the cache when the demo profiles were built.
Every number is a real compression + perplexity run.

    nice python -m studies.seed_methods_demo [--ratio 0.8] [--windows 8] [--seq-len 512]
        [--threads 1] [--only saes,erc] [--lc-steps 50] [--lc-batches 4]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from lems_core import pipeline
from lems_core.allocators import allocate, realised_ratio
from lems_core.calibration import demo_calibration
from lems_core.data import load_text
from lems_core.decompositions.erc import rec_factorizations
from lems_core.decompositions.lcsvd import LcOptions
from lems_core.evaluation import make_final_error_scorer, perplexity, token_windows
from lems_core.model import compressible_layers
from lems_core.profile import Profile

ROWS = ("svd_llm", "svd_llm_v2", "saes", "erc", "erc_full", "lcsvd", "lcsvd_full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.8, help="kept fraction of the compressible Linears")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=",".join(ROWS))
    parser.add_argument("--lc-steps", type=int, default=LcOptions().max_steps)
    parser.add_argument("--lc-batches", type=int, default=LcOptions().batches_per_step)
    parser.add_argument("--lcsvd-candidates", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lc_options = LcOptions(max_steps=args.lc_steps, batches_per_step=args.lc_batches)  # the defaults unless asked

    started = time.perf_counter()
    loaded = pipeline.get_model("demo", "cpu")
    cfg = demo_calibration()
    calib, search = pipeline.calibration_windows(loaded, cfg)
    text, _ = load_text("wikitext2", "test")
    windows = token_windows(loaded.tokenizer, text, args.seq_len, args.windows)
    dense = perplexity(loaded.model, windows).ppl
    print(f"demo model loaded, dense PPL {dense:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)

    svd_llm = pipeline.factorizations_for(loaded, cfg, "svd_llm", calib_ids=calib)
    layers = compressible_layers(loaded.model)
    profile = Profile(loaded.source, loaded.fingerprint, "svd_llm", cfg.to_dict(), layers,
                      {n: f.sigma for n, f in svd_llm.items()})
    uniform = allocate(profile, "uniform", args.ratio).ranks

    def ranks_for(row: str) -> dict:
        if row == "erc_full":
            score = make_final_error_scorer(loaded.model, search, lambda r: rec_factorizations(loaded.model, svd_llm, r))
            alloc = allocate(profile, "erc_plc", args.ratio, score_fn=score)
            print(f"  erc_plc chose k = {alloc.info['k']} (block keep {alloc.info['block_keep']:.3f})", flush=True)
            return alloc.ranks
        if row == "lcsvd_full":
            score = pipeline.make_ppl_scorer(loaded, svd_llm, search)
            alloc = allocate(profile, "lcsvd_search", args.ratio, score_fn=score, n_candidates=args.lcsvd_candidates)
            keep = ", ".join(f"{k:.2f}" for k in alloc.info["trials"][[t["candidate"] for t in alloc.info["trials"]].index(alloc.info["chosen"])]["block_keep"])
            print(f"  lcsvd_search chose {alloc.info['chosen']}: block keep [{keep}]", flush=True)
            return alloc.ranks
        return uniform

    decomposition = {"erc_full": "erc", "lcsvd_full": "lcsvd"}
    rows = [f"| method | allocator | decomposition | realised ratio | WikiText-2 PPL ({args.windows}x{args.seq_len}) | seconds |",
            "|---|---|---|---|---|---|"]
    for row in [r for r in args.only.split(",") if r]:
        t0 = time.perf_counter()
        ranks = ranks_for(row)
        dec = decomposition.get(row, row)
        factors = pipeline.plan_factorizations(loaded, cfg, dec, ranks, options=lc_options if dec == "lcsvd" else None)
        with pipeline.compressed(loaded, ranks, factors):
            ppl = perplexity(loaded.model, windows).ppl
        allocator = {"erc_full": "erc_plc", "lcsvd_full": "lcsvd_search"}.get(row, "uniform")
        line = (f"| {row} | {allocator} | {dec} | {realised_ratio(profile, ranks):.4f} | "
                f"{ppl:.2f} | {time.perf_counter() - t0:.0f} |" if math.isfinite(ppl) else f"| {row} | {allocator} | {dec} | - | inf | - |")
        rows.append(line)
        print(line, flush=True)
    print(f"\nDense PPL {dense:.2f}; kept ratio {args.ratio}; calibration {cfg.n_samples}x{cfg.seq_len}; "
          f"total {time.perf_counter() - started:.0f} s\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
