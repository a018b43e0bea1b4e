"""Step 3: per-layer calibration statistics, collected with hooks in one pass.

- Input Gram A = sum_t x_t x_t^T (SVD-LLM, SVD-LLM v2, KFAC's input side),
  computed once per distinct input: q/k/v share one, gate/up share one.
- Per-channel |x| mean and max (ASVD).
- Output-gradient Gram G = mean_batch sum_t g_t g_t^T over the middle tokens with
  per-token norm clipping (KFAC-SVD, methods.md §2.2).
- Row-summed squared weight gradients (FWSVD, methods.md §3.3).

Accumulation is fp32 with `addmm_` over flattened tokens: no per-token loops.
Input statistics run block by block, so only one block's activations are alive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import advance, capture_block_inputs, run_block
from .model import LayerInfo, compressible_layers, decoder_blocks

# Layers of one block that read the same input tensor.
INPUT_GROUP = {"q": "attn", "k": "attn", "v": "attn", "o": "o", "gate": "mlp", "up": "mlp", "down": "down"}

GRAD_CROP = 0.125  # drop this fraction of positions at each end for G (methods.md §2.2)
CLIP_LOW, CLIP_HIGH = 0.1, 10.0  # per-token gradient norm bounds, relative to the sequence mean

Progress = Callable[[float, str], None]


@dataclass
class InputStats:
    """Input statistics of one layer (tensors shared between layers that share an input)."""

    gram: torch.Tensor  # n x n, fp32, sum over tokens
    abs_sum: torch.Tensor  # n, sum over tokens of |x|
    abs_max: torch.Tensor  # n, max over tokens of |x|
    abs_max_sum: torch.Tensor  # n, per-batch max of |x| summed over batches (reference ASVD)
    tokens: int

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class Statistics:
    """Everything the decompositions may need, keyed by layer name."""

    inputs: dict[str, InputStats] = field(default_factory=dict)
    grad_gram: dict[str, torch.Tensor] = field(default_factory=dict)  # m x m (KFAC G)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # n (FWSVD row-summed Fisher)


class _InputAccumulator:
    def __init__(self, n: int, device):
        self.gram = torch.zeros(n, n, device=device, dtype=torch.float32)
        self.abs_sum = torch.zeros(n, device=device, dtype=torch.float32)
        self.abs_max = torch.zeros(n, device=device, dtype=torch.float32)
        self.abs_max_sum = torch.zeros(n, device=device, dtype=torch.float32)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.gram.addmm_(x.T, x)
        ax = x.abs()
        self.abs_sum += ax.sum(0)
        batch_max = ax.amax(0)
        torch.maximum(self.abs_max, batch_max, out=self.abs_max)
        self.abs_max_sum += batch_max
        self.tokens += x.shape[0]

    def freeze(self) -> InputStats:
        return InputStats(self.gram.cpu(), self.abs_sum.cpu(), self.abs_max.cpu(), self.abs_max_sum.cpu(), self.tokens)


def iter_block_input_stats(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 1, progress: Progress | None = None
) -> Iterator[tuple[int, dict[str, InputStats]]]:
    """Yield (block index, {layer name: InputStats}) block after block.

    Each block runs on all calibration batches with hooks on its distinct inputs,
    then its outputs become the next block's inputs; a consumer can decompose and
    free a block's statistics before the next is computed.
    """
    layers = compressible_layers(model)
    blocks = decoder_blocks(model)
    items = capture_block_inputs(model, input_ids, batch_size)
    for b, block in enumerate(blocks):
        block_layers = [l for l in layers if l.block == b]
        accumulators, handles = {}, []
        for layer in block_layers:
            group = INPUT_GROUP[layer.kind]
            if group in accumulators:
                continue
            acc = _InputAccumulator(layer.in_features, items[0].hidden.device)
            accumulators[group] = acc
            module = model.get_submodule(layer.name)
            handles.append(module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
        try:
            items = advance(block, items)
        finally:
            for h in handles:
                h.remove()
        frozen = {g: a.freeze() for g, a in accumulators.items()}
        if progress:
            progress((b + 1) / len(blocks), f"input statistics: block {b + 1}/{len(blocks)}")
        yield b, {l.name: frozen[INPUT_GROUP[l.kind]] for l in block_layers}


def collect_input_stats(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 1, progress: Progress | None = None) -> dict[str, InputStats]:
    out: dict[str, InputStats] = {}
    for _, stats in iter_block_input_stats(model, input_ids, batch_size, progress):
        out.update(stats)
    return out


def clip_token_norms(g: torch.Tensor) -> torch.Tensor:
    """Rescale each token's gradient into [0.1, 10] x the sequence's mean norm (methods.md §2.2).

    g: (B, T, m). The mean is over tokens with non-zero norm; tokens with norm below
    1e-10 are left untouched.
    """
    norms = g.norm(dim=-1, keepdim=True)  # B, T, 1
    live = norms > 1e-10
    mean = (norms * live).sum(1, keepdim=True) / live.sum(1, keepdim=True).clamp(min=1)
    target = norms.clamp(min=CLIP_LOW * mean, max=CLIP_HIGH * mean)
    scale = torch.where(live, target / norms.clamp(min=1e-30), torch.ones_like(norms))
    return g * scale


def crop_tokens(t: torch.Tensor, fraction: float = GRAD_CROP) -> torch.Tensor:
    """Drop floor(fraction * T) positions at each end of the sequence axis (dim 1)."""
    cut = int(fraction * t.shape[1])
    return t[:, cut : t.shape[1] - cut] if cut else t


def summed_lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over positions (the KFAC calibration loss)."""
    logits = model(input_ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="sum")


