"""Inference throughput of a compressed model against the dense one, side by side in one run.

The demo model is factorised with plain SVD at a uniform kept fraction (``--ratio``,
rank = int(ratio * eq_rank) everywhere, or the ranks of ``--plan``); throughput does
not depend on which factors fill the two Linears, only on their shapes. Four models
are measured alternately, repeat after repeat (the order reversed every other repeat),
so load changes on shared cores hit all alike:

- dense: the model as loaded, its weights copied out of the memory-mapped checkpoint
  (``fused.own_memory``) so that, like the other three, it reads them from allocated memory;
- compressed: the planned Linears swapped for LowRankLinear (two Linears in -> r -> out);
- prepared: the compressed model after ``fused.prepare_for_inference`` (q/k/v and gate/up
  share one first-factor GEMM per prompt, second factors stored for the matvec, factors
  called without their module wrappers);
- hf export: the compressed model exported with ``hf_export.export_hf`` and loaded back
  with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``, which
  prepares it the same way (its weights copied out of the file mapping included).

For each: one 1 x ``--seq-len`` forward (tokens per second = seq_len / time) and
``--new-tokens`` greedy tokens with the KV cache after a 32-token prompt. Medians of
``--repeats`` in wall time (tok/s, ratio to dense) and in this process's CPU time (the
ratio, which descheduling on busy cores does not inflate), then the median and range of
the repeat-by-repeat ("paired") ratios, which a slow drift of the shared machine moves
least, with the thread count and the load average. With a GPU, the same figures in fp16
and in bf16 on it (not run here: no GPU).

Before the timings, at one thread: one token's matrix products alone (every Linear's
weight times a one-row input, a factorised projection's two factors included), whose
ratio is what the factorisation itself saves in a generation step; and where one forward
and one generation spend their CPU time: attention projections (q/k/v/o), MLP
(gate/up/down and the activation), lm_head, everything else (embeddings, norms, rotary,
attention itself, the cache, the generation loop), which is the same in both models and
dilutes the ratio.

``--width 8B --depth N --vocab V`` measures a random-weight LLaMA with Llama-3-8B layer
widths instead of the demo (random factors of the planned ranks: the time does not depend
on their values; no HF export, as there is no tokenizer). Pick ``--vocab`` so lm_head's share
of the bytes is a real model's: Llama-3-8B's lm_head is 7 % of the weights a generated token
reads (128256 x 4096 beside 32 blocks of 218 M), which 2 blocks match with ``--vocab 8192``.

    python -m bench.inference [--ratio 0.6] [--threads 1,2] [--repeats 5] [--plan P]
    python -m bench.inference --width 8B --depth 2 --vocab 8192 --seq-len 128 --new-tokens 32 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lems_core.compression import LowRankLinear, compress_model, count_parameters
from lems_core.decompositions import Decomposer
from lems_core.fused import own_memory, prepare_for_inference
from lems_core.model import LoadedModel, compressible_layers, load_model, tiny_model

from .scale import BENCH_WIDTHS

KINDS = ("dense", "compressed", "prepared", "hf export")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class RandomFactors:
    """Random factors of a Linear's shape at any rank, scaled so that their product's entries have the
    dense weight's standard deviation: for widths where an SVD per layer costs minutes and only the
    time of the products is wanted (``compression.Factors``)."""

    def __init__(self, weight: torch.Tensor, generator: torch.Generator):
        self.weight, self.generator = weight, generator

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        out_features, in_features = self.weight.shape
        scale = self.weight.std().item() / float(rank) ** 0.5
        left = torch.randn(out_features, rank, generator=self.generator) * scale
        right = torch.randn(rank, in_features, generator=self.generator)
        return left.to(self.weight.dtype), right.to(self.weight.dtype)


def factor_source(model, random_factors: bool = False):
    """layer -> its factors for ``compression.compress_model``: plain SVD of its weight, or RandomFactors."""
    if random_factors:
        generator = torch.Generator().manual_seed(0)
        return lambda layer: RandomFactors(model.get_submodule(layer.name).weight, generator)
    svd = Decomposer("svd")
    return lambda layer: svd(layer, model.get_submodule(layer.name).weight)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float], device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds since ``start``, after the device has finished."""
    sync(device)
    wall, cpu = clocks()
    return wall - start[0], cpu - start[1]


