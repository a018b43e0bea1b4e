"""ARS: Adaptive Rank Selection (Gao et al., NAACL 2024; methods.md §4.6).

A learned rank allocator. Every compressible Linear W (m x n) is written in its
full (whitened) SVD, W = left @ right with min(m, n) components, and a binary
mask m_l on the components selects which ones are kept. The masks come from a
small hypernetwork: a GRU reads a fixed random input z, one step per layer, and
a per-layer linear head turns the hidden state into one logit per component.
Masks are straight-through Gumbel-sigmoid samples of those logits (hard 0/1
forward with threshold 0.5, sigmoid gradient backward). Only the hypernetwork
trains; the language model and its factors are frozen. The loss (§4.6 step 4) is

    CE(f(x; m)) + lam * log(max(T(m), p T_c) / (p T_c)) + gamma * mean_l ||m_l s_l - m'_l s_l||^2

with T(m_l) = (m_l + n_l) 1^T m_l (capped at m_l n_l: a layer at or above its
break-even rank is stored dense, methods.md §0), T_c the parameters of the
compressible Linears and m'_l the top-k mask with k = 1^T m_l (pushes the mask
toward the singular-value order).

The budget rule follows the reference implementation (sidhantls, methods.md §9
"ARS"; ``main`` at adaptive_rank_selection.py:327-410, train_adaptive.py:273-282):
- p is ``p_param`` = 0.4, not the budget, so the penalty pushes down on both sides
  of the budget; instead lam is 0 for a step whose kept fraction is within 0.002 of
  the target (either side);
- training stops once more than 100 steps ran and the mean kept fraction of the
  last 100 is less than 0.003 above the target (``steps`` is only a cap);
- that kept fraction and target are over the whole model's parameters
  (embeddings, norms and lm_head count as kept). The public budget stays the kept
  fraction of the compressible Linears, as for every allocator here; it is
  translated into the whole-model target (``BudgetTarget``) and both are recorded.
The rule before (preset "cpu-small-legacy", fields ``LEGACY_FIELDS``): p = the
budget (one-sided: no penalty under it), lam always on, a fixed number of steps,
the compressible Linears only, a one-direction GRU.

The final rank of a layer is the sum of its (noise-free) mask, rounded to a
multiple of 8, dense at or above the break-even rank, then repaired
deterministically until the (compressible) budget holds; by default, budget left
unused is spent again; the raw learned ranks stay in the info.

Choices that the paper leaves open, taken from the third-party implementation
LEMS used: tau = 0.4, +3 logit bias (all components start kept, so training
starts from the dense model), threshold 0.5, Adam lr 1e-3, lam = 16, gamma = 10;
one bidirectional GRU over the layers -> LayerNorm -> GELU -> per-layer head. Our
own choices (documented where they are made): the noise-free final mask (noise
replaced by its median), a straight-through budget cap, per-layer normalised
spectra in the alignment term, p_param capped at the budget, and the repair /
fill rules.

Training is minutes on CPU for the demo model (preset "cpu-small") and its
results are cached: in the diskcache index (keyed by profile, decomposition,
ratio and config) and, for the demo, as committed plans under cache/demo/ars/.
The ``ars`` allocator only ever reads those (by default only plans trained under
the reference rule, see ``RULES``); it never trains. ``pipeline.train_ars`` loads
what training needs for a profile (windows, full factors) and calls ``train_ars_on``.
"""
from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..budget import layer_param_cost, params_of, realised_ratio
from ..cache import DEMO_DIR, index, key_of
from ..compression import set_module
from ..decompositions import Factorization
from ..evaluation import check_cancel
from ..model import LayerInfo, LoadedModel
from ..plan import PlanError, RankPlan
from ..profile import Profile
from .base import Allocation, BudgetBelowMinimumError

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
COMMITTED_DIR = DEMO_DIR / "ars"
METHOD = "ars"
CURVE_POINTS = 200  # loss-curve points kept in a plan's meta (the Allocation keeps every step)


