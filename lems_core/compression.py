"""Step 8: replace each planned Linear by two Linears (in -> r -> out), save and reload.

Replacement follows PEFT's pattern: find the parent module and `setattr` the
child, so it works for any architecture whose projections are `nn.Linear`. A
rank at or above the break-even rank floor(mn/(m+n)) keeps the layer dense, unless it
is a `budget.ForcedFactorisedRank` (a plan's `force_factorised` layer, the reference's
rank-eq factorisations): that layer is factorised at its rank.

A saved compressed model is a folder: `config.json` + tokenizer files (so it
loads without the original checkpoint), `ranks.json` (the structure), and
`model.safetensors` (all weights, shared tensors handled by safetensors).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from .budget import is_force_factorised
from .model import LayerInfo, compressible_layers

RANKS_FILE = "ranks.json"
WEIGHTS_FILE = "model.safetensors"
COMPRESSED_SCHEMA = "lems-compressed/1"


class Factors(Protocol):
    """What compression reads of a factorisation (``decompositions.Factorization`` is one).

    A protocol, not an import: the closed-loop decompositions compress blocks with
    this module, so it cannot import them back.
    """

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class LowRankLinear(nn.Module):
    """y = B (A x) + bias, A: in -> rank (no bias), B: rank -> out."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.b = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    @staticmethod
    def from_factors(left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> "LowRankLinear":
        w = like.weight
        # an accelerate-offloaded Linear's weight is a meta tensor: build on its hook's execution device
        hook_device = getattr(getattr(like, "_hf_hook", None), "execution_device", None)
        device = w.device if w.device.type != "meta" else (hook_device if hook_device is not None else left.device)
        module = LowRankLinear(right.shape[1], left.shape[0], left.shape[1], bias is not None, device, w.dtype)
        with torch.no_grad():
            module.a.weight.copy_(right)
            module.b.weight.copy_(left)
            if bias is not None:
                if bias.device.type == "meta":
                    from .offload import materialized  # offload.py sits beside model.py, below this module
                    with materialized(like):
                        module.b.bias.copy_(like.bias)
                else:
                    module.b.bias.copy_(bias)
        return module


def is_dense_rank(layer: LayerInfo, rank: int | None) -> bool:
    """None, or a rank at/above break-even that is not forced factorised, keeps the layer dense."""
    return rank is None or (rank >= layer.eq_rank and not is_force_factorised(rank))


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def compress_model(
    model: nn.Module,
    ranks: dict[str, int | None],
    factorization_of: Callable[[LayerInfo], Factors],
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, int | None]:
    """Replace planned Linears in place; return the ranks actually applied (None = dense).

    `factorization_of(layer)` supplies the factors (from a cache or computed now).
    Unknown layer names are an error, so a plan for another model cannot half-apply;
    so is a rank the factors do not reach (static factors stop at eq_rank), named by layer.
    """
    layers = {l.name: l for l in compressible_layers(model)}
    unknown = sorted(set(ranks) - set(layers))
    if unknown:
        raise KeyError(f"{len(unknown)} planned layers are not in this model, e.g. {unknown[:3]}")
    applied = {}
    for i, (name, rank) in enumerate(ranks.items()):
        layer = layers[name]
        if is_dense_rank(layer, rank):
            applied[name] = None
            continue
        linear = model.get_submodule(name)
        left, right = _factors_at(factorization_of(layer), name, int(rank))
        set_module(model, name, LowRankLinear.from_factors(left, right, linear.bias, linear))
        applied[name] = int(rank)
        if progress:
            progress((i + 1) / len(ranks), f"compressed {name} to rank {rank}")
    return applied


def _factors_at(factors: Factors, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``factors.factors(rank)``, with the layer's name in the error when the rank is out of reach."""
    try:
        return factors.factors(rank)
    except ValueError as exc:
        raise ValueError(f"layer {name}: cannot factorise at rank {rank}: {exc}") from exc


def restore_dense(model: nn.Module, originals: dict[str, nn.Linear]) -> None:
    """Put original Linears back (used by searches that compress, score, then undo)."""
    for name, linear in originals.items():
        set_module(model, name, linear)


def apply_structure(model: nn.Module, ranks: dict[str, int | None]) -> None:
    """Create empty LowRankLinear modules for `ranks` (weights are loaded afterwards)."""
    for name, rank in ranks.items():
        if rank is None:
            continue
        linear = model.get_submodule(name)
        w = linear.weight
        set_module(model, name, LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None, w.device, w.dtype))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_compressed(model: nn.Module, tokenizer, ranks: dict[str, int | None], folder: str | Path, meta: dict | None = None) -> Path:
    """Write config, tokenizer, ranks and weights so the model reloads without recompressing."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # GGUF sources are dequantised in memory
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    doc = {"schema": COMPRESSED_SCHEMA, "ranks": ranks, "meta": meta or {}}
    (folder / RANKS_FILE).write_text(json.dumps(doc, indent=1))
    save_model(model, str(folder / WEIGHTS_FILE))
    return folder


def load_compressed(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """Rebuild a compressed model from `save_compressed` output; returns (model, tokenizer, ranks, meta)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    doc = json.loads((folder / RANKS_FILE).read_text())
    if doc.get("schema") != COMPRESSED_SCHEMA:
        raise ValueError(f"{folder / RANKS_FILE}: not a compressed model (schema {doc.get('schema')!r})")
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device=device)
    model.tie_weights()
    ranks = {k: (None if v is None else int(v)) for k, v in doc["ranks"].items()}
    apply_structure(model, ranks)
    missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=False, device=device)
    missing = [m for m in missing if "rotary_emb" not in m and not _is_tied_to_loaded(model, m, set(missing))]
    if missing or unexpected:
        raise ValueError(f"Weights do not match the saved structure: missing {missing[:3]}, unexpected {unexpected[:3]}")
    _reset_rotary_buffers(model, device)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model, tokenizer, ranks, doc.get("meta", {})


def _is_tied_to_loaded(model: nn.Module, name: str, missing: set[str]) -> bool:
    """safetensors stores a shared tensor once; its other names count as loaded."""
    target = dict(model.named_parameters(remove_duplicate=False)).get(name)
    return target is not None and any(
        p is target and other not in missing for other, p in model.named_parameters(remove_duplicate=False)
    )


def _reset_rotary_buffers(model: nn.Module, device: str) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in the file: rebuild those modules."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            set_module(model, name, type(module)(module.config).to(device))