@torch.no_grad()
def time_forward(model, ids: torch.Tensor) -> tuple[float, float]:
    sync(ids.device)
    start = clocks()
    model(ids, use_cache=False)
    return since(start, ids.device)


@torch.no_grad()
def time_generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    sync(prompt.device)
    start = clocks()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         use_cache=True, pad_token_id=0)
    elapsed = since(start, prompt.device)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return elapsed


def turn_order(models: dict, repeat: int) -> list:
    """The models' names in the order of this repeat: reversed every other one, so no model always follows
    the same one."""
    return list(models) if repeat % 2 == 0 else list(models)[::-1]


def measure(models: dict, ids, prompt, new_tokens: int, repeats: int) -> dict:
    """(wall, CPU) seconds of forward / generate per model and repeat, measured alternately.

    Every model runs once first (allocations, kernels, a group's stacked weights); the
    order is reversed every other repeat so no model always follows the same one.
    """
    times = {(k, m): [] for k in models for m in ("forward", "generate")}
    for model in models.values():
        time_forward(model, ids), time_generate(model, prompt, 4)
    for r in range(repeats):
        for kind in turn_order(models, r):
            times[(kind, "forward")].append(time_forward(models[kind], ids))
            times[(kind, "generate")].append(time_generate(models[kind], prompt, new_tokens))
    return times


def paired_ratios(dense: list[float], other: list[float]) -> list[float]:
    """dense / other seconds, repeat by repeat: the two ran minutes apart at most, so a slow drift
    of the shared machine (a neighbour's memory traffic) cancels in each ratio."""
    return sorted(d / o for d, o in zip(dense, other))


def report(label: str, t: dict, seq_len: int, new_tokens: int) -> None:
    """tok/s per model (median wall time) and the ratio to dense: of the medians, of process CPU
    time, and the median and range of the repeat-by-repeat ratios."""
    print(f"{label} (load average {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}):")
    for what, tokens in (("forward", seq_len), ("generate", new_tokens)):
        median = {kind: tuple(statistics.median(x[i] for x in v) for i in range(2))
                  for (kind, w), v in t.items() if w == what}
        cells = []
        for kind in (k for k in KINDS if k in median):
            paired = paired_ratios([wall for wall, _ in t[("dense", what)]], [wall for wall, _ in t[(kind, what)]])
            cells.append(f"{kind} {tokens / median[kind][0]:7.1f} tok/s ({median['dense'][0] / median[kind][0]:.2f}x, "
                         f"CPU {median['dense'][1] / median[kind][1]:.2f}x, paired {statistics.median(paired):.2f}x "
                         f"in {paired[0]:.2f}-{paired[-1]:.2f})")
        label = f"forward 1x{seq_len}" if what == "forward" else f"generate {new_tokens} greedy"
        print(f"  {label:19s} " + " | ".join(cells), flush=True)


@torch.no_grad()
def products_per_token(model) -> float:
    """Seconds of every Linear's weight times a one-row input, once each (a factorised projection's
    two factors included): the matrix products of one generation step, nothing else."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    rows = {m.in_features: torch.randn(1, 1, m.in_features, dtype=m.weight.dtype) for m in linears}
    start = time.perf_counter()
    for m in linears:
        F.linear(rows[m.in_features], m.weight, m.bias)
    return time.perf_counter() - start


def print_products(models: dict, repeats: int = 9) -> None:
    """Per model, one token's matrix products alone (1 thread; medians of ``repeats``, the models
    taking turns), and the median of the repeat-by-repeat ratios to dense."""
    for model in models.values():
        products_per_token(model)
    times = {kind: [] for kind in models}
    for r in range(repeats):
        for kind in turn_order(models, r):
            times[kind].append(products_per_token(models[kind]))
    cells = [f"{kind} {statistics.median(t) * 1e3:6.1f} ms "
             f"({statistics.median(paired_ratios(times['dense'], t)):.2f}x)" for kind, t in times.items()]
    print(f"matrix products of one token alone (1 thread, load average {os.getloadavg()[0]:.2f}): "
          + " | ".join(cells), flush=True)


def stage_of(name: str) -> str | None:
    """The stage a module's time counts to, for the modules timed as a whole (None for the rest)."""
    last = name.rpartition(".")[2]
    if last in ATTENTION_PROJECTIONS and ".self_attn." in f".{name}":
        return "attention projections"
    if last == "mlp":
        return "MLP"
    return "lm_head" if name == "lm_head" else None


