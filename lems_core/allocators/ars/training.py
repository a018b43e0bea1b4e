"""ARS training: the optimisation loop of the hypernetwork (docs/reference/methods.md §4.6 step 4) and its early stop.

No caching and no rounding here; ``train_masks`` returns the final noise-free masks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...decompositions import Factorization
from ...model import LayerInfo
from ...run import DEFAULT_RUN, Run
from .config import ARSConfig
from .losses import BudgetTarget, alignment_loss, budget_target, budget_term, kept_params, unit_spectra
from .masks import build_hypernetwork, gumbel_sigmoid_mask, masked_model


@dataclass
class _Batches:
    """Seeded cycling order over the calibration windows, ``size`` windows per step."""

    windows: torch.Tensor
    size: int
    seed: int

    def __post_init__(self):
        self._gen = torch.Generator().manual_seed(self.seed)
        self._order: list[int] = []

    def next(self) -> torch.Tensor:
        picked = []
        while len(picked) < self.size:
            if not self._order:
                self._order = torch.randperm(self.windows.shape[0], generator=self._gen).tolist()
            picked.append(self._order.pop(0))
        return self.windows[picked]


def check_factors(layers: list[LayerInfo], factors: dict[str, Factorization]) -> None:
    """Every layer needs all min(m, n) components (W exact when every mask is 1)."""
    for l in layers:
        f = factors.get(l.name)
        want = min(l.out_features, l.in_features)
        if f is None or f.max_rank != want:
            got = "none" if f is None else f"{f.max_rank} components"
            raise ValueError(f"ARS needs all {want} components of {l.name} (got {got}): "
                             f"factorise with Decomposer(..., keep=min(m, n))")


def train_masks(
    model: nn.Module,
    layers: list[LayerInfo],
    factors: dict[str, Factorization],
    windows: torch.Tensor,
    ratio: float,
    config: ARSConfig,
    budget: BudgetTarget | None = None,
    *,
    run: Run = DEFAULT_RUN,
) -> tuple[list[np.ndarray], list[dict]]:
    """Train the hypernetwork; return the final noise-free masks (0/1 per component) and the loss curve.

    No caching, no rounding: this is the optimisation of docs/reference/methods.md §4.6 step 4 alone, for at most
    ``config.steps`` steps (fewer when ``budget_reached``). ``budget`` defaults to
    ``budget_target(model, layers, ratio)``.
    """
    check_factors(layers, factors)
    budget = budget or budget_target(model, layers, ratio)  # before the swap: it counts the model's Linears
    device = next(model.parameters()).device
    hyper = build_hypernetwork(config, [factors[l.name].max_rank for l in layers]).to(device)
    state = _Optimisation(hyper, torch.optim.Adam(hyper.parameters(), lr=config.lr),
                          torch.Generator(device=device).manual_seed(config.seed + 1),
                          unit_spectra(factors, layers, device), budget, config)
    crop = windows[:, : config.seq_len] if config.seq_len else windows
    batches = _Batches(crop, config.batch_windows, config.seed + 2)
    goal = budget.scoped(0.0, config.budget_scope)[1]
    curve = []
    with masked_model(model, layers, factors) as modules:
        for step in range(config.steps):
            run.check_cancel()
            record = _train_step(model, modules, layers, batches.next().to(device), state)
            curve.append(record)
            run.report((step + 1) / config.steps, _step_message(step, config, record))
            if budget_reached(curve, goal, config):
                break
    with torch.no_grad():
        final = [gumbel_sigmoid_mask(lg, config.tau, config.threshold, None, config.noise) for lg in hyper()]
    return [m.cpu().numpy().round().astype(np.int8) for m in final], curve


def _step_message(step: int, config: ARSConfig, record: dict) -> str:
    return (f"ARS step {step + 1}/{config.steps}: loss {record['loss']:.3f}, kept {record['kept_ratio']:.3f} "
            f"(model {record['model_ratio']:.3f})")


@dataclass
class _Optimisation:
    """What each training step reads or updates besides the model: the hypernetwork and its optimizer,
    the mask noise, the layers' unit spectra, the budget and the config."""

    hyper: nn.Module
    optimizer: torch.optim.Optimizer
    noise: torch.Generator
    spectra: list[torch.Tensor]
    budget: BudgetTarget
    config: ARSConfig


def _train_step(model: nn.Module, modules: list, layers: list[LayerInfo], ids: torch.Tensor,
                state: _Optimisation) -> dict:
    """One update of the hypernetwork; returns the step's loss terms and kept fractions."""
    hyper, optimizer, noise, spectra, budget, config = (state.hyper, state.optimizer, state.noise, state.spectra,
                                                        state.budget, state.config)
    masks = [gumbel_sigmoid_mask(lg, config.tau, config.threshold, noise, config.noise) for lg in hyper()]
    for module, mask in zip(modules, masks):
        module.mask = mask
    logits = model(ids, use_cache=False).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    kept = kept_params(masks, layers)
    penalty, lam = budget_term(kept, budget, config)
    align = alignment_loss(masks, spectra)
    loss = ce + lam * penalty + config.gamma_align * align
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    for module in modules:
        module.mask = None
    return {"loss": loss.item(), "ce": ce.item(), "budget": penalty.item(), "align": align.item(),
            "kept_ratio": kept.item() / budget.compressible, "model_ratio": budget.model_ratio(kept.item()),
            "lam": lam}


SCOPE_KEYS = {"model": "model_ratio", "compressible": "kept_ratio"}  # loss-curve field of each budget scope


def budget_reached(curve: list[dict], goal: float, config: ARSConfig) -> bool:
    """The reference's early stop (train_adaptive.py:273-282): more than ``early_stop_window``
    steps ran and the mean kept fraction (``config.budget_scope``) of the last that many is
    less than ``early_stop_tol`` above ``goal``, the target in that scope (never with window 0)."""
    window = config.early_stop_window
    if not window or len(curve) <= window:
        return False
    key = SCOPE_KEYS[config.budget_scope]
    return float(np.mean([r[key] for r in curve[-window:]])) - goal < config.early_stop_tol