# =========================================================================== config
@dataclass(frozen=True)
class ARSConfig:
    """Hyper-parameters of one ARS training run; all of them are part of the cache key."""

    steps: int = 2000  # hypernetwork updates (§4.6 step 5: 2000 for LLMs); with early stopping, a cap
    batch_windows: int = 2  # calibration windows per step (third-party default batch size 2)
    seq_len: int | None = None  # crop windows to this many tokens (None: the calibration length)
    lam: float = 16.0  # weight of the budget penalty R(T(m), p T_c)
    gamma_align: float = 10.0  # weight of the alignment term
    lr: float = 1e-3  # Adam learning rate
    tau: float = 0.4  # Gumbel-sigmoid temperature
    logit_bias: float = 3.0  # added to every logit so training starts with (almost) all components kept
    threshold: float = 0.5  # hard mask = sigmoid(.) > threshold
    noise: str = "gumbel"  # "gumbel" (reference implementation) or "logistic" (binary Concrete)
    z_size: int = 32  # width of the fixed random GRU input
    hidden_size: int = 64  # GRU hidden size
    rank_multiple: int = 8  # final ranks are multiples of this (methods.md §1.4)
    fill_budget: bool = True  # spend budget left unused after training (see fill_to_budget)
    seed: int = 42
    # The budget rule: the reference's (sidhantls, methods.md §9 "ARS"); LEGACY_FIELDS gives the earlier one.
    bidirectional: bool = True  # one bidirectional GRU over the layers (reference); False: one direction
    p_param: float | None = 0.4  # penalty log(max(a, p)/p), a = compressible kept fraction (reference
    #                              --p_param; capped at the budget); None: p = the budget (one-sided)
    budget_scope: str = "model"  # kept fraction of the lam band and early stop: "model" (whole model,
    #                              reference) or "compressible" (the compressible Linears)
    lambda_off_within: float = 0.002  # lam = 0 for a step whose kept fraction is this close to the target (0: never)
    early_stop_window: int = 100  # stop after more than this many steps once their mean kept fraction
    early_stop_tol: float = 0.003  # ... is less than this above the target (reference main); window 0: never

    def __post_init__(self):
        if self.lambda_off_within < 0 or self.early_stop_window < 0 or self.early_stop_tol < 0:
            raise ValueError("lambda_off_within, early_stop_window and early_stop_tol must be >= 0")
        if self.p_param is not None and not 0.0 < self.p_param <= 1.0:
            raise ValueError(f"p_param must lie in (0, 1] or be None, got {self.p_param}")
        if self.budget_scope not in BUDGET_SCOPES:
            raise ValueError(f"budget_scope must be one of {BUDGET_SCOPES}, got {self.budget_scope!r}")

    @property
    def rule(self) -> dict:
        """The budget-rule fields (those of LEGACY_FIELDS) and their values."""
        return {k: getattr(self, k) for k in LEGACY_FIELDS}

    @property
    def rule_name(self) -> str:
        """"reference", "legacy" or "custom": which budget rule (``RULES``) this config trains under."""
        return next((name for name, rule in RULES.items() if rule == self.rule), "custom")

    def to_dict(self) -> dict:
        """All fields, except rule fields at their legacy value (so configs, and cache keys,
        of runs made before these fields existed are unchanged)."""
        d = asdict(self)
        if self.rule_name == "legacy":
            for k in LEGACY_FIELDS:
                del d[k]
        return d

    @staticmethod
    def from_dict(d: dict) -> "ARSConfig":
        """The config of a stored dict; a rule field it lacks (written before the field
        existed) takes its legacy value, the behaviour of the run that wrote it."""
        values = {f.name: d[f.name] for f in fields(ARSConfig) if f.name in d}
        return ARSConfig(**{**LEGACY_FIELDS, **values})


BUDGET_SCOPES = ("model", "compressible")

# The rule before the reference's was followed: one-direction GRU, the penalty against the
# budget itself (one-sided), lam always on, a fixed number of steps, the compressible Linears
# only (preset "cpu-small-legacy", or these overrides). early_stop_tol is unused at window 0.
LEGACY_FIELDS = {"bidirectional": False, "p_param": None, "budget_scope": "compressible",
                 "lambda_off_within": 0.0, "early_stop_window": 0, "early_stop_tol": 0.0015}


def _default_rule() -> dict:
    return {f.name: f.default for f in fields(ARSConfig) if f.name in LEGACY_FIELDS}


# Named budget rules; the ``ars`` allocator serves plans of one rule ("reference" by default).
RULES = {"reference": _default_rule(), "legacy": dict(LEGACY_FIELDS)}