@torch.no_grad()
def stage_split(model, run) -> dict[str, float]:
    """CPU seconds per stage of one ``run(model)`` (thread CPU time, measured with forward hooks)."""
    spent, handles = {"attention projections": 0.0, "MLP": 0.0, "lm_head": 0.0}, []
    for name, module in model.named_modules():
        stage = stage_of(name)
        if stage is not None:
            start = [0.0]
            handles.append(module.register_forward_pre_hook(lambda *_, s=start: s.__setitem__(0, time.thread_time())))
            handles.append(module.register_forward_hook(
                lambda *_, s=start, k=stage: spent.__setitem__(k, spent[k] + time.thread_time() - s[0])))
    try:
        begin = time.thread_time()
        run(model)
        total = time.thread_time() - begin
    finally:
        for handle in handles:
            handle.remove()
    return {**spent, "everything else": total - sum(spent.values()), "total": total}


def print_stage_split(models: dict, ids, prompt, new_tokens: int, repeats: int = 3) -> None:
    """Where one forward and one generation spend their CPU time, per model (medians of ``repeats`` runs,
    the models taking turns)."""
    runs = {"forward": lambda m: m(ids, use_cache=False),
            "generate": lambda m: m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                             do_sample=False, use_cache=True, pad_token_id=0)}
    for what, run in runs.items():
        splits = {kind: [] for kind in models}
        for _ in range(repeats):
            for kind, model in models.items():
                splits[kind].append(stage_split(model, run))
        print(f"stage split, {what} (CPU ms, 1 thread, load average {os.getloadavg()[0]:.2f}):")
        for kind in models:
            split = {stage: statistics.median(s[stage] for s in splits[kind]) for stage in splits[kind][0]}
            cells = [f"{stage} {ms * 1e3:6.0f} ({100 * ms / split['total']:2.0f}%)" for stage, ms in split.items()
                     if stage != "total"]
            print(f"  {kind:10s} total {split['total'] * 1e3:6.0f}: " + ", ".join(cells), flush=True)


def export_and_load(model, tokenizer, ranks: dict, folder: Path):
    """``model`` exported as a Hugging Face folder and loaded back through its remote code."""
    from transformers import AutoModelForCausalLM

    from lems_core.hf_export import ModelCard, export_hf

    card = ModelCard(base_model="demo", fingerprint="-", method="uniform", decomposition="svd", budget=0.0,
                     realised_ratio=0.0, params=count_parameters(model), dense_params=0,
                     factorised_layers=sum(r is not None for r in ranks.values()), compressible_layers=len(ranks))
    export_hf(model, tokenizer, ranks, folder, {"ranks": ranks}, card)
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    return loaded.eval()


@torch.no_grad()
def check_same_logits(models: dict, ids: torch.Tensor) -> None:
    """Each model's largest logit difference from the compressed one (the prepared ones must be round-off)."""
    reference = models["compressed"](ids[:, :64], use_cache=False).logits
    for kind in ("prepared", "hf export"):
        if kind in models:
            diff = (models[kind](ids[:, :64], use_cache=False).logits - reference).abs().max().item()
            print(f"{kind}: largest logit difference from compressed {diff:.2e} (logits up to "
                  f"{reference.abs().max().item():.1f})")


