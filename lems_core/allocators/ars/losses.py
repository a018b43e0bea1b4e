"""ARS loss terms: the kept-parameter count, the budget penalty and its weight, and the
alignment term that pushes each mask toward the singular-value order (docs/reference/methods.md §4.6 step 4)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...decompositions import Factorization
from ...model import LayerInfo
from .config import ARSConfig


def kept_params(masks: list[torch.Tensor], layers: list[LayerInfo]) -> torch.Tensor:
    """sum_l min((m_l + n_l) 1^T m_l, m_l n_l), differentiable in the masks.

    The cap is straight-through: its value counts a layer past break-even as dense
    (docs/reference/methods.md §0), its gradient is that of the uncapped count. A plain min would
    give layers above break-even (every layer, at the start) no budget gradient at
    all, and nothing would ever be pruned.
    """
    total = masks[0].new_zeros(())
    for mask, l in zip(masks, layers):
        count = (l.out_features + l.in_features) * mask.sum()
        total = total + count - (count - l.params).clamp(min=0).detach()
    return total


def budget_penalty(kept: torch.Tensor, target: float) -> torch.Tensor:
    """R(T, pT_c) = log(max(T, pT_c) / (pT_c)): zero at or under pT_c (docs/reference/methods.md §4.6 step 4)."""
    return torch.log((kept / target).clamp(min=1.0))


@dataclass(frozen=True)
class BudgetTarget:
    """One run's budget in both accountings (docs/reference/methods.md §9 "ARS").

    ``ratio`` is the public budget, the kept fraction of the compressible Linears'
    parameters (``compressible``), as for every allocator. The reference budgets the
    whole model: the ``other`` parameters (embeddings, norms, lm_head, biases) count
    as kept, so a kept count T of the compressible Linears is the whole-model
    fraction (other + T) / (other + compressible). The map is affine and increasing,
    so meeting ``model_target`` means meeting ``ratio``.
    """

    ratio: float
    compressible: int
    other: int

    def model_ratio(self, kept: float) -> float:
        return (self.other + kept) / (self.other + self.compressible)

    @property
    def model_target(self) -> float:
        return self.model_ratio(self.ratio * self.compressible)

    def scoped(self, kept: float, scope: str) -> tuple[float, float]:
        """(kept fraction, target) in ``scope``: "model" or "compressible"."""
        if scope == "model":
            return self.model_ratio(kept), self.model_target
        return kept / self.compressible, self.ratio

    def to_info(self) -> dict:
        return {"budget_compressible": self.ratio, "budget_model": round(self.model_target, 8),
                "params_compressible": self.compressible, "params_other": self.other,
                "params_model": self.compressible + self.other}


def budget_target(model: nn.Module, layers: list[LayerInfo], ratio: float) -> BudgetTarget:
    """The budget of a run on ``model``: its parameters (tied ones once) minus the compressible weights."""
    compressible = sum(l.params for l in layers)
    whole = sum(p.numel() for p in model.parameters())
    return BudgetTarget(ratio, compressible, max(whole - compressible, 0))


def penalty_ratio(config: ARSConfig, ratio: float) -> float:
    """p of the penalty, a compressible kept fraction: the reference's p_param (0.4), capped at
    the budget (our choice: under the budget the reference's penalty would vanish before the
    target is reached), or the budget itself (legacy, ``p_param=None``)."""
    return ratio if config.p_param is None else min(config.p_param, ratio)


def budget_term(kept: torch.Tensor, budget: BudgetTarget, config: ARSConfig) -> tuple[torch.Tensor, float]:
    """(penalty R(T, p T_c), its weight lam) for one step with kept count ``kept``.

    Reference rule (adaptive_rank_selection.py, ``calculate_R_loss`` and ``training_step``):
    p = p_param, so the penalty is positive above *and* below the budget; lam is 0
    while the step's kept fraction (``config.budget_scope``) is within
    ``lambda_off_within`` of the target, on either side. Legacy: p = the budget, lam always on.
    """
    penalty = budget_penalty(kept, penalty_ratio(config, budget.ratio) * budget.compressible)
    now, goal = budget.scoped(kept.item(), config.budget_scope)
    lam = 0.0 if abs(now - goal) < config.lambda_off_within else config.lam
    return penalty, lam


def alignment_loss(masks: list[torch.Tensor], spectra: list[torch.Tensor]) -> torch.Tensor:
    """mean_l ||m_l * s_l - m'_l * s_l||^2 with m'_l the top-k mask, k = 1^T m_l (docs/reference/methods.md §4.6 step 4).

    ``spectra`` are normalised to unit Euclidean norm per layer, so each layer's term
    is the fraction of its spectral energy kept out of order (in [0, 1]) and layers of
    different scale (whitened spectra differ by orders of magnitude) weigh the same.
    """
    total = masks[0].new_zeros(())
    for mask, s in zip(masks, spectra):
        k = int(mask.detach().sum().round().item())
        top = torch.zeros_like(s)
        top[:k] = 1.0
        total = total + ((mask - top) * s).pow(2).sum()
    return total / len(masks)


def unit_spectra(factors: dict[str, Factorization], layers: list[LayerInfo], device) -> list[torch.Tensor]:
    """Each layer's singular values (the masked components) divided by their norm."""
    out = []
    for l in layers:
        f = factors[l.name]
        s = torch.as_tensor(np.asarray(f.sigma[: f.max_rank], dtype=np.float64))
        out.append((s / s.norm().clamp(min=1e-30)).float().to(device))
    return out