# Presets. "reference": the reference's settings (at most 2000 steps, lr 1e-3, 2 windows).
# "cpu-small": a short run for the demo model (SmolLM2-135M) on a shared 2-core CPU, under the
# reference rule: ~3.5-4.3 s per step at 128 tokens on one thread (6.8 s at 256 tokens; the
# bidirectional GRU adds ~0.08 s at the demo's 210 layers). The 10x higher learning rate makes
# up for the far fewer steps: logits start at +3 and must cross ~-0.37 for a component to be
# dropped, which takes ~15 steps at lr 1e-2 (~150 at 1e-3). Early stopping needs more than
# 100 steps, so a run is 101-200 steps (~6-15 min per ratio on the demo).
# "<name>-legacy": the same settings under the legacy rule; "cpu-small-legacy" is exactly the
# earlier "cpu-small" (80 fixed steps: the committed plans before issue #11), with its cache keys.
_CPU_SMALL = dict(batch_windows=1, seq_len=128, lr=1e-2)
PRESETS = {
    "reference": ARSConfig(),
    "reference-legacy": ARSConfig(**LEGACY_FIELDS),
    "cpu-small": ARSConfig(steps=200, **_CPU_SMALL),
    "cpu-small-legacy": ARSConfig(steps=80, **_CPU_SMALL, **LEGACY_FIELDS),
}


