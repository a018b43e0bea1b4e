"""Run a decoder stack one block at a time.

Capturing the hidden state that enters block 0 (plus the keyword arguments the
model passes every block: position embeddings, masks) lets later steps run any
suffix of the stack without re-running the prefix: block-wise statistics keep
memory bounded, and the per-layer KL sweep runs only the blocks from the
perturbed one onward.

The captured hidden states are a plain list on the device, or a
``BlockInputStore`` that keeps them in CPU RAM or memory-mapped in a temporary
file and brings them to the device a chunk at a time, within a byte budget
counted in a ``memory.GramLedger`` (``InputPlacement``, ``plan_input_placement``).
``advance`` and ``iter_logits_from_block`` take either. A ``TensorShelf`` keeps the
dense reference logits of the KL measurements the same way (device, CPU RAM or disk,
``place_off_device``).
"""
from __future__ import annotations

import math
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np
import torch
from torch import nn

from .memory import GramLedger, MemoryBudgetError, budget_or_default, format_bytes
from .model import decoder_blocks

PLACES = ("device", "cpu", "disk")
_NUMPY_OF_SIZE = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}  # raw storage; viewed back as the torch dtype


class _Stop(Exception):
    pass


@dataclass
class BlockInput:
    """The hidden state entering a block for one batch, and the block's keyword arguments."""

    hidden: torch.Tensor
    kwargs: dict


@dataclass(frozen=True)
class InputPlacement:
    """Where block inputs wait between uses, and how many of their bytes the device may hold at once.

    ``where``: "device" keeps every batch on the device (a plain list);
    "cpu" keeps them in RAM; "disk" memory-maps them from a temporary file under
    ``folder`` (default: the system's temporary folder), removed with the store.
    ``budget`` (bytes, off the device only; None: unbounded) bounds the block inputs on
    the device at once: one chunk of batches plus the one batch being written back.
    """

    where: str = "device"
    budget: int | None = None
    folder: str | Path | None = None

    def __post_init__(self):
        if self.where not in PLACES:
            raise ValueError(f"block inputs go to one of {', '.join(PLACES)}, not {self.where!r}")
        if self.budget is not None and self.budget <= 0:
            raise MemoryBudgetError(f"block-input budget must be positive, got {self.budget}")


