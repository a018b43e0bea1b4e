"""Peak memory of statistics + decomposition under a fixed budget, by depth, at Llama-3-8B widths.

Builds random-weight LLaMA models with Llama-3-8B layer widths (hidden 4096,
intermediate 14336, 32/8 heads) and a small vocabulary at each depth, runs the
streamed statistics + decomposition (``streaming.streamed_factorizations``) under
``--max-memory`` and prints, per method and depth: peak RSS, RSS after the model
was built (its weights), the working peak (their difference), the ledger's peak
live Gram bytes, the windows (= backward passes for KFAC), the peak of anonymous
memory (RssAnon, sampled: RSS without file-backed pages) and peak CUDA memory when a
GPU is used. Each run is a fresh subprocess, so peaks do not leak between depths.
``--offload`` saves each model from a child process and loads it with accelerate with
every block on disk (the embeddings in memory), so the weights do not grow with depth
either. Then an extrapolated table for 8B (32 blocks) and 70B (80 blocks,
8192/28672) with its assumptions.

Goals: working peak at 8 blocks within 1.2x of 1 block; one 8B-width block under
8 GB peak RSS (14.6 GB before this issue for KFAC).

    nice python -m bench.scale [--depths 1,2,4,8] [--methods kfac,svd_llm] [--max-memory 7GB]
                               [--samples 2 --seq-len 128] [--dtype bf16] [--device cpu] [--offload]

Cost here (2 shared cores, one LAPACK thread): a KFAC block takes minutes (three
14336 x 14336 float64 Cholesky factorisations); SVD-LLM with 256 tokens hits the
eigenvalue shift on rank-deficient Grams (an eigvalsh of 14336 x 14336), slower still.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

GOAL_RATIO, GOAL_BLOCK_GB = 1.2, 8.0
GPU_BUDGET = 60 * 2**30  # second extrapolation budget: statistics + decomposition on an 80 GB card
WIDTHS = {"8B": dict(hidden=4096, intermediate=14336, heads=32, kv=8, blocks=32, vocab=128256),
          "70B": dict(hidden=8192, intermediate=28672, heads=64, kv=8, blocks=80, vocab=128256)}
BENCH_WIDTHS = {"8B": WIDTHS["8B"],  # the setting
                "quarter": dict(hidden=1024, intermediate=3584, heads=8, kv=2),  # 1/4 width: ~64x cheaper LAPACK
                "tiny": dict(hidden=64, intermediate=160, heads=4, kv=2)}  # the test's smoke run
GB = 2**30
# glibc's MALLOC_MMAP_THRESHOLD_, when set: a fixed threshold stops the heap fragmentation that freed Grams
# under 32 MB (quarter width) leave with the default dynamic one (a run's key, see --reuse)
MALLOC_THRESHOLD = os.environ.get("MALLOC_MMAP_THRESHOLD_")


def rss(field: str = "VmRSS") -> int:
    """This process's resident bytes: all of them (VmRSS), or the anonymous ones only (RssAnon)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """The largest RssAnon seen, sampled every 20 ms in a thread: the peak without file-backed pages.

    With --offload, the blocks' weights are read through memory-mapped checkpoint files; the
    pages read stay mapped (RssFile, counted in ru_maxrss) although the kernel may drop them
    at any time, so the anonymous peak is the memory the run actually needs."""

    def __init__(self):
        self.peak, self._stop = rss("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss("RssAnon"))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss("RssAnon"))


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def build_model(args):
    """The random-weight LLaMA of ``--width`` / ``--depth`` / ``--vocab`` in ``--dtype``."""
    from lems_core.model import tiny_model

    w = BENCH_WIDTHS[args.width]
    torch.set_default_dtype(DTYPES[args.dtype])
    try:
        return tiny_model("llama", seed=0, vocab_size=args.vocab, hidden_size=w["hidden"],
                          intermediate_size=w["intermediate"], num_hidden_layers=args.depth,
                          num_attention_heads=w["heads"], num_key_value_heads=w["kv"], max_position_embeddings=4096)
    finally:
        torch.set_default_dtype(torch.float32)


def offloaded_model(args, tmp: Path):
    """The same model saved by a child process, then loaded with accelerate with every block off memory:
    on disk (memory-mapped) for a CPU run, in CPU RAM for a GPU run; embeddings, final norm and head
    on the device. accelerate's hooks bring one block's weights in while it runs.

    The checkpoint is written by a separate process so this one's peak RSS never held the whole model.
    """
    from lems_core.offload import load_offloaded

    folder = tmp / "checkpoint"
    cmd = [sys.executable, __file__, "--save-checkpoint", str(folder), "--depth", str(args.depth), "--width",
           args.width, "--vocab", str(args.vocab), "--dtype", args.dtype]
    subprocess.run(cmd, check=True)
    device, away = (0, "cpu") if args.device.startswith("cuda") else ("cpu", "disk")
    device_map = {name: device for name in ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")}
    device_map.update({f"model.layers.{i}": away for i in range(args.depth)})
    return load_offloaded(str(folder), offload_folder=tmp / "offload", device_map=device_map,
                          dtype=DTYPES[args.dtype]).model


def blocks_offloaded(model) -> int:
    """How many decoder blocks accelerate keeps off memory (their weights meta until their hooks run)."""
    from lems_core.model import decoder_blocks
    from lems_core.offload import is_offloaded

    return sum(all(is_offloaded(m) for m in block.modules() if isinstance(m, torch.nn.Linear))
               for block in decoder_blocks(model))


def run_one(args) -> dict:
    """One depth in this process: build, stream, report (JSON on stdout's last line)."""
    from lems_core.decompositions import DecompositionOptions
    from lems_core.memory import GramLedger, parse_bytes
    from lems_core.model import LoadedModel, compressible_layers
    from lems_core.run import Run
    from lems_core.streaming import plan_stream, streamed_factorizations

    torch.set_num_threads(args.threads)
    tmp_models = tempfile.TemporaryDirectory(prefix="lems-scale-")
    if args.offload:
        model = offloaded_model(args, Path(tmp_models.name))
    else:
        model = build_model(args).to(args.device)
    loaded = LoadedModel(model, None, f"bench-8b-width-{args.depth}", f"bench{args.depth}{args.dtype}")
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base, base_anon = rss(), rss("RssAnon")
    layers = compressible_layers(model)
    plan = plan_stream(layers, args.method, parse_bytes(args.max_memory), args.device, DecompositionOptions())
    ledger = GramLedger(limit=plan.gram_budget)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, AnonPeak() as anon:
        streamed_factorizations(loaded, ids, args.method, DecompositionOptions(), Path(tmp) / "f", plan,
                                ledger=ledger, run=Run(factor_dtype=args.factor_dtype))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"method": args.method, "depth": args.depth, "peak_rss": peak, "model_rss": base, "work": peak - base,
           "gram_peak": ledger.peak, "gram_budget": plan.gram_budget, "workspace": plan.workspace,
           "windows": len(plan.windows), "seconds": round(time.perf_counter() - started, 1),
           "cuda_peak": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
           "threads": torch.get_num_threads(), "loadavg": os.getloadavg(), "peak_anon": anon.peak,
           "model_anon": base_anon, "blocks_offloaded": blocks_offloaded(model), **_config(args)}
    tmp_models.cleanup()
    print(json.dumps(out))
    return out