def preset(name: str, **overrides) -> ARSConfig:
    if name not in PRESETS:
        raise ValueError(f"Unknown ARS preset {name!r}: choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# =========================================================================== masks
NOISE_MEDIAN = {"gumbel": -math.log(math.log(2.0)), "logistic": 0.0}


def sample_noise(shape, kind: str, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """Gumbel(0, 1) noise -log(-log u) (the reference implementation's), or logistic
    noise log u - log(1 - u) (the difference of two Gumbels, binary-Concrete form)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype).clamp(1e-6, 1 - 1e-6)
    if kind == "gumbel":
        return -torch.log(-torch.log(u))
    if kind == "logistic":
        return torch.log(u) - torch.log1p(-u)
    raise ValueError(f"noise must be 'gumbel' or 'logistic', got {kind!r}")


def gumbel_sigmoid_mask(logits: torch.Tensor, tau: float, threshold: float,
                        generator: torch.Generator | None, noise: str = "gumbel") -> torch.Tensor:
    """Straight-through Gumbel-sigmoid: hard 0/1 forward, d sigmoid((l+g)/tau) backward.

    With the reference implementation's single Gumbel sample g and the +3 logit bias,
    a component is dropped with probability exp(-e^3) ~ 2e-9, so training starts from
    the dense model; logistic noise would already drop ~5% of all components (top ones
    included) at the first step. Without a generator, g is replaced by the noise's
    median: the deterministic mask keeps exactly the components kept in more than half
    of the samples (used for the final ranks).
    """
    if generator is None:
        noisy = logits + NOISE_MEDIAN[noise]
    else:
        noisy = logits + sample_noise(logits.shape, noise, generator, logits.device, logits.dtype)
    soft = torch.sigmoid(noisy / tau)
    hard = (soft > threshold).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly 0/1 forward (x - x == 0), sigmoid gradient backward


class Hypernetwork(nn.Module):
    """GRU over a fixed random z (one step per layer) + one linear head per layer.

    ``bidirectional`` (the reference's ``Hypernet_GRU``: one bi-GRU for the whole
    network) concatenates both directions' states, so every layer's logits see
    every layer's input. Head l maps the GRU state of step l to one logit per
    singular component of layer l (components = min(m, n): with every mask at 1 the
    masked model is the dense one, since the full whitened SVD is exact).
    ``logit_bias`` is added to all logits.
    """

    def __init__(self, components: list[int], z_size: int, hidden_size: int, logit_bias: float, seed: int,
                 bidirectional: bool = False):
        super().__init__()
        width = hidden_size * (2 if bidirectional else 1)  # both directions' states, concatenated
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(seed)
            self.register_buffer("z", torch.randn(1, len(components), z_size))
            self.gru = nn.GRU(z_size, hidden_size, batch_first=True, bidirectional=bidirectional)
            self.norm = nn.LayerNorm(width)
            self.heads = nn.ModuleList(nn.Linear(width, k) for k in components)
        self.logit_bias = logit_bias

    def forward(self) -> list[torch.Tensor]:
        states, _ = self.gru(self.z)
        states = F.gelu(self.norm(states[0]))
        return [head(states[i]) + self.logit_bias for i, head in enumerate(self.heads)]


def build_hypernetwork(config: ARSConfig, components: list[int]) -> Hypernetwork:
    """The hypernetwork of a run: bidirectional unless the config says otherwise (legacy rule)."""
    return Hypernetwork(components, config.z_size, config.hidden_size, config.logit_bias, config.seed,
                        config.bidirectional)


class MaskedLinear(nn.Module):
    """y = left @ diag(mask) @ right @ x (+ bias), frozen factors, mask set per step.

    Computed in float32 whatever the model dtype (the mask gradient is a sum over
    tokens that fp16 would lose), and cast back to the input dtype.
    """

    def __init__(self, factors: Factorization, bias: torch.Tensor | None, device: torch.device):
        super().__init__()
        self.register_buffer("left", factors.left.detach().float().to(device))
        self.register_buffer("right", factors.right.detach().float().to(device))
        self.register_buffer("bias", None if bias is None else bias.detach().float().to(device))
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x.float(), self.right) * self.mask
        return F.linear(h, self.left, self.bias).to(x.dtype)


@contextlib.contextmanager
def masked_model(model: nn.Module, layers: list[LayerInfo], factors: dict[str, Factorization]):
    """Swap every compressible Linear for a MaskedLinear and freeze the model; undo on exit."""
    device = next(model.parameters()).device
    originals = {l.name: model.get_submodule(l.name) for l in layers}
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    masked = {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for l in layers:
            masked[l.name] = MaskedLinear(factors[l.name], originals[l.name].bias, device)
            set_module(model, l.name, masked[l.name])
        yield [masked[l.name] for l in layers]
    finally:
        for name, module in originals.items():
            set_module(model, name, module)
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(name, True))


# =========================================================================== loss terms
def kept_params(masks: list[torch.Tensor], layers: list[LayerInfo]) -> torch.Tensor:
    """sum_l min((m_l + n_l) 1^T m_l, m_l n_l), differentiable in the masks.

    The cap is straight-through: its value counts a layer past break-even as dense
    (methods.md §0), its gradient is that of the uncapped count. A plain min would
    give layers above break-even (every layer, at the start) no budget gradient at
    all, and nothing would ever be pruned.
    """
    total = masks[0].new_zeros(())
    for mask, l in zip(masks, layers):
        count = (l.out_features + l.in_features) * mask.sum()
        total = total + count - (count - l.params).clamp(min=0).detach()
    return total


def budget_penalty(kept: torch.Tensor, target: float) -> torch.Tensor:
    """R(T, pT_c) = log(max(T, pT_c) / (pT_c)): zero at or under pT_c (§4.6 step 4)."""
    return torch.log((kept / target).clamp(min=1.0))


@dataclass(frozen=True)
class BudgetTarget:
    """One run's budget in both accountings (methods.md §9 "ARS").

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
    """mean_l ||m_l * s_l - m'_l * s_l||^2 with m'_l the top-k mask, k = 1^T m_l (§4.6 step 4).

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


# =========================================================================== training
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
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    budget: BudgetTarget | None = None,
) -> tuple[list[np.ndarray], list[dict]]:
    """Train the hypernetwork; return the final noise-free masks (0/1 per component) and the loss curve.

    No caching, no rounding: this is the optimisation of §4.6 step 4 alone, for at most
    ``config.steps`` steps (fewer when ``budget_reached``). ``budget`` defaults to
    ``budget_target(model, layers, ratio)``.
    """
    check_factors(layers, factors)
    budget = budget or budget_target(model, layers, ratio)  # before the swap: it counts the model's Linears
    device = next(model.parameters()).device
    hyper = build_hypernetwork(config, [factors[l.name].max_rank for l in layers]).to(device)
    optimizer = torch.optim.Adam(hyper.parameters(), lr=config.lr)
    noise = torch.Generator(device=device).manual_seed(config.seed + 1)
    crop = windows[:, : config.seq_len] if config.seq_len else windows
    batches = _Batches(crop, config.batch_windows, config.seed + 2)
    spectra = unit_spectra(factors, layers, device)
    goal = budget.scoped(0.0, config.budget_scope)[1]
    curve = []
    with masked_model(model, layers, factors) as modules:
        for step in range(config.steps):
            check_cancel(cancel)
            record = _train_step(model, hyper, modules, layers, spectra, batches.next().to(device), budget,
                                 config, noise, optimizer)
            curve.append(record)
            if progress:
                progress((step + 1) / config.steps, _step_message(step, config, record))
            if budget_reached(curve, goal, config):
                break
    with torch.no_grad():
        final = [gumbel_sigmoid_mask(lg, config.tau, config.threshold, None, config.noise) for lg in hyper()]
    return [m.cpu().numpy().round().astype(np.int8) for m in final], curve


def _step_message(step: int, config: ARSConfig, record: dict) -> str:
    return (f"ARS step {step + 1}/{config.steps}: loss {record['loss']:.3f}, kept {record['kept_ratio']:.3f} "
            f"(model {record['model_ratio']:.3f})")


def _train_step(model, hyper, modules, layers, spectra, ids, budget, config, noise, optimizer) -> dict:
    """One update of the hypernetwork; returns the step's loss terms and kept fractions."""
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


# =========================================================================== masks -> ranks
def round_rank(layer: LayerInfo, kept: int, multiple: int) -> int | None:
    """Mask sum -> rank: nearest multiple, at least one multiple (or 1), dense at break-even."""
    upper = min(layer.out_features, layer.in_features)
    step = multiple if multiple and multiple <= upper else 1
    rank = min(max(step * int(round(kept / step)), step), upper)
    return None if rank >= layer.eq_rank else rank


def _energy_cumsums(profile: Profile) -> list[np.ndarray]:
    """Per layer: [0, cumulative s_i^2 / sum s^2] (kept energy fraction by rank)."""
    out = []
    for l in profile.layers:
        e = np.asarray(profile.spectra[l.name], np.float64) ** 2
        out.append(np.concatenate([[0.0], np.cumsum(e) / max(e.sum(), 1e-300)]))
    return out


def _next_cut(layer: LayerInfo, rank: int | None, cum: np.ndarray, multiple: int) -> tuple[float, int] | None:
    """(energy lost per parameter saved, new rank) of the next cut of one layer, or None at the minimum.

    A dense layer goes to the largest multiple below its break-even rank; a factorised
    one loses ``multiple`` ranks.
    """
    upper = min(layer.out_features, layer.in_features)
    step = multiple if multiple and multiple <= upper else 1
    if rank is None:
        new = ((layer.eq_rank - 1) // step) * step
    else:
        new = rank - step
    if new < step:
        return None
    saved = layer_param_cost(layer.out_features, layer.in_features, rank) - layer.rank_params(new)
    kept_now = 1.0 if rank is None else cum[rank]
    lost = kept_now - cum[new]
    return lost / max(saved, 1), new


def repair_to_budget(profile: Profile, ranks: dict, ratio: float, multiple: int) -> tuple[dict, int]:
    """Cut ranks until params_of <= ratio * total; returns (ranks, number of cuts).

    Deterministic greedy: always cut the layer whose next cut (``multiple`` ranks, or
    dense -> factorised) loses the least normalised spectral energy (sum s_i^2 / sum s^2
    of the profile's spectrum) per parameter saved; ties go to the earlier layer.
    Raises BudgetBelowMinimumError when every layer is at its minimum rank.
    """
    ranks = dict(ranks)
    budget = ratio * profile.total_params
    excess = params_of(profile, ranks) - budget
    cums = _energy_cumsums(profile)
    heap = []
    for i, l in enumerate(profile.layers):
        cut = _next_cut(l, ranks[l.name], cums[i], multiple)
        if cut:
            heapq.heappush(heap, (cut[0], i, cut[1]))
    cuts = 0
    while excess > budget * 1e-12:
        if not heap:
            raise BudgetBelowMinimumError(METHOD, ratio, realised_ratio(profile, ranks), profile.total_params,
                                          "every layer is at its minimum rank")
        _, i, new = heapq.heappop(heap)
        l = profile.layers[i]
        excess -= layer_param_cost(l.out_features, l.in_features, ranks[l.name]) - l.rank_params(new)
        ranks[l.name] = new
        cuts += 1
        cut = _next_cut(l, new, cums[i], multiple)
        if cut:
            heapq.heappush(heap, (cut[0], i, cut[1]))
    return ranks, cuts


def _next_add(layer: LayerInfo, rank: int | None, cum: np.ndarray, multiple: int) -> tuple[float, int | None, int] | None:
    """(energy gained per parameter, new rank or None = dense, extra params) of the next
    ``multiple`` ranks for a layer, or None when it is already dense."""
    if rank is None:
        return None
    upper = min(layer.out_features, layer.in_features)
    step = multiple if multiple and multiple <= upper else 1
    new = rank + step
    new = None if new >= layer.eq_rank else new
    extra = layer_param_cost(layer.out_features, layer.in_features, new) - layer.rank_params(rank)
    gained = (1.0 if new is None else cum[new]) - cum[rank]
    return gained / max(extra, 1), new, extra


def fill_to_budget(profile: Profile, ranks: dict, ratio: float, multiple: int) -> tuple[dict, int]:
    """Spend budget left over: add ``multiple`` ranks (or go dense) where the most normalised
    energy is gained per parameter, as long as the budget still holds; returns (ranks, adds).

    ARS's budget penalty is one-sided (§4.6 step 4), so a run can end under its budget;
    plans compared at one budget should use it. Deterministic (ties: earlier layer); the
    mirror image of ``repair_to_budget``.
    """
    ranks = dict(ranks)
    room = ratio * profile.total_params - params_of(profile, ranks)
    cums = _energy_cumsums(profile)
    heap = []
    for i, l in enumerate(profile.layers):
        add = _next_add(l, ranks[l.name], cums[i], multiple)
        if add:
            heapq.heappush(heap, (-add[0], i, add[1], add[2]))
    adds = 0
    while heap:
        _, i, new, extra = heapq.heappop(heap)
        if extra > room:
            continue  # does not fit; a smaller step elsewhere may
        l = profile.layers[i]
        ranks[l.name], room, adds = new, room - extra, adds + 1
        add = _next_add(l, new, cums[i], multiple)
        if add:
            heapq.heappush(heap, (-add[0], i, add[1], add[2]))
    return ranks, adds


def allocation_from_masks(profile: Profile, ratio: float, masks: list[np.ndarray], config: ARSConfig,
                          info: dict | None = None, budget: BudgetTarget | None = None) -> Allocation:
    """Ranks = mask sums rounded to multiples (§4.6 step 6), repaired to the budget
    (and, with ``config.fill_budget``, the slack spent); the raw learned ranks and
    ratio stay in ``info`` so the effect of rounding and repair is visible. With the
    run's ``budget``, info also has both accountings: the compressible budget and
    the whole-model target the training used, and the realised whole-model fraction."""
    learned = {l.name: int(m.sum()) for l, m in zip(profile.layers, masks)}
    rounded = {l.name: round_rank(l, learned[l.name], config.rank_multiple) for l in profile.layers}
    ranks, cuts = repair_to_budget(profile, rounded, ratio, config.rank_multiple)
    adds = 0
    if config.fill_budget:
        ranks, adds = fill_to_budget(profile, ranks, ratio, config.rank_multiple)
    info = dict(info or {})
    info.update({
        "learned_ranks": learned,
        "learned_ratio": _ratio_of_sums(profile, learned),
        "rounded_ratio": realised_ratio(profile, rounded),
        "repair_cuts": cuts,
        "fill_adds": adds,
        "params_kept": params_of(profile, ranks),
        "params_total": profile.total_params,
        "realised_ratio": realised_ratio(profile, ranks),
        "dense_layers": sum(r is None for r in ranks.values()),
        "rule": config.rule_name,
        "penalty_p": penalty_ratio(config, ratio),
        "config": config.to_dict(),
    })
    if budget is not None:
        info.update(budget.to_info())
        info["realised_model_ratio"] = budget.model_ratio(params_of(profile, ranks))
    return Allocation(METHOD, ratio, ranks, info=info)


def _ratio_of_sums(profile: Profile, kept: dict[str, int]) -> float:
    """Kept fraction of the raw mask sums (capped at dense), before rounding and repair."""
    total = sum(min(l.rank_params(kept[l.name]), l.params) for l in profile.layers)
    return total / profile.total_params


# =========================================================================== factors
def spectrum_mismatch(profile: Profile, factors: dict[str, Factorization]) -> float:
    """Largest relative difference between the profile's spectra and the factors' (should be ~0)."""
    worst = 0.0
    for l in profile.layers:
        a, b = np.asarray(profile.spectra[l.name]), np.asarray(factors[l.name].sigma)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30)))
    return worst


