"""LC-SVD: block-collaborative decomposition (docs/reference/other-seed-methods.md §3, reconstructed).

Only the abstract and reviews are available, so almost everything here is the
reconstruction of docs/reference/other-seed-methods.md §3.3 ([RECON]); docs/seed-methods.md lists what is sourced and
what is chosen. Its sensitivity-prior rank search is an allocator (``lcsvd_search``).

[DERIVED] For any invertible whitening S, SVD_r(W S) S^-1 = U_r U_r^T W with U_r the
top-r left singular vectors of W S, so a learnable whitening is a learnable
r-dimensional output subspace. Per block, in order, each planned Linear gets
W_hat = U U^T W (A = U, B = U^T W), U initialised from SVD-LLM (Cholesky of the Gram
of the inputs it sees in this block, inputs coming from the already-compressed
blocks) and trained jointly by Adam on the block-output loss against the FP block's
output on FP hidden states. U is parametrised through QR (U = qr(P).Q), so it stays
orthonormal. Training stops when the loss stops improving (window rule) or at a
step cap; the result is never worse than the initialisation on the calibration
data (checked at the end).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..blocks import BlockInput, advance, capture_block_inputs, run_block
from ..model import LayerInfo, decoder_blocks
from ..statistics import INPUT_GROUP
from .base import Factorization, Progress, Ranks, cholesky_lower
from .streams import layers_by_block, planned_rank, relative_name, replace_with_factors


@dataclass(frozen=True)
class LcOptions:
    """LC-SVD block training knobs ([RECON] defaults, docs/reference/other-seed-methods.md §3.3 steps 4-5).

    The defaults are sized for a CPU: 4 calibration sequences per step and at most 50
    steps per block (a full-batch step on 16 x 512 tokens of a 135M model takes seconds).
    """

    lr: float = 1e-3  # Adam on the subspace parameters
    max_steps: int = 50  # step cap per block (the reconstruction suggests 200-500 on a GPU)
    window: int = 10  # stop when mean loss of the last window improved < tol vs the window before
    tol: float = 1e-3
    batches_per_step: int = 4  # calibration batches per Adam step (mini-batch); 0 = all (full-batch)
    target: str = "fp"  # "fp": FP block on FP hidden states; "local": original block on compressed inputs
    batch_size: int = 1  # calibration sequences per forward

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BlockResult:
    """What training one block produced (for reports and tests)."""

    factors: dict[str, Factorization]
    init_loss: float
    final_loss: float
    steps: int
    kept_init: bool


@torch.no_grad()
def block_input_grams(block: nn.Module, layers: list[LayerInfo], items: list[BlockInput]) -> dict[str, torch.Tensor]:
    """Gram X X^T of each distinct input of ``layers`` (shared by q/k/v and gate/up), fp32 sums."""
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:
        group = INPUT_GROUP[layer.kind]
        if group in grams:
            continue
        module = block.get_submodule(relative_name(layer))
        grams[group] = torch.zeros(layer.in_features, layer.in_features, device=module.weight.device)

        def hook(_m, args, gram=grams[group]):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            gram.addmm_(x.T, x)
        handles.append(module.register_forward_pre_hook(hook))
    try:
        for item in items:
            run_block(block, item)
    finally:
        for h in handles:
            h.remove()
    return {l.name: grams[INPUT_GROUP[l.kind]] for l in layers}


def svd_llm_subspace(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, np.ndarray]:
    """Top-``rank`` left singular vectors of W chol(H) (float64) and the whitened spectrum."""
    w = weight.detach().double()
    u, s, _ = torch.linalg.svd(w @ cholesky_lower(gram.double()), full_matrices=False)
    return u[:, :rank], s.cpu().numpy()


def orthonormal(p: torch.Tensor) -> torch.Tensor:
    """The Q factor of P (reduced QR): an orthonormal basis of span(P)."""
    return torch.linalg.qr(p).Q


def projected_weights(block: nn.Module, layers: list[LayerInfo], subspaces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every parameter of ``block`` (detached), with each planned weight replaced by U U^T W."""
    params = {name: p.detach() for name, p in block.named_parameters()}
    for layer in layers:
        key = f"{relative_name(layer)}.weight"
        u = orthonormal(subspaces[layer.name])
        w = params[key]
        params[key] = (u @ (u.T @ w.to(u.dtype))).to(w.dtype)
    return params


def block_loss(block: nn.Module, params: dict[str, torch.Tensor], items: list[BlockInput], targets: list[torch.Tensor]) -> torch.Tensor:
    """Relative block-output error sum ||Block(X) - Y||^2 / sum ||Y||^2 over ``items``."""
    err, ref = 0.0, 0.0
    for item, target in zip(items, targets):
        out = functional_call(block, params, args=(item.hidden,), kwargs=item.kwargs)
        out = out[0] if isinstance(out, tuple) else out
        err = err + (out.float() - target.float()).pow(2).sum()
        ref += float(target.float().pow(2).sum())
    return err / max(ref, 1e-300)


def _plateaued(history: list[float], window: int, tol: float) -> bool:
    """True when the last window's mean loss improved by less than ``tol`` (relative) on the one before."""
    if len(history) < 2 * window:
        return False
    prev, last = np.mean(history[-2 * window : -window]), np.mean(history[-window:])
    return (prev - last) < tol * abs(prev)


