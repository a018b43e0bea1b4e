"""LC-SVD: block-collaborative decomposition and a sensitivity-prior rank search.

other-seed-methods.md §3. Only the abstract and reviews are available, so almost
everything here is the reconstruction of §3.3 ([RECON]); docs/seed-methods.md
lists what is sourced and what is chosen.

Decomposition ("lcsvd"). [DERIVED] For any invertible whitening S,
SVD_r(W S) S^-1 = U_r U_r^T W with U_r the top-r left singular vectors of W S, so a
learnable whitening is a learnable r-dimensional output subspace. Per block, in
order, each planned Linear gets W_hat = U U^T W (A = U, B = U^T W), U initialised
from SVD-LLM (Cholesky of the Gram of the inputs it sees in this block, inputs
coming from the already-compressed blocks) and trained jointly by Adam on the
block-output loss against the FP block's output on FP hidden states. U is
parametrised through QR (U = qr(P).Q), so it stays orthonormal. Training stops
when the loss stops improving (window rule) or at a step cap; the result is never
worse than the initialisation on the calibration data (checked at the end).

Rank search ("lcsvd_search"). Block sensitivities from a light uniform compression
of one block at a time (scored by the caller's score_fn), a prior that removes
less from sensitive blocks, Dirichlet samples around the prior projected to the
exact budget, uniform and prior always included, argmin of score_fn. Ratios are
kept fractions (the paper's compression ratio is 1 - kept).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .allocators import Allocation, BudgetBelowMinimumError, _check_ratio, _finish, _finite_score, _rank_at_ratio, _within_budget, realised_ratio
from .blocks import BlockInput, advance, capture_block_inputs, run_block
from .decomposition import Factorization, cholesky_lower
from .erc import block_params
from .model import LayerInfo, decoder_blocks
from .profile import Profile
from .saes import layers_by_block, planned_rank, relative_name, replace_with_factors
from .statistics import INPUT_GROUP

Progress = Callable[[float, str], None]
Ranks = dict[str, "int | None"]


@dataclass(frozen=True)
class LcOptions:
    """LC-SVD block training knobs ([RECON] defaults, §3.3 steps 4-5).

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


# ============================================================ block-collaborative decomposition
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


# ============================================================ sensitivity-prior rank search
def block_keep_ranks(profile: Profile, keep: np.ndarray) -> Ranks:
    """Per-block kept fraction -> ranks int(keep_b * eq) for every matrix of block b."""
    return {l.name: _rank_at_ratio(l, float(keep[l.block])) for l in profile.layers}


def block_sensitivities(profile: Profile, score_fn: Callable[[Ranks], float], light_keep: float = 0.9) -> np.ndarray:
    """log score with only block b compressed uniformly at ``light_keep`` (the rest dense).

    Only differences between blocks matter downstream, so the dense score is not needed.
    """
    scores = []
    for b in range(profile.num_blocks):
        keep = np.ones(profile.num_blocks)
        keep[b] = light_keep
        scores.append(_finite_score(score_fn(block_keep_ranks(profile, keep))))
    return np.log(np.maximum(np.asarray(scores, dtype=np.float64), 1e-300))


def project_to_budget(removed: np.ndarray, weights: np.ndarray, target: float, lo: float, hi: float) -> np.ndarray:
    """clip(removed + t, lo, hi) with the shift t that makes sum(weights * .) = target (bisection)."""
    total = lambda t: float((weights * np.clip(removed + t, lo, hi)).sum())
    a, b = lo - removed.max(), hi - removed.min()
    for _ in range(200):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if total(mid) < target else (a, mid)
    return np.clip(removed + 0.5 * (a + b), lo, hi)


def sensitivity_prior(sens: np.ndarray, ratio: float, weights: np.ndarray, tau: float, lo: float, hi: float) -> np.ndarray:
    """Removed fraction per block: (1 - ratio) w_b / mean(w), w_b = exp(-z_b / tau) with z the
    standardised sensitivities (scale-free for PPL or KL scores), projected to the budget."""
    spread = sens.std()
    z = (sens - sens.mean()) / spread if spread > 0 else np.zeros_like(sens)
    w = np.exp(-z / tau)
    removed = (1.0 - ratio) * w / w.mean()
    return project_to_budget(removed, weights, (1.0 - ratio) * weights.sum(), lo, hi)