# =========================================================================== caching
def _ratio_key(ratio: float) -> float:
    return round(float(ratio), 4)


def cache_key(profile: Profile, ratio: float, config: ARSConfig) -> str:
    """Index key of one trained result: profile identity, decomposition, ratio, config."""
    return "ars:" + key_of(profile.key, profile.decomposition, _ratio_key(ratio), config.to_dict())


def latest_key(profile: Profile, ratio: float, rule: str = "reference") -> str:
    """Index key of the most recent result for (profile, ratio) under a budget rule (``RULES``),
    whatever its other settings. The legacy rule keeps the key of the runs made before rules
    existed; a plan read from it is still checked for its rule (``_plan_rule``)."""
    parts = (profile.key, profile.decomposition, _ratio_key(ratio))
    return "ars-latest:" + key_of(*parts) if rule == "legacy" else f"ars-latest-{rule}:" + key_of(*parts)


def committed_plan_path(profile: Profile, ratio: float) -> Path:
    """cache/demo/ars/<fingerprint>-<decomposition>-<ratio>.json (written by bench/ars_demo.py)."""
    return COMMITTED_DIR / f"{profile.fingerprint}-{profile.decomposition}-{_ratio_key(ratio):g}.json"


def allocation_to_plan(profile: Profile, alloc: Allocation) -> RankPlan:
    """The plan of a trained allocation; meta carries the calibration (for evaluation) and ARS info."""
    info = dict(alloc.info)
    curve = info.pop("loss_curve", [])
    info["loss_curve"] = _thin(curve, CURVE_POINTS)
    info["profile_key"] = profile.key
    meta = {"calibration": profile.calibration, "ars": info}
    return alloc.to_plan(profile, meta=meta)