def train_subspaces(block: nn.Module, layers: list[LayerInfo], init: dict[str, torch.Tensor],
                    items: list[BlockInput], targets: list[torch.Tensor], options: LcOptions) -> tuple[dict[str, torch.Tensor], float, float, int, bool]:
    """Adam on the subspace parameters of one block; returns (subspaces, init, final loss, steps, kept_init)."""
    params = {n: u.float().clone().requires_grad_(True) for n, u in init.items()}
    opt = torch.optim.Adam(params.values(), lr=options.lr)
    per_step = options.batches_per_step or len(items)
    full_batch = per_step >= len(items)
    history: list[float] = []
    best = (float("inf"), None)
    steps = 0
    for steps in range(1, options.max_steps + 1):
        start = ((steps - 1) * per_step) % len(items)
        chosen = [(items[(start + j) % len(items)], targets[(start + j) % len(items)]) for j in range(min(per_step, len(items)))]
        with torch.enable_grad():
            loss = block_loss(block, projected_weights(block, layers, params), [c[0] for c in chosen], [c[1] for c in chosen])
            opt.zero_grad()
            loss.backward()
        history.append(loss.item())
        if full_batch and history[-1] < best[0]:  # the loss of the parameters before this step
            best = (history[-1], {n: p.detach().clone() for n, p in params.items()})
        opt.step()
        if _plateaued(history, options.window, options.tol):
            break
    chosen_params = best[1] if full_batch and best[1] is not None else {n: p.detach() for n, p in params.items()}
    with torch.no_grad():
        init_loss = float(block_loss(block, projected_weights(block, layers, {n: u.float() for n, u in init.items()}), items, targets))
        final_loss = float(block_loss(block, projected_weights(block, layers, chosen_params), items, targets))
    if final_loss > init_loss:  # never hand back something worse than SVD-LLM on the calibration data
        return {n: u.float() for n, u in init.items()}, init_loss, init_loss, steps, True
    return chosen_params, init_loss, final_loss, steps, False


def subspace_factorization(weight: torch.Tensor, p: torch.Tensor, sigma: np.ndarray) -> Factorization:
    """Balanced factors of U U^T W: with U^T W = Q S V^T, left = U Q S^1/2, right = S^1/2 V^T."""
    u = orthonormal(p.double())
    q, s, vh = torch.linalg.svd(u.T @ weight.detach().double(), full_matrices=False)
    root = s.sqrt()
    return Factorization(sigma, ((u @ q) * root).float().contiguous(), (root[:, None] * vh).float().contiguous())


def lcsvd_block(block: nn.Module, layers: list[LayerInfo], ranks: Ranks, comp_items: list[BlockInput],
                targets: list[torch.Tensor], options: LcOptions) -> BlockResult:
    """Learn the subspaces of one block's planned layers on (compressed inputs, targets)."""
    planned = [l for l in layers if planned_rank(l, ranks) is not None]
    grams = block_input_grams(block, planned, comp_items)
    init, spectra = {}, {}
    for layer in planned:
        weight = block.get_submodule(relative_name(layer)).weight
        init[layer.name], spectra[layer.name] = svd_llm_subspace(weight, grams[layer.name], planned_rank(layer, ranks))
    subspaces, init_loss, final_loss, steps, kept = train_subspaces(block, planned, init, comp_items, targets, options)
    factors = {l.name: subspace_factorization(block.get_submodule(relative_name(l)).weight, subspaces[l.name], spectra[l.name])
               for l in planned}
    return BlockResult(factors, init_loss, final_loss, steps, kept)


def lcsvd_factorizations(model: nn.Module, ranks: Ranks, calib_ids: torch.Tensor, options: LcOptions = LcOptions(),
                         progress: Progress | None = None) -> tuple[dict[str, Factorization], dict[int, BlockResult]]:
    """LC-SVD factors of every planned layer, block by block, and each block's training record.

    Two streams: FP hidden states (the targets) and compressed ones (the inputs). The
    model is not modified; compressed blocks are block-local copies.
    """
    if options.target not in ("fp", "local"):
        raise ValueError(f"target must be 'fp' or 'local', got {options.target!r}")
    blocks, by_block = decoder_blocks(model), layers_by_block(model)
    fp_items = capture_block_inputs(model, calib_ids, options.batch_size)
    comp_items = list(fp_items)
    factors, records = {}, {}
    for b, block in enumerate(blocks):
        fp_next = advance(block, fp_items)
        layers = [l for l in by_block.get(b, []) if planned_rank(l, ranks) is not None]
        if layers:
            targets = [i.hidden for i in (fp_next if options.target == "fp" else advance(block, comp_items))]
            records[b] = lcsvd_block(block, layers, ranks, comp_items, targets, options)
            factors.update(records[b].factors)
            comp_block = copy.deepcopy(block)
            for layer in layers:
                replace_with_factors(comp_block, layer, records[b].factors[layer.name])
            comp_items = advance(comp_block, comp_items)
            del comp_block
        else:
            comp_items = advance(block, comp_items)
        fp_items = fp_next
        if progress:
            progress((b + 1) / len(blocks), f"LC-SVD: block {b + 1}/{len(blocks)}")
    return factors, records


def factorizations(model: nn.Module, ranks: Ranks, calib_ids: torch.Tensor, options: LcOptions,
                   base_factors: dict[str, Factorization] | None = None,
                   progress: Progress | None = None) -> dict[str, Factorization]:
    """The registry's rank-dependent entry: LC-SVD factors of the planned layers (no base factors used)."""
    return lcsvd_factorizations(model, ranks, calib_ids, options, progress)[0]
