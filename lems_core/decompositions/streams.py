"""Block-by-block helpers of the closed-loop methods (SAES-SVD and LC-SVD).

Both walk the decoder blocks in order with two hidden-state streams, FP and
compressed, aligned token by token (docs/reference/other-seed-methods.md §1.3, docs/reference/methods.md §3.3): they read a
module's inputs inside one block and swap planned Linears of a block-local copy for
their factors so the compressed stream sees them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..blocks import BlockInput, run_block
from ..compression import LowRankLinear, is_dense_rank, set_module
from ..model import LayerInfo, compressible_layers
from .base import Factorization, Ranks, check_finite_factors


class _Stop(Exception):
    pass


def layers_by_block(model: nn.Module) -> dict[int, list[LayerInfo]]:
    """The compressible layers of each block, in the model's within-block order."""
    out: dict[int, list[LayerInfo]] = {}
    for layer in compressible_layers(model):
        out.setdefault(layer.block, []).append(layer)
    return out


def relative_name(layer: LayerInfo) -> str:
    """The layer's module name inside its decoder block, e.g. ``self_attn.q_proj``."""
    return layer.name.split(f"layers.{layer.block}.", 1)[1]


def planned_rank(layer: LayerInfo, ranks: Ranks) -> int | None:
    """The rank to factorise at, or None when the plan keeps the layer dense (or omits it)."""
    rank = ranks.get(layer.name)
    return None if is_dense_rank(layer, rank) else int(rank)


@torch.no_grad()
def module_input(block: nn.Module, module_name: str, item: BlockInput) -> torch.Tensor:
    """The input of ``block.<module_name>`` for one batch, as (tokens, features).

    The block runs only up to that module (a pre-hook stops it), so reading the
    inputs of an early group costs a fraction of a block forward.
    """
    box: list[torch.Tensor] = []

    def grab(_module, args):
        box.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        raise _Stop

    handle = block.get_submodule(module_name).register_forward_pre_hook(grab)
    try:
        run_block(block, item)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"block never called {module_name}")
    return box[0]


def replace_with_factors(block: nn.Module, layer: LayerInfo, f: Factorization) -> None:
    """Swap ``layer`` in ``block`` (a block-local copy) for its two-Linear factorisation (finite, or refused)."""
    check_finite_factors(layer.name, f.left, f.right, "closed-loop decomposition")
    name = relative_name(layer)
    linear = block.get_submodule(name)
    set_module(block, name, LowRankLinear.from_factors(f.left, f.right, linear.bias, linear))
