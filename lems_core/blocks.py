"""Run a decoder stack one block at a time.

Capturing the hidden state that enters block 0 (plus the keyword arguments the
model passes every block: position embeddings, masks) lets later steps run any
suffix of the stack without re-running the prefix: block-wise statistics keep
memory bounded, and the per-layer KL sweep runs only the blocks from the
perturbed one onward (issue #3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .model import decoder_blocks


class _Stop(Exception):
    pass


@dataclass
class BlockInput:
    """The hidden state entering a block for one batch, and the block's keyword arguments."""

    hidden: torch.Tensor
    kwargs: dict


def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 1) -> list[BlockInput]:
    """Hidden states entering block 0, one entry per batch of `input_ids`."""
    first = decoder_blocks(model)[0]
    captured: list[BlockInput] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        captured.append(BlockInput(hidden.detach(), kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                try:
                    model(input_ids[start : start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, item: BlockInput) -> torch.Tensor:
    """Apply one decoder block; supports blocks that return a tensor or a tuple."""
    out = block(item.hidden, **item.kwargs)
    return out[0] if isinstance(out, tuple) else out


def advance(block: nn.Module, items: list[BlockInput]) -> list[BlockInput]:
    """The inputs of the next block: this block applied to every batch."""
    with torch.no_grad():
        return [BlockInput(run_block(block, item), item.kwargs) for item in items]


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + lm_head on the last block's output."""
    inner = getattr(model, "model", model)
    return model.lm_head(inner.norm(hidden))


def logits_from_block(model: nn.Module, start: int, items: list[BlockInput], first_position: int = 0) -> list[torch.Tensor]:
    """Logits of every batch, running blocks `start..end` on their cached inputs.

    Only positions from `first_position` on go through the head (the KL skips the
    first eighth, and the vocabulary projection is a large part of a small model).
    """
    blocks = decoder_blocks(model)
    outputs = []
    with torch.no_grad():
        for item in items:
            hidden = item.hidden
            for block in blocks[start:]:
                hidden = run_block(block, BlockInput(hidden, item.kwargs))
            outputs.append(head_logits(model, hidden[:, first_position:]))
    return outputs