def _config(args) -> dict:
    """What a run's figures depend on (the key of a row in --reuse; rows without "offload" were not offloaded)."""
    return {"width": args.width, "max_memory": args.max_memory, "samples": args.samples, "seq_len": args.seq_len,
            "vocab": args.vocab, "dtype": args.dtype, "factor_dtype": args.factor_dtype, "device": args.device,
            **({"offload": True} if args.offload else {}),
            **({"malloc_mmap_threshold": MALLOC_THRESHOLD} if MALLOC_THRESHOLD else {})}


def _reused(path: str | None, args, method: str, depth: int) -> dict | None:
    """An earlier run of the same configuration from the --reuse file (JSON lines), if any."""
    if not path or not Path(path).is_file():
        return None
    want = {"offload": False, "malloc_mmap_threshold": None, **_config(args), "method": method, "depth": depth}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if all(row.get(k, False if k == "offload" else None) == v for k, v in want.items()):
            return row
    return None


def extrapolate(measured: dict, budget: int) -> list[str]:
    """Projected peaks for the real sizes from the measured 1-block working peak (see assumptions)."""
    from lems_core.memory import grad_gram_bytes, input_gram_bytes
    from lems_core.model import LayerInfo
    from lems_core.streaming import decomposition_workspace

    lines = ["", "Extrapolated (assumptions below):",
             f"{'model':6} {'method':8} {'blocks':>6} {'Grams all':>10} {'budget':>7} {'window':>7} {'passes':>6} "
             f"{'weights bf16':>12} {'peak, whole model':>17} {'peak, offloaded':>15}"]
    for name, w, asked in [(n, w, b) for b in (budget, GPU_BUDGET) for n, w in WIDTHS.items()]:
        h, i = w["hidden"], w["intermediate"]
        kv = h // w["heads"] * w["kv"]
        block = [LayerInfo(f"{k}", 0, k, m, n) for k, m, n in (("q", h, h), ("k", kv, h), ("v", kv, h), ("o", h, h),
                                                             ("gate", i, h), ("up", i, h), ("down", h, i))]
        params, embed = sum(l.params for l in block), 2 * w["vocab"] * h  # embed + head
        for method in ("kfac", "svd_llm"):
            ref = measured.get((method, 1))
            g = grad_gram_bytes(block) if method == "kfac" else 0
            a = input_gram_bytes(block)
            space = decomposition_workspace(block)
            cap = max(asked, space + g + a)  # the smallest budget that runs, if --max-memory is below it
            per_window = max(1, int((cap - space - a) // g)) if g else w["blocks"]
            passes = -(-w["blocks"] // per_window) if g else 1
            window = min(per_window, w["blocks"]) * g + a
            # the measured 1-block working peak beyond its Grams (work arrays, activations), scaled by width^2
            over = (ref["work"] - ref["gram_peak"]) * (h / 4096) ** 2 if ref else space
            work = window + over
            weights = (w["blocks"] * params + embed) * 2
            lines.append(f"{name:6} {method:8} {w['blocks']:6d} {all_grams(w, g, a) / GB:9.1f}G {cap / GB:6.1f}G "
                         f"{window / GB:6.1f}G {passes:6d} {weights / GB:11.1f}G {(weights + work) / GB:16.1f}G "
                         f"{((params + embed) * 2 + work) / GB:14.1f}G")
    lines += ["Assumptions: working peak = Gram window (KFAC: as many blocks of G as the budget holds after the",
              "decomposition work arrays, + one block of A) + the measured 8B-width 1-block working peak beyond its",
              "Grams (work arrays, activations, process), scaled by hidden^2 for 70B (the estimated work arrays",
              "when no 1-block run was measured); 'whole model' adds all weights, embeddings and head in bf16",
              "(vocabulary 128256); 'offloaded' one block + embeddings + head (accelerate device_map / offload",
              "folder). KFAC compute = passes forward passes + about passes/2 full backward passes.",
              f"Budgets: --max-memory {budget / GB:.1f} GB, then {GPU_BUDGET / GB:.0f} GB (an 80 GB GPU), each raised to the",
              "smallest budget that runs where it is below it."]
    return lines


def all_grams(w: dict, g: int, a: int) -> int:
    """Every Gram of the model at once (the classic path)."""
    return w["blocks"] * (g + a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="1,2,4,8")
    parser.add_argument("--methods", default="kfac,svd_llm")
    parser.add_argument("--max-memory", default="7GB", help="budget for statistics + decomposition")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="model weights")
    parser.add_argument("--factor-dtype", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", default="8B", choices=sorted(BENCH_WIDTHS),
                        help="8B: Llama-3-8B layers (default); quarter: 1024/3584, for a quick depth series; "
                             "tiny: 64/160, a smoke run")
    parser.add_argument("--offload", action="store_true",
                        help="weights on disk (accelerate offload folder) but the embeddings, head and one block: "
                             "peak RSS then does not grow with depth either")
    parser.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--save-checkpoint", default=None, help=argparse.SUPPRESS)  # child of an --offload run
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("-o", "--output", default=None, help="also write the table here")
    parser.add_argument("--cli", action="store_true",
                        help="run the user's command, `python -m lems_core profile --max-memory` (KFAC, KL sweep and "
                             "bias fit), in a child per depth and sample its RssAnon (bench/scale_cli.py)")
    parser.add_argument("--reuse", default=None,
                        help="JSON-lines file of runs: rows of the same configuration are read from it instead of "
                             "run again, new runs are appended (lets a long 8B-width series be built in pieces)")
    args = parser.parse_args()
    if args.save_checkpoint:
        build_model(args).save_pretrained(args.save_checkpoint, max_shard_size="200MB")
        return
    if args.depth is not None:
        run_one(args)
        return
    if args.cli:
        from .scale_cli import run

        lines = run(args)
        if args.output:
            Path(args.output).write_text("\n".join(lines) + "\n")
        return
    from lems_core.memory import parse_bytes

    print(f"load average {os.getloadavg()}, torch threads {args.threads} per run, device {args.device}, "
          f"model {args.dtype}, factors {args.factor_dtype}, {args.samples}x{args.seq_len} tokens, "
          f"vocab {args.vocab}, budget {args.max_memory}, width {args.width} {BENCH_WIDTHS[args.width]}"
          f"{', weights offloaded to disk but one block' if args.offload else ''}"
          f"{f', MALLOC_MMAP_THRESHOLD_={MALLOC_THRESHOLD}' if MALLOC_THRESHOLD else ''}", flush=True)
    measured, lines = {}, []
    header = (f"{'method':8} {'blocks':>6} {'peak RSS':>9} {'model RSS':>9} {'work':>7} {'Gram peak':>9} "
              f"{'windows':>7} {'seconds':>7} {'CUDA peak':>9} {'load avg':>8} {'anon peak':>9}")
    print(header, flush=True)
    lines.append(header)
    for method in args.methods.split(","):
        for depth in (int(d) for d in args.depths.split(",")):
            cmd = [sys.executable, __file__, "--depth", str(depth), "--method", method, "--max-memory", args.max_memory,
                   "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--vocab", str(args.vocab),
                   "--dtype", args.dtype, "--factor-dtype", args.factor_dtype, "--device", args.device,
                   "--threads", str(args.threads), "--width", args.width] + (["--offload"] if args.offload else [])
            r = _reused(args.reuse, args, method, depth)
            if r is None:
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{method} depth {depth} failed:\n{done.stderr[-2000:]}", flush=True)
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                if args.reuse:
                    with open(args.reuse, "a") as f:
                        f.write(json.dumps(r) + "\n")
            measured[(method, depth)] = r
            cuda = f"{r['cuda_peak'] / GB:8.2f}G" if r["cuda_peak"] else "      n/a"
            line = (f"{method:8} {depth:6d} {r['peak_rss'] / GB:8.2f}G {r['model_rss'] / GB:8.2f}G "
                    f"{r['work'] / GB:6.2f}G {r['gram_peak'] / GB:8.2f}G {r['windows']:7d} {r['seconds']:7.0f} {cuda} "
                    f"{r.get('loadavg', [0])[0]:8.1f} " + (f"{r['peak_anon'] / GB:8.2f}G" if "peak_anon" in r else "      n/a"))
            print(line, flush=True)
            lines.append(line)
    lines.append("")
    for method in args.methods.split(","):
        depths = sorted(d for m, d in measured if m == method)
        if len(depths) >= 2:
            lo, hi = measured[(method, depths[0])], measured[(method, depths[-1])]
            lines.append(f"{method}: working peak {depths[-1]} vs {depths[0]} block(s): {hi['work'] / lo['work']:.2f}x "
                         f"(goal <= {GOAL_RATIO}x); peak RSS {hi['peak_rss'] / lo['peak_rss']:.2f}x "
                         + ("(weights on disk but one block)" if args.offload else
                            "(weights grow with depth unless offloaded)")
                         + (f"; anonymous peak {hi['peak_anon'] / lo['peak_anon']:.2f}x (without file-backed pages)"
                            if "peak_anon" in hi and "peak_anon" in lo else ""))
        if (method, 1) in measured:
            peak = measured[(method, 1)]["peak_rss"] / GB
            lines.append(f"{method}: one {args.width}-width block peak RSS {peak:.2f} GB (goal < {GOAL_BLOCK_GB:g} GB)")
    if args.width == "8B":
        lines += extrapolate(measured, parse_bytes(args.max_memory))
    lines.append(f"load average at the end {os.getloadavg()}")
    print("\n".join(lines[1 + len(measured):]), flush=True)
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