def _thin(curve: list[dict], points: int) -> list[dict]:
    """At most ``points`` evenly spaced records (first and last kept), values rounded."""
    if len(curve) > points:
        idx = np.unique(np.linspace(0, len(curve) - 1, points).round().astype(int))
        curve = [dict(curve[i], step=int(i)) for i in idx]
    return [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in curve]


def allocation_from_plan(plan: RankPlan, ratio: float) -> Allocation:
    info = dict(plan.meta.get("ars") or {})
    info["plan_created"] = plan.created
    return Allocation(METHOD, ratio, plan.ranks(), solve_seconds=float(plan.meta.get("solve_seconds") or 0.0),
                      info=info)


def _store(profile: Profile, ratio: float, config: ARSConfig, plan: RankPlan, cache_dir: Path | None) -> None:
    store = index(cache_dir)
    doc = plan.to_dict()
    store[cache_key(profile, ratio, config)] = doc
    store[latest_key(profile, ratio, config.rule_name)] = doc


def _plan_from_doc(doc: dict, profile: Profile) -> RankPlan:
    return RankPlan.from_json(json.dumps(doc), layers=profile.layers, fingerprint=profile.fingerprint)


def _plan_rule(plan: RankPlan) -> str:
    """The budget rule a plan was trained under (a plan without config: legacy)."""
    return ARSConfig.from_dict((plan.meta.get("ars") or {}).get("config") or {}).rule_name