def block_input_bytes(model: nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the hidden states entering one block for ``input_ids`` (tokens x hidden in the model's dtype)."""
    embed = model.get_input_embeddings().weight
    return input_ids.numel() * int(model.config.hidden_size) * embed.element_size()


def plan_input_placement(model: nn.Module, input_ids: torch.Tensor, max_memory: int | None, device,
                         folder: str | Path | None = None) -> InputPlacement:
    """On the device when the two sets of block inputs alive in ``advance`` fit ``max_memory``
    (default: DEFAULT_FRACTION of what the device has free); otherwise in CPU RAM when the
    device is a GPU, or memory-mapped on disk when the device is the CPU itself, with
    ``max_memory`` as the budget of what comes to the device at once."""
    budget = budget_or_default(max_memory, device)
    if 2 * block_input_bytes(model, input_ids) <= budget:
        return InputPlacement("device")
    return InputPlacement("cpu" if torch.device(device).type == "cuda" else "disk", budget, folder)


def _temporary_folder(owner, prefix: str, parent: str | Path | None) -> Path:
    """A new temporary folder under ``parent`` (default: the system's), removed when ``owner`` is collected."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    weakref.finalize(owner, shutil.rmtree, folder, ignore_errors=True)
    return folder


def memmap_tensor(path: Path, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor of ``numel`` elements backed by a new memory-mapped file at ``path``."""
    raw = np.memmap(path, dtype=_NUMPY_OF_SIZE[dtype.itemsize], mode="w+", shape=(max(numel, 1),))
    return torch.from_numpy(raw).view(dtype)[:numel]


def place_off_device(nbytes: int, device, max_memory: int | None) -> str:
    """Where ``nbytes`` of kept tensors (the dense reference logits) wait: "device" when they fit
    ``max_memory`` (default: DEFAULT_FRACTION of what the device has free); else "cpu" for a GPU
    device when they fit the CPU RAM's default budget; else "disk" (memory-mapped)."""
    return "device" if nbytes <= budget_or_default(max_memory, device) else home_off_device(nbytes, device)


def home_off_device(nbytes: int, device) -> str:
    """Where ``nbytes`` kept off the device wait: CPU RAM for a GPU device when they fit its default
    budget, else memory-mapped on disk (the device's own memory is the CPU's, or RAM is short)."""
    return "cpu" if torch.device(device).type == "cuda" and nbytes <= budget_or_default(None, "cpu") else "disk"


class TensorShelf:
    """Tensors kept, once written, on the device, in CPU RAM or memory-mapped on disk.

    The dense reference logits of the KL measurements live here: they grow with the
    search tokens x the vocabulary (16 GB in bf16 for Llama-3's reference preset), not
    with the model, and a disk shelf keeps them out of RAM altogether. ``append``
    returns the kept tensor ("device": the tensor itself, "disk": a view of its file);
    readers bring one to the device with ``.to(device)``. A disk shelf's folder goes when the shelf does.
    """

    def __init__(self, where: str, folder: str | Path | None = None):
        if where not in PLACES:
            raise ValueError(f"tensors are kept on one of {', '.join(PLACES)}, not {where!r}")
        self.where, self._parent = where, folder
        self._kept: list[torch.Tensor] = []
        self._folder: Path | None = None

    def append(self, tensor: torch.Tensor) -> torch.Tensor:
        """Keep ``tensor`` ("device": where it is, "cpu": a copy in RAM, "disk": a copy in its own file)."""
        if self.where == "device":
            kept = tensor.detach()
        elif self.where == "cpu":
            kept = tensor.detach().to("cpu")
        else:
            if self._folder is None:
                self._folder = _temporary_folder(self, "lems-logits-", self._parent)
            flat = memmap_tensor(self._folder / f"{len(self._kept)}.bin", tensor.numel(), tensor.dtype)
            kept = flat.view(tensor.shape)
            kept.copy_(tensor.detach())
        self._kept.append(kept)
        return kept

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._kept[i]

    def __len__(self) -> int:
        return len(self._kept)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._kept)


class BlockInputStore:
    """The hidden states entering one block, one per batch, kept in CPU RAM or memory-mapped on disk.

    ``put`` writes a batch off the device; ``chunks`` brings consecutive batches back a
    chunk at a time (at most ``capacity`` bytes) and counts them in ``ledger`` while
    they are there, so the device never holds more than the placement's budget of
    block inputs: one chunk, plus the batch ``put`` is writing. The keyword arguments
    of each batch (position embeddings, masks) stay on the device as captured.
    """

    def __init__(self, rows: list[int], seq_len: int, placement: InputPlacement, device,
                 ledger: GramLedger | None = None):
        if placement.where == "device":
            raise ValueError("a BlockInputStore keeps inputs off the device; use a list for 'device'")
        self.rows, self.seq_len, self.placement = list(rows), int(seq_len), placement
        self.device = torch.device(device)
        self.ledger = ledger if ledger is not None else GramLedger(limit=placement.budget, what="block input")
        self.kwargs: list[dict | None] = [None] * len(self.rows)
        self._data: torch.Tensor | None = None  # flat storage of every batch, allocated on the first put
        self._row_shape: tuple[int, ...] = ()
        self._dtype: torch.dtype | None = None

    def __len__(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ storage
    def _allocate(self, hidden: torch.Tensor) -> None:
        self._row_shape, self._dtype = tuple(hidden.shape[1:]), hidden.dtype
        total = sum(self.rows) * math.prod(self._row_shape)
        if self.placement.where == "cpu":
            self._data = torch.empty(total, dtype=hidden.dtype)
            return
        folder = _temporary_folder(self, "lems-block-inputs-", self.placement.folder)
        self._data = memmap_tensor(folder / "hidden.bin", total, hidden.dtype)

    def _view(self, i: int) -> torch.Tensor:
        per_row = math.prod(self._row_shape)
        start = sum(self.rows[:i]) * per_row
        return self._data[start : start + self.rows[i] * per_row].view(self.rows[i], *self._row_shape)

    def batch_bytes(self, i: int) -> int:
        """Bytes of batch ``i`` (known once the first batch was put)."""
        return self.rows[i] * math.prod(self._row_shape) * self._dtype.itemsize

    @property
    def capacity(self) -> int | None:
        """Bytes of one chunk: the budget less room for the largest batch being written back."""
        if self.placement.budget is None:
            return None
        largest = max(self.batch_bytes(i) for i in range(len(self)))
        room = self.placement.budget - largest
        if room < largest:
            raise MemoryBudgetError(
                f"memory budget {format_bytes(self.placement.budget)} is below two batches of block inputs "
                f"({format_bytes(2 * largest)}); raise --max-memory or lower the search batch size")
        return room

    def put(self, i: int, hidden: torch.Tensor, kwargs: dict) -> None:
        """Write batch ``i`` off the device (counted in the ledger while it is copied)."""
        if self._data is None:
            self._allocate(hidden)
            _ = self.capacity  # a budget below two batches fails here, with its own message
        self.ledger.take("written", hidden)
        try:
            self._view(i).copy_(hidden.detach())
        finally:
            self.ledger.release("written")
        self.kwargs[i] = kwargs

    # ------------------------------------------------------------------ reading back
    def chunks(self) -> Iterator[list[BlockInput]]:
        """Consecutive batches on the device, ``capacity`` bytes at most per chunk, in order."""
        capacity, i = self.capacity, 0
        while i < len(self):
            end, size = i, 0
            while end < len(self) and (capacity is None or end == i or size + self.batch_bytes(end) <= capacity):
                size += self.batch_bytes(end)
                end += 1
            chunk = []
            try:
                for j in range(i, end):
                    hidden = self._view(j).to(self.device, copy=True)
                    chunk.append(BlockInput(self.ledger.take(f"batch.{j}", hidden), self.kwargs[j]))
                yield chunk
            finally:
                del chunk
                for j in range(i, end):
                    self.ledger.release(f"batch.{j}")
            i = end

    def empty_like(self) -> "BlockInputStore":
        """A store of the same batches and placement, sharing this one's ledger (the next block's inputs)."""
        return BlockInputStore(self.rows, self.seq_len, self.placement, self.device, self.ledger)

    def advance(self, block: nn.Module) -> "BlockInputStore":
        """The next block's inputs: ``block`` applied to every batch, written to a new store."""
        out = self.empty_like()
        index = 0
        with torch.no_grad():
            for chunk in self.chunks():
                for item in chunk:
                    out.put(index, run_block(block, item), item.kwargs)
                    index += 1
        return out


BlockInputs = Union[list[BlockInput], BlockInputStore]


def _capture(model: nn.Module, input_ids: torch.Tensor, batch_size: int,
             sink: Callable[[int, torch.Tensor, dict], None]) -> None:
    """Run the model up to block 0 on every batch and hand its input to ``sink(batch, hidden, kwargs)``."""
    first = decoder_blocks(model)[0]
    batch = [0]

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        sink(batch[0], hidden.detach(), kwargs)
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for index, start in enumerate(range(0, input_ids.shape[0], batch_size)):
                batch[0] = index
                try:
                    model(input_ids[start : start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()


def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 1) -> list[BlockInput]:
    """Hidden states entering block 0, one entry per batch of `input_ids`, on the device."""
    captured: list[BlockInput] = []
    _capture(model, input_ids, batch_size, lambda _i, hidden, kwargs: captured.append(BlockInput(hidden, kwargs)))
    return captured


def capture_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 1,
                   placement: InputPlacement | None = None, ledger: GramLedger | None = None) -> BlockInputs:
    """Block 0's inputs where ``placement`` says: a list on the device, or a ``BlockInputStore``."""
    if placement is None or placement.where == "device":
        return capture_block_inputs(model, input_ids, batch_size)
    rows = [min(batch_size, input_ids.shape[0] - s) for s in range(0, input_ids.shape[0], batch_size)]
    store = BlockInputStore(rows, input_ids.shape[1], placement, next(model.parameters()).device, ledger)
    _capture(model, input_ids, batch_size, store.put)
    return store


def sequence_length(items: BlockInputs) -> int:
    """Tokens per sequence of the captured batches."""
    return items.seq_len if isinstance(items, BlockInputStore) else items[0].hidden.shape[1]


def _chunks(items: BlockInputs) -> Iterator[list[BlockInput]]:
    if isinstance(items, BlockInputStore):
        yield from items.chunks()
    else:
        yield items


def run_block(block: nn.Module, item: BlockInput) -> torch.Tensor:
    """Apply one decoder block; supports blocks that return a tensor or a tuple."""
    out = block(item.hidden, **item.kwargs)
    return out[0] if isinstance(out, tuple) else out


def advance(block: nn.Module, items: BlockInputs) -> BlockInputs:
    """The inputs of the next block: this block applied to every batch (a new store for a store)."""
    if isinstance(items, BlockInputStore):
        return items.advance(block)
    with torch.no_grad():
        return [BlockInput(run_block(block, item), item.kwargs) for item in items]


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + lm_head on the last block's output."""
    inner = getattr(model, "model", model)
    return model.lm_head(inner.norm(hidden))


def iter_logits_from_block(model: nn.Module, start: int, items: BlockInputs,
                           first_position: int = 0) -> Iterator[torch.Tensor]:
    """Logits of each batch in turn, running blocks `start..end` on their cached inputs.

    Only positions from `first_position` on go through the head (the KL skips the
    first eighth, and the vocabulary projection is a large part of a small model).
    One batch's logits at a time: a consumer that reduces them at once never holds
    every batch's (n x T x vocabulary) on the device.
    """
    blocks = decoder_blocks(model)
    with torch.no_grad():
        for chunk in _chunks(items):
            for item in chunk:
                hidden = item.hidden
                for block in blocks[start:]:
                    hidden = run_block(block, BlockInput(hidden, item.kwargs))
                yield head_logits(model, hidden[:, first_position:])


def logits_from_block(model: nn.Module, start: int, items: BlockInputs, first_position: int = 0) -> list[torch.Tensor]:
    """Every batch's logits as a list (``iter_logits_from_block``)."""
    return list(iter_logits_from_block(model, start, items, first_position))
