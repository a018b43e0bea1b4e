"""Inference throughput of a compressed model against the dense one, side by side in one run.

The demo model is factorised with plain SVD at a uniform kept fraction (``--ratio``,
rank = int(ratio * eq_rank) everywhere, or the ranks of ``--plan``); throughput does
not depend on which factors fill the two Linears, only on their shapes. For each
thread count the dense and the low-rank Linears are swapped in place and measured
alternately, repeat after repeat, so load changes on shared cores hit both alike:

- forward: one 1 x ``--seq-len`` prompt (tokens per second = seq_len / time);
- generation: ``--new-tokens`` greedy tokens with the KV cache after a 32-token prompt.

Medians of ``--repeats``; prints tokens/s, compressed/dense ratios, the thread count and
the load average. With a GPU, the same figures in fp16 on it.

    python -m bench.inference [--ratio 0.6] [--threads 1,2] [--repeats 5] [--plan P]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from lems_core.compression import LowRankLinear, count_parameters, is_dense_rank, set_module
from lems_core.decompositions import Decomposer
from lems_core.model import compressible_layers, load_model


def low_rank_modules(model, ranks: dict) -> dict:
    """name -> LowRankLinear from plain SVD factors at ``ranks`` (dense-kept layers left out)."""
    svd, layers, out = Decomposer("svd"), {l.name: l for l in compressible_layers(model)}, {}
    for name, rank in ranks.items():
        layer = layers[name]
        if is_dense_rank(layer, rank):
            continue
        linear = model.get_submodule(name)
        left, right = svd(layer, linear.weight).factors(int(rank))
        out[name] = LowRankLinear.from_factors(left, right, linear.bias, linear)
    return out


def swap(model, modules: dict) -> dict:
    """Put ``modules`` in place; return what they replaced (to swap back)."""
    previous = {name: model.get_submodule(name) for name in modules}
    for name, module in modules.items():
        set_module(model, name, module)
    return previous


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_forward(model, ids: torch.Tensor) -> float:
    sync(ids.device)
    t0 = time.perf_counter()
    model(ids, use_cache=False)
    sync(ids.device)
    return time.perf_counter() - t0


@torch.no_grad()
def time_generate(model, prompt: torch.Tensor, new_tokens: int) -> float:
    sync(prompt.device)
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         use_cache=True, pad_token_id=0)
    sync(prompt.device)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return time.perf_counter() - t0


def measure(model, compressed: dict, ids, prompt, new_tokens: int, repeats: int) -> dict:
    """Median seconds of forward / generate for dense and compressed, measured alternately."""
    times = {(k, m): [] for k in ("dense", "compressed") for m in ("forward", "generate")}
    dense = swap(model, compressed)  # warm both once (allocations, kernels)
    time_forward(model, ids), time_generate(model, prompt, 4)
    swap(model, dense)
    time_forward(model, ids), time_generate(model, prompt, 4)
    for _ in range(repeats):
        for kind in ("dense", "compressed"):
            if kind == "compressed":
                swap(model, compressed)
            times[(kind, "forward")].append(time_forward(model, ids))
            times[(kind, "generate")].append(time_generate(model, prompt, new_tokens))
            if kind == "compressed":
                swap(model, dense)
    return {k: statistics.median(v) for k, v in times.items()}


def report(label: str, t: dict, seq_len: int, new_tokens: int) -> None:
    fwd = {k: seq_len / t[(k, "forward")] for k in ("dense", "compressed")}
    gen = {k: new_tokens / t[(k, "generate")] for k in ("dense", "compressed")}
    print(f"{label}: forward 1x{seq_len}: dense {fwd['dense']:8.1f} tok/s, compressed {fwd['compressed']:8.1f} tok/s, "
          f"{fwd['compressed'] / fwd['dense']:.2f}x | generate {new_tokens} greedy: dense {gen['dense']:6.1f} tok/s, "
          f"compressed {gen['compressed']:6.1f} tok/s, {gen['compressed'] / gen['dense']:.2f}x "
          f"| load average {os.getloadavg()[0]:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--ratio", type=float, default=0.6, help="kept fraction per layer (rank = int(ratio * eq))")
    parser.add_argument("--plan", default=None, help="take the ranks of this plan instead of --ratio")
    parser.add_argument("--threads", default="1,2", help="CPU thread counts to measure, comma separated")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU figure even when a GPU is present")
    args = parser.parse_args()

    print(f"load average at start {os.getloadavg()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    loaded = load_model(args.model, device="cpu", dtype=torch.float32)
    model = loaded.model
    if args.plan:
        from lems_core.plan import RankPlan

        ranks = RankPlan.load(args.plan, fingerprint=loaded.fingerprint).ranks()
        label = f"plan {Path(args.plan).name}"
    else:
        ranks = {l.name: max(1, int(args.ratio * l.eq_rank)) for l in compressible_layers(model)}
        label = f"uniform {args.ratio:g}"
    compressed = low_rank_modules(model, ranks)
    dense_params = count_parameters(model)
    dense = swap(model, compressed)
    params = count_parameters(model)
    swap(model, dense)
    print(f"{args.model} {label}: {len(compressed)} factorised Linears, {params:,} parameters "
          f"(dense {dense_params:,}, {params / dense_params:.3f}x)")
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.seq_len), generator=g)
    prompt = torch.randint(0, vocab, (1, 32), generator=g)
    for threads in (int(x) for x in args.threads.split(",")):
        torch.set_num_threads(threads)
        t = measure(model, compressed, ids, prompt, args.new_tokens, args.repeats)
        report(f"CPU fp32, {torch.get_num_threads()} thread(s)", t, args.seq_len, args.new_tokens)
    if torch.cuda.is_available() and not args.no_gpu:
        model.to("cuda", torch.float16)
        for m in compressed.values():
            m.to("cuda", torch.float16)
        t = measure(model, compressed, ids.cuda(), prompt.cuda(), args.new_tokens, args.repeats)
        report(f"GPU fp16 ({torch.cuda.get_device_name()})", t, args.seq_len, args.new_tokens)
    else:
        print("GPU: none here (run on a CUDA machine for the GPU figure)")


if __name__ == "__main__":
    main()
