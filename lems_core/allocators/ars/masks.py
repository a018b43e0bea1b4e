"""ARS masks: Gumbel-sigmoid sampling, the GRU hypernetwork that emits the mask logits,
and the masked Linears that apply a mask to a layer's full SVD components."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...compression import set_module
from ...decompositions import Factorization
from ...model import LayerInfo
from .config import ARSConfig


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
