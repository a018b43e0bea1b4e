"""Step 3: per-layer calibration statistics, collected with hooks in one pass.

- Input Gram A = sum_t x_t x_t^T (SVD-LLM, SVD-LLM v2, KFAC's input side),
  computed once per distinct input: q/k/v share one, gate/up share one.
- Per-channel |x| mean and max (ASVD).
- Output-gradient Gram G = mean_batch sum_t g_t g_t^T over the middle tokens with
  per-token norm clipping (KFAC-SVD, docs/reference/methods.md §2.2).
- Row-summed squared weight gradients (FWSVD, docs/reference/methods.md §3.3).

Accumulation is fp32 with `addmm_` over flattened tokens (no per-token loops), on\nthe diagonal and upper blocks of each symmetric Gram only (``add_gram_``).
Input statistics run block by block, so only one block's activations are alive.

Under a memory budget ``iter_block_statistics`` streams both kinds:
blocks are grouped into windows (``memory.plan_windows``); per window one
block-wise backward pass fills the output-gradient Grams of that window's layers
only, and a consumer decomposes and frees each block's Grams before the next
block's are allocated. Every Gram is counted in a ``memory.GramLedger``.
FWSVD's Fisher rows stream the same way (``window_fisher_rows``): the block-wise
backward forms one layer's weight gradient at a time in a hook and reduces it to
its row at once, so no weight ``.grad`` and no whole-model graph is ever alive.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BlockInput, advance, capture_block_inputs, head_logits, run_block
from .memory import INPUT_GROUP, BlockWindow, GramLedger  # INPUT_GROUP: layers of one block that read one input
from .model import LayerInfo, compressible_layers, decoder_blocks
from .run import Progress

GRAM_BLOCK_MIN = 192  # columns per block of a Gram's block rows (add_gram_); at most GRAM_BLOCKS_MAX blocks
GRAM_BLOCKS_MAX = 4
GRAD_CROP = 0.125  # drop this fraction of positions at each end for G (docs/reference/methods.md §2.2)
CLIP_LOW, CLIP_HIGH = 0.1, 10.0  # per-token gradient norm bounds, relative to the sequence mean



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


def gram_blocks(n: int) -> list[tuple[int, int]]:
    """(start, end) column blocks of an n x n Gram: 1 to GRAM_BLOCKS_MAX blocks of at least GRAM_BLOCK_MIN columns."""
    count = max(1, min(GRAM_BLOCKS_MAX, n // GRAM_BLOCK_MIN))
    edges = [round(i * n / count) for i in range(count + 1)]
    return list(zip(edges, edges[1:]))


def add_gram_(gram: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> None:
    """gram += alpha x^T x on the diagonal blocks and above them only (``gram_blocks``); ``mirror_gram_`` completes it.

    x^T x is symmetric, so the blocks below the diagonal are the transposes of those
    above: a Gram of 4 blocks costs 10 block products instead of 16. Each entry is the
    same dot product over the same tokens as in one ``addmm_`` of the whole Gram.
    """
    for start, end in gram_blocks(gram.shape[0]):
        gram[start:end, start:].addmm_(x[:, start:end].T, x[:, start:], alpha=alpha)


def mirror_gram_(gram: torch.Tensor) -> torch.Tensor:
    """Copy the blocks above the diagonal (``add_gram_``) onto those below it; returns ``gram``."""
    for start, end in gram_blocks(gram.shape[0]):
        gram[end:, start:end] = gram[start:end, end:].T
    return gram


class _InputAccumulator:
    def __init__(self, n: int, device, ledger: GramLedger | None = None, key: str = ""):
        self.gram = torch.zeros(n, n, device=device, dtype=torch.float32)
        if ledger is not None:
            ledger.take(key, self.gram)
        self.abs_sum = torch.zeros(n, device=device, dtype=torch.float32)
        self.abs_max = torch.zeros(n, device=device, dtype=torch.float32)
        self.abs_max_sum = torch.zeros(n, device=device, dtype=torch.float32)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        add_gram_(self.gram, x)
        ax = x.abs()
        self.abs_sum += ax.sum(0)
        batch_max = ax.amax(0)
        torch.maximum(self.abs_max, batch_max, out=self.abs_max)
        self.abs_max_sum += batch_max
        self.tokens += x.shape[0]

    def freeze(self) -> InputStats:
        return InputStats(mirror_gram_(self.gram).cpu(), self.abs_sum.cpu(), self.abs_max.cpu(), self.abs_max_sum.cpu(), self.tokens)


def gram_key(block: int, kind: str, name: str) -> str:
    """The ledger key of a Gram: "<block>.A.<input group>" or "<block>.G.<layer name>"."""
    return f"{block}.{kind}.{name}"


def iter_block_input_stats(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 1, progress: Progress | None = None,
    ledger: GramLedger | None = None,
) -> Iterator[tuple[int, dict[str, InputStats]]]:
    """Yield (block index, {layer name: InputStats}) block after block.

    Each block runs on all calibration batches with hooks on its distinct inputs,
    then its outputs become the next block's inputs; a consumer can decompose and
    free a block's statistics before the next is computed (and release them in
    ``ledger``, which counts each input Gram from its allocation).
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
            acc = _InputAccumulator(layer.in_features, items[0].hidden.device, ledger, gram_key(b, "A", group))
            accumulators[group] = acc
            module = model.get_submodule(layer.name)
            handles.append(module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
        try:
            items = advance(block, items)
        finally:
            for h in handles:
                h.remove()
        acc = None  # the loop's last accumulator: once yielded, only the consumer holds a block's Grams
        if progress:
            progress((b + 1) / len(blocks), f"input statistics: block {b + 1}/{len(blocks)}")
        yield b, _hand_over(accumulators, block_layers)


def _hand_over(accumulators: dict, block_layers: list[LayerInfo]) -> dict[str, InputStats]:
    """{layer name: InputStats} of one block, emptying ``accumulators``.

    The generator keeps no reference to a block's Grams once it has yielded them, so
    they die when the consumer drops them (and releases them in its ledger), not when
    the next block's statistics start: otherwise they would stay alive, uncounted,
    through the next window's backward pass and the next block's forward.
    """
    frozen = {g: accumulators.pop(g).freeze() for g in list(accumulators)}
    return {l.name: frozen[INPUT_GROUP[l.kind]] for l in block_layers}


def collect_input_stats(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 1, progress: Progress | None = None) -> dict[str, InputStats]:
    out: dict[str, InputStats] = {}
    for _, stats in iter_block_input_stats(model, input_ids, batch_size, progress):
        out.update(stats)
    return out


def clip_token_norms(g: torch.Tensor) -> torch.Tensor:
    """Rescale each token's gradient into [0.1, 10] x the sequence's mean norm (docs/reference/methods.md §2.2).

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
    return summed_next_token_loss(model(input_ids, use_cache=False).logits, input_ids)


def summed_next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits[:, :-1] against labels[:, 1:], summed (KFAC's loss, from the head's output)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")


def mean_next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits[:, :-1] against labels[:, 1:], averaged: Hugging Face's causal-LM ``loss``."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def collect_grad_grams(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: list[LayerInfo] | None = None,
    batch_size: int = 1,
    crop: float = GRAD_CROP,
    clip: bool = True,
    progress: Progress | None = None,
    ledger: GramLedger | None = None,
) -> dict[str, torch.Tensor]:
    """KFAC output-side factor G per layer: mean over batch of sum_t g_t g_t^T.

    Backpropagates the summed LM loss with the true labels (empirical Fisher). The
    weights do not need gradients: they are switched off for the pass (and restored)
    and the embedding output is made to require grad, so the backward hooks fire and
    only input gradients are formed (no weight-gradient products, no ``.grad``; the
    output gradients, and so G, are the same bits either way).
    """
    return _gradient_pass(model, input_ids, layers, batch_size, crop, clip, progress, ledger, False).grad_gram


def collect_kfac_statistics(model: nn.Module, input_ids: torch.Tensor, layers: list[LayerInfo] | None = None,
                            batch_size: int = 1, progress: Progress | None = None) -> Statistics:
    """KFAC's statistics from one pass over the data: G per layer (``collect_grad_grams``) and ``layers``' input
    statistics, collected by forward pre-hooks (as ``iter_block_input_stats``) during the gradient pass's own
    forward passes: the same inputs summed in the same order, one forward pass over the data fewer."""
    return _gradient_pass(model, input_ids, layers, batch_size, GRAD_CROP, True, progress, None, True)


def _gradient_pass(model: nn.Module, input_ids: torch.Tensor, layers: list[LayerInfo] | None, batch_size: int,
                   crop: float, clip: bool, progress: Progress | None, ledger: GramLedger | None,
                   with_inputs: bool) -> Statistics:
    """G per layer, and with ``with_inputs`` the layers' input statistics from the same forward passes."""
    layers = layers or compressible_layers(model)
    device = next(model.parameters()).device
    grams = _zero_grad_grams(layers, device, ledger)
    handles = _grad_gram_hooks(model, layers, grams, crop, clip)
    accumulators = _input_hooks(model, layers, device, handles) if with_inputs else {}
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
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
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    frozen = {key: acc.freeze() for key, acc in accumulators.items()}
    inputs = {l.name: frozen[(l.block, INPUT_GROUP[l.kind])] for l in layers} if with_inputs else {}
    return Statistics(inputs=inputs, grad_gram={k: mirror_gram_(v).cpu() for k, v in grams.items()})


def _input_hooks(model: nn.Module, layers: list[LayerInfo], device, handles: list) -> dict:
    """Forward pre-hooks accumulating each (block, input group)'s input statistics; appends their handles."""
    accumulators = {}
    for layer in layers:
        key = (layer.block, INPUT_GROUP[layer.kind])
        if key in accumulators:
            continue
        acc = accumulators[key] = _InputAccumulator(layer.in_features, device)
        module = model.get_submodule(layer.name)
        handles.append(module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
    return accumulators


def _zero_grad_grams(layers: list[LayerInfo], device, ledger: GramLedger | None) -> dict[str, torch.Tensor]:
    grams = {}
    for l in layers:
        grams[l.name] = torch.zeros(l.out_features, l.out_features, device=device)
        if ledger is not None:
            ledger.take(gram_key(l.block, "G", l.name), grams[l.name])
    return grams


def _grad_gram_hooks(model: nn.Module, layers: list[LayerInfo], grams: dict[str, torch.Tensor], crop: float,
                     clip: bool) -> list:
    """Full backward hooks that add each layer's cropped, clipped output-gradient Gram into ``grams``
    (its upper blocks: ``mirror_gram_`` each once the pass is over)."""
    def make_hook(name):
        def hook(_module, _grad_in, grad_out):
            g = crop_tokens(grad_out[0].detach().float(), crop)
            if clip:
                g = clip_token_norms(g)
            flat = g.reshape(-1, g.shape[-1])
            add_gram_(grams[name], flat, alpha=1.0 / g.shape[0])
        return hook
    return [model.get_submodule(l.name).register_full_backward_hook(make_hook(l.name)) for l in layers]


def window_grad_grams(
    model: nn.Module, items: list[BlockInput], input_ids: torch.Tensor, layers: list[LayerInfo], batch_size: int = 1,
    crop: float = GRAD_CROP, clip: bool = True, ledger: GramLedger | None = None,
) -> dict[str, torch.Tensor]:
    """G of ``layers`` (all in blocks >= their first block) by a block-wise backward pass.

    ``items`` are the dense inputs of block 0 per batch. Per batch the forward runs
    block by block without autograd, keeping only each block's input; the backward
    then recomputes one block at a time from the loss down to the window's first
    block and hands the input gradient to the block below. Alive at once: the
    window's Grams, one block's autograd graph and the block inputs of one batch
    (B x T x hidden), never the whole model's activations. Cost per window: one
    forward, one recompute + backward of the blocks from the window's first on.
    """
    blocks = decoder_blocks(model)
    first = min(l.block for l in layers)
    device = items[0].hidden.device
    grams = _zero_grad_grams(layers, device, ledger)
    handles = _grad_gram_hooks(model, layers, grams, crop, clip)
    try:
        for i, item in enumerate(items):
            ids = input_ids[i * batch_size : (i + 1) * batch_size].to(device)
            _blockwise_backward(model, blocks, item, ids, first)
    finally:
        for h in handles:
            h.remove()
    for gram in grams.values():
        mirror_gram_(gram)
    return grams


def fisher_batches(input_ids: torch.Tensor, reference_label_shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(model inputs, labels) of FWSVD's loss, as ``collect_fisher_rows`` feeds the model.

    The reference's double shift (docs/reference/methods.md §3.3): inputs ids[:, :-1], labels ids[:, 1:],
    shifted once more by the loss; otherwise the plain next-token loss on ids.
    """
    return (input_ids[:, :-1], input_ids[:, 1:]) if reference_label_shift else (input_ids, input_ids)


def window_fisher_rows(
    model: nn.Module, items: list[BlockInput], labels: torch.Tensor, layers: list[LayerInfo], batch_size: int = 1,
    ledger: GramLedger | None = None,
) -> dict[str, torch.Tensor]:
    """FWSVD's Fisher rows of ``layers`` by the block-wise backward pass: ``collect_fisher_rows``'s values.

    ``items`` are block 0's inputs of the model inputs of ``fisher_batches``, ``labels``
    its labels. Per batch the loss (mean, as Hugging Face's) is backpropagated block by
    block down to the window's first block; a hook forms each layer's weight gradient
    g^T x from its output gradient and its input (kept during the recompute only) and
    reduces it at once to mean over rows of its square. One m x n gradient exists at a
    time and no weight ``.grad`` is allocated; the rows and that transient are counted in
    ``ledger`` (keys "<block>.F.<layer>" and "dW").
    """
    blocks = decoder_blocks(model)
    first = min(l.block for l in layers)
    device = items[0].hidden.device
    sums = {}
    for l in layers:
        sums[l.name] = torch.zeros(l.in_features, device=device)
        if ledger is not None:
            ledger.take(gram_key(l.block, "F", l.name), sums[l.name])
    handles = _fisher_hooks(model, layers, sums, ledger)
    try:
        for i, item in enumerate(items):
            ids = labels[i * batch_size : (i + 1) * batch_size].to(device)
            _blockwise_backward(model, blocks, item, ids, first, mean_next_token_loss)
    finally:
        for h in handles:
            h.remove()
    for row in sums.values():
        row.div_(max(len(items), 1)).sqrt_()
    return sums


def _fisher_hooks(model: nn.Module, layers: list[LayerInfo], sums: dict[str, torch.Tensor],
                  ledger: GramLedger | None) -> list:
    """Hooks adding mean_rows((g^T x)^2) of each layer's batch weight gradient into ``sums``."""
    kept: dict[str, torch.Tensor] = {}

    def keep_input(name):
        def hook(_module, args):
            if torch.is_grad_enabled():  # the recompute, not the no-grad forward of every block
                kept[name] = args[0].detach()
        return hook

    def reduce_gradient(name):
        def hook(_module, _grad_in, grad_out):
            x, g = kept.pop(name), grad_out[0].detach()
            weight_grad = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
            if ledger is not None:
                ledger.take("dW", weight_grad)
            sums[name] += weight_grad.pow_(2).mean(0)
            del weight_grad
            if ledger is not None:
                ledger.release("dW")
        return hook

    handles = []
    for l in layers:
        module = model.get_submodule(l.name)
        handles.append(module.register_forward_pre_hook(keep_input(l.name)))
        handles.append(module.register_full_backward_hook(reduce_gradient(l.name)))
    return handles


def _blockwise_backward(model: nn.Module, blocks: nn.ModuleList, item: BlockInput, ids: torch.Tensor, first: int,
                        loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = summed_next_token_loss) -> None:
    """Backpropagate ``loss_of(logits, ids)`` of one batch down to block ``first``, one block at a time."""
    hidden = [item.hidden]
    with torch.no_grad():
        for block in blocks[:-1]:
            hidden.append(run_block(block, BlockInput(hidden[-1], item.kwargs)))
    upstream = None
    with torch.enable_grad():  # autograd.grad w.r.t. the block input only: no weight .grad is ever allocated
        for b in range(len(blocks) - 1, first - 1, -1):
            x = hidden.pop().detach().requires_grad_(True)
            out = run_block(blocks[b], BlockInput(x, item.kwargs))
            if upstream is None:
                (upstream,) = torch.autograd.grad(loss_of(head_logits(model, out), ids), x)
            else:
                (upstream,) = torch.autograd.grad(out, x, grad_outputs=upstream)
            del out, x


@dataclass
class BlockStatistics:
    """One block's statistics, complete: decompose them, then ``ledger.release_prefix(f"{block}.")``."""

    block: int
    inputs: dict[str, InputStats]
    grad_gram: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)


def iter_block_statistics(
    model: nn.Module, input_ids: torch.Tensor, layers: list[LayerInfo], needs: frozenset[str],
    windows: list[BlockWindow], ledger: GramLedger, batch_size: int = 1, progress: Progress | None = None,
    grad_layers: list[LayerInfo] | None = None,
) -> Iterator[BlockStatistics]:
    """Yield every block's input and output-gradient statistics, window after window.

    For each window, its G's (or FWSVD's Fisher rows) are filled first (one block-wise
    backward pass over the calibration set, hooks on that window's layers only), then
    the input statistics of its blocks are computed one block at a time. The consumer
    must free (and release in ``ledger``) a block's Grams before asking for the next
    block, so live bytes stay within the window's ``gram_bytes``. ``grad_layers``
    (default ``layers``) are the layers whose G or Fisher row is collected (a rank's
    own, under torch.distributed).
    """
    grad_layers = layers if grad_layers is None else grad_layers
    blocks_inputs = iter_block_input_stats(model, input_ids, batch_size, ledger=ledger) if "inputs" in needs else None
    items = capture_block_inputs(model, input_ids, batch_size) if "grads" in needs else None
    fisher_inputs, fisher_labels = fisher_batches(input_ids)
    fisher_items = capture_block_inputs(model, fisher_inputs, batch_size) if "fisher" in needs else None
    total = sum(len(w.blocks) for w in windows)
    done = 0
    for window in windows:
        mine = [l for l in grad_layers if l.block in window.blocks]
        grads = window_grad_grams(model, items, input_ids, mine, batch_size, ledger=ledger) if items and mine else {}
        fisher = (window_fisher_rows(model, fisher_items, fisher_labels, mine, batch_size, ledger)
                  if fisher_items and mine else {})
        for b in window.blocks:
            inputs = {}
            if blocks_inputs is not None:
                got, inputs = next(blocks_inputs)
                assert got == b, (got, b)
            names = [l.name for l in layers if l.block == b]
            yield BlockStatistics(b, inputs, {n: grads.pop(n).cpu() for n in names if n in grads},
                                  {n: fisher.pop(n).cpu() for n in names if n in fisher})
            done += 1
            if progress:
                progress(done / total, f"statistics + decomposition: block {b + 1}/{total}")


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
    ids[:, :-1], labels ids[:, 1:], then HF shifts again, docs/reference/methods.md §3.3); False
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