def _matches(plan: RankPlan, profile: Profile, ratio: float, config: ARSConfig | None, rule: str) -> bool:
    """Whether ``plan`` is this profile's ARS plan at ``ratio``, trained with ``config``
    (or, without one, under ``rule``)."""
    ars = plan.meta.get("ars") or {}
    return (plan.method == METHOD and plan.decomposition == profile.decomposition
            and math.isclose(plan.budget, _ratio_key(ratio), abs_tol=1e-6)
            and ars.get("profile_key") == profile.key
            and (ars.get("config") == config.to_dict() if config else _plan_rule(plan) == rule))


def _indexed_plan(profile: Profile, ratio: float, config: ARSConfig | None, rule: str,
                  cache_dir: Path | None) -> RankPlan | None:
    """The index's plan for ``config`` (exact key) or the latest one under ``rule``; None if absent or invalid."""
    doc = index(cache_dir).get(cache_key(profile, ratio, config) if config else latest_key(profile, ratio, rule))
    if doc is None:
        return None
    try:
        plan = _plan_from_doc(doc, profile)
    except PlanError as exc:
        log.warning("ignoring a cached ARS plan that does not validate: %s", exc)
        return None
    return plan if config or _plan_rule(plan) == rule else None


def cached_ars_plan(profile: Profile, ratio: float, config: ARSConfig | None = None,
                    cache_dir: Path | None = None, rule: str = "reference") -> RankPlan | None:
    """A trained ARS plan for (profile, ratio): from the index, else the committed demo plan, else None.

    With ``config`` only a plan trained with exactly that config is returned; without,
    the most recent one trained under budget rule ``rule`` ("reference" or "legacy",
    see ``RULES``), so plans of the earlier rule are never served as the default.
    Plans are validated against the profile's layers and model.
    """
    if rule not in RULES:
        raise ValueError(f"unknown ARS rule {rule!r}: choose from {sorted(RULES)}")
    plan = _indexed_plan(profile, ratio, config, rule, cache_dir)
    if plan is not None:
        return plan
    path = committed_plan_path(profile, ratio)
    if path.is_file():
        try:
            plan = RankPlan.load(path, layers=profile.layers, fingerprint=profile.fingerprint)
        except PlanError as exc:
            log.warning("ignoring committed ARS plan %s: %s", path, exc)
            return None
        if _matches(plan, profile, ratio, config, rule):
            return plan
    return None