def build_models(loaded, ranks: dict, folder: Path | None, random_factors: bool = False) -> dict:
    """dense, compressed, prepared and (with ``folder``) hf export, as separate models."""
    dense = loaded.model
    print(f"dense: {own_memory(dense)} weights copied out of the memory-mapped checkpoint")
    compressed = copy.deepcopy(dense)
    applied = compress_model(compressed, ranks, factor_source(compressed, random_factors))
    prepared = copy.deepcopy(compressed)
    print(f"prepare_for_inference: {prepare_for_inference(prepared)}")
    models = {"dense": dense, "compressed": compressed, "prepared": prepared}
    if folder is not None:
        applied = {l.name: applied.get(l.name) for l in compressible_layers(dense)}
        models["hf export"] = export_and_load(compressed, loaded.tokenizer, applied, folder)
    return models


def width_model(args) -> LoadedModel:
    """The random-weight LLaMA of ``--width`` / ``--depth`` / ``--vocab`` in fp32 (no tokenizer)."""
    w = BENCH_WIDTHS[args.width]
    model = tiny_model("llama", seed=0, vocab_size=args.vocab, hidden_size=w["hidden"],
                       intermediate_size=w["intermediate"], num_hidden_layers=args.depth,
                       num_attention_heads=w["heads"], num_key_value_heads=w["kv"], max_position_embeddings=4096)
    return LoadedModel(model, None, f"random {args.width}-width LLaMA, {args.depth} blocks, vocab {args.vocab}",
                       "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--ratio", type=float, default=0.6, help="kept fraction per layer (rank = int(ratio * eq))")
    parser.add_argument("--plan", default=None, help="take the ranks of this plan instead of --ratio")
    parser.add_argument("--threads", default="1,2", help="CPU thread counts to measure, comma separated")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-export", action="store_true", help="skip the Hugging Face export's model")
    parser.add_argument("--width", choices=sorted(BENCH_WIDTHS), default=None,
                        help="a random-weight LLaMA of these layer widths instead of --model")
    parser.add_argument("--depth", type=int, default=2, help="blocks of the --width model")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary of the --width model")
    parser.add_argument("--no-split", action="store_true", help="skip the per-stage split")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU figure even when a GPU is present")
    args = parser.parse_args()

    print(f"load average at start {os.getloadavg()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    loaded = width_model(args) if args.width else load_model(args.model, device="cpu", dtype=torch.float32)
    if args.plan:
        from lems_core.plan import RankPlan

        ranks = RankPlan.load(args.plan, fingerprint=loaded.fingerprint).ranks()
        label = f"plan {Path(args.plan).name}"
    else:
        ranks = {l.name: max(1, int(args.ratio * l.eq_rank)) for l in compressible_layers(loaded.model)}
        label = f"uniform {args.ratio:g}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = None if args.no_export or loaded.tokenizer is None else Path(tmp) / "hf"
        models = build_models(loaded, ranks, folder, random_factors=bool(args.width))
        params, dense_params = count_parameters(models["compressed"]), count_parameters(models["dense"])
        factorised = sum(isinstance(m, LowRankLinear) for m in models["compressed"].modules())
        print(f"{loaded.source} {label}: {factorised} factorised Linears, {params:,} parameters "
              f"(dense {dense_params:,}, {params / dense_params:.3f}x)")
        g = torch.Generator().manual_seed(0)
        vocab = loaded.model.config.vocab_size
        ids = torch.randint(0, vocab, (1, args.seq_len), generator=g)
        prompt = torch.randint(0, vocab, (1, 32), generator=g)
        check_same_logits(models, ids)
        torch.set_num_threads(1)
        print_products(models)
        if not args.no_split:
            print_stage_split(models, ids, prompt, args.new_tokens)
        for threads in (int(x) for x in args.threads.split(",")):
            torch.set_num_threads(threads)
            t = measure(models, ids, prompt, args.new_tokens, args.repeats)
            report(f"CPU fp32, {torch.get_num_threads()} thread(s)", t, args.seq_len, args.new_tokens)
        if torch.cuda.is_available() and not args.no_gpu:
            for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
                models = {k: m.to("cuda", dtype) for k, m in models.items()}
                t = measure(models, ids.cuda(), prompt.cuda(), args.new_tokens, args.repeats)
                report(f"GPU {name} ({torch.cuda.get_device_name()})", t, args.seq_len, args.new_tokens)
        else:
            print("GPU: none here (run on a CUDA machine for the GPU figure)")


if __name__ == "__main__":
    main()