def collect_grad_grams(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: list[LayerInfo] | None = None,
    batch_size: int = 1,
    crop: float = GRAD_CROP,
    clip: bool = True,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """KFAC output-side factor G per layer: mean over batch of sum_t g_t g_t^T.

    Backpropagates the summed LM loss with the true labels (empirical Fisher). The
    weights do not need gradients: the embedding output is made to require grad so
    the backward hooks fire without allocating weight gradients.
    """
    layers = layers or compressible_layers(model)
    device = next(model.parameters()).device
    grams = {l.name: torch.zeros(l.out_features, l.out_features, device=device) for l in layers}
    handles = []

    def make_hook(name):
        def hook(_module, _grad_in, grad_out):
            g = crop_tokens(grad_out[0].detach().float(), crop)
            if clip:
                g = clip_token_norms(g)
            flat = g.reshape(-1, g.shape[-1])
            grams[name].addmm_(flat.T, flat, alpha=1.0 / g.shape[0])
        return hook

    for layer in layers:
        handles.append(model.get_submodule(layer.name).register_full_backward_hook(make_hook(layer.name)))
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    was_training = model.training
    model.eval()
    try:
        n_batches = (input_ids.shape[0] + batch_size - 1) // batch_size
        for i, start in enumerate(range(0, input_ids.shape[0], batch_size)):
            with torch.enable_grad():
                summed_lm_loss(model, input_ids[start : start + batch_size].to(device)).backward()
            if progress:
                progress((i + 1) / n_batches, f"gradient statistics: batch {i + 1}/{n_batches}")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: v.cpu() for k, v in grams.items()}


def collect_fisher_rows(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: list[LayerInfo] | None = None,
    batch_size: int = 1,
    reference_label_shift: bool = True,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """FWSVD per-input-column importance: sqrt(mean over batches of mean_rows (dL/dW)^2).

    `reference_label_shift=True` reproduces the reference's double shift (inputs
    ids[:, :-1], labels ids[:, 1:], then HF shifts again, methods.md §3.3); False
    uses the plain next-token loss.
    """
    layers = layers or compressible_layers(model)
    device = next(model.parameters()).device
    modules = {l.name: model.get_submodule(l.name) for l in layers}
    sums = {name: torch.zeros(m.in_features, device=device) for name, m in modules.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
    n_batches = 0
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            with torch.enable_grad():
                if reference_label_shift:
                    loss = model(ids[:, :-1], labels=ids[:, 1:], use_cache=False).loss
                else:
                    loss = model(ids, labels=ids, use_cache=False).loss
                loss.backward()
            for name, m in modules.items():
                sums[name] += m.weight.grad.float().pow(2).mean(0)
                m.weight.grad = None
            n_batches += 1
            if progress:
                progress(n_batches / ((input_ids.shape[0] + batch_size - 1) // batch_size), "Fisher statistics")
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {name: (s / max(n_batches, 1)).sqrt().cpu() for name, s in sums.items()}