def dirichlet_candidates(prior: np.ndarray, weights: np.ndarray, ratio: float, n: int, concentration: float,
                         rng: np.random.Generator, lo: float, hi: float) -> list[np.ndarray]:
    """Samples of the removed parameters' split over blocks, Dirichlet(concentration * N * share),
    mapped back to removed fractions and projected to the exact budget."""
    share = prior * weights / (prior * weights).sum() if (prior * weights).sum() > 0 else weights / weights.sum()
    target = (1.0 - ratio) * weights.sum()
    alpha = concentration * len(share) * share + 1e-3
    return [project_to_budget(s * target / weights, weights, target, lo, hi) for s in rng.dirichlet(alpha, size=n)]


def allocate_lcsvd_search(profile: Profile, ratio: float, score_fn: Callable[[Ranks], float],
                          n_candidates: int = 16, concentration: float = 20.0, light_keep: float = 0.9,
                          tau: float = 1.0, min_keep: float = 0.05, seed: int = 0,
                          sensitivity: np.ndarray | None = None) -> Allocation:
    """LC-SVD error-driven rank search (§3.3 [RECON]): the lowest-scoring candidate wins.

    Candidates: uniform, the sensitivity prior, and ``n_candidates`` seeded Dirichlet
    samples around it; each is a per-block kept fraction in [min_keep, 1] meeting the
    budget exactly before rounding (ranks int(keep * eq) then never exceed it, unless
    the rank-1 floor bites, which makes a candidate infeasible and skipped).
    ``sensitivity`` (one value per block, higher = more sensitive) skips the
    measurement. Duplicate rank sets are scored once.
    """
    ratio = _check_ratio(ratio)
    if ratio < min_keep:
        raise BudgetBelowMinimumError("lcsvd_search", ratio, min_keep, profile.total_params, f"blocks keep at least {min_keep:g}")
    start = time.perf_counter()
    weights = block_params(profile)
    lo, hi = 0.0, 1.0 - min_keep
    sens = np.asarray(sensitivity, dtype=np.float64) if sensitivity is not None else block_sensitivities(profile, score_fn, light_keep)
    if sens.shape != (profile.num_blocks,):
        raise ValueError(f"lcsvd_search: sensitivity needs one value per block ({profile.num_blocks})")
    prior = sensitivity_prior(sens, ratio, weights, tau, lo, hi)
    rng = np.random.default_rng(seed)
    named = [("uniform", np.full(profile.num_blocks, 1.0 - ratio)), ("prior", prior)]
    named += [(f"sample{i}", s) for i, s in enumerate(dirichlet_candidates(prior, weights, ratio, n_candidates, concentration, rng, lo, hi))]
    trials, seen, best = [], {}, None
    for label, removed in named:
        ranks = block_keep_ranks(profile, 1.0 - removed)
        key = tuple(ranks[l.name] for l in profile.layers)
        feasible = _within_budget(profile, ranks, ratio)
        if feasible and key not in seen:
            seen[key] = _finite_score(score_fn(ranks))
        score = seen.get(key) if feasible else None
        trials.append({"candidate": label, "block_keep": [float(x) for x in 1.0 - removed], "feasible": feasible,
                       "score": score, "realised_ratio": realised_ratio(profile, ranks)})
        if feasible and (best is None or score < best[0]):
            best = (score, label, ranks)
    if best is None:  # uniform is infeasible only when the rank-1 floor exceeds the budget
        raise BudgetBelowMinimumError("lcsvd_search", ratio, min(t["realised_ratio"] for t in trials),
                                      profile.total_params, "rank-1 floor on every candidate")
    score, label, ranks = best
    info = {"chosen": label, "sensitivity": [float(s) for s in sens], "prior_keep": [float(x) for x in 1.0 - prior],
            "trials": trials, "seed": seed, "n_candidates": n_candidates, "concentration": concentration,
            "light_keep": light_keep, "tau": tau}
    return _finish(profile, Allocation("lcsvd_search", ratio, ranks, objective=score,
                                       solve_seconds=time.perf_counter() - start, info=info))