# =========================================================================== entry points
def train_ars_on(
    loaded: LoadedModel,
    profile: Profile,
    ratio: float,
    windows: torch.Tensor,
    factors: dict[str, Factorization],
    config: ARSConfig | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    factor_seconds: float = 0.0,
) -> Allocation:
    """Train ARS for ``profile`` at kept fraction ``ratio`` on ``windows`` with the full ``factors``.

    Runs on the model's device and stores the plan in the cache. ``factors`` must be the
    profile's own full factorisations and ``windows`` its calibration windows (they are
    not part of the cache key); ``pipeline.train_ars`` finds both for a profile and
    returns a cached result without training.
    """
    config = config or PRESETS["reference"]
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio is the kept fraction and must lie in (0, 1], got {ratio}")
    if loaded.fingerprint != profile.fingerprint:
        raise ValueError(f"profile is for model {profile.fingerprint}, loaded model is {loaded.fingerprint}")
    started = time.perf_counter()
    budget = budget_target(loaded.model, profile.layers, ratio)
    masks, curve = train_masks(loaded.model, profile.layers, factors, windows, ratio, config, progress, cancel,
                               budget)
    seconds = time.perf_counter() - started + factor_seconds
    info = {"loss_curve": curve, "seconds": round(seconds, 2), "factor_seconds": round(factor_seconds, 2),
            "train_seconds": round(seconds - factor_seconds, 2), "device": str(loaded.device),
            "steps_run": len(curve), "stopped_early": len(curve) < config.steps,
            "spectrum_mismatch": spectrum_mismatch(profile, factors)}
    alloc = allocation_from_masks(profile, ratio, masks, config, info, budget)
    alloc.solve_seconds = seconds
    _store(profile, ratio, config, allocation_to_plan(profile, alloc), cache_dir)
    return alloc


def allocate_ars(profile: Profile, ratio: float, config: ARSConfig | None = None,
                 cache_dir: Path | None = None, rule: str = "reference") -> Allocation:
    """The ``ars`` allocator: the ranks of a trained (cached or committed) plan; never trains.

    Without ``config``, only plans trained under ``rule`` (default: the reference's) are
    served; ``rule="legacy"`` serves plans of the earlier rule (e.g. cpu-small-legacy).
    """
    plan = cached_ars_plan(profile, ratio, config, cache_dir, rule)
    if plan is None:
        hint = _other_rule_hint(profile, ratio, config, cache_dir, rule)
        raise ValueError(f"no ARS plan trained for ratio {ratio:g}: run `python -m lems_core ars --profile <profile "
                         f"folder> --ratio {ratio:g}` or launch training in the app{hint}")
    return allocation_from_plan(plan, ratio)


def _other_rule_hint(profile: Profile, ratio: float, config: ARSConfig | None, cache_dir: Path | None,
                     rule: str) -> str:
    """A note naming another rule that does have a plan (so a stale plan is findable, not served)."""
    if config is not None:
        return ""
    others = [r for r in RULES if r != rule and cached_ars_plan(profile, ratio, None, cache_dir, r) is not None]
    return f" (a plan trained under the {others[0]} rule exists: rule={others[0]!r} serves it)" if others else ""
