"""Memory budgets: how many bytes the statistics may hold, and the accounting that enforces it.

A profile build's memory is dominated by the Gram matrices: 4 input Grams
per block (q/k/v and gate/up share one) and, for KFAC, one output-gradient Gram per
layer. Everything else (weights, activations of a few calibration windows, the
decomposition's float64 work arrays for one layer) is bounded by one block.

``plan_windows`` groups consecutive blocks into windows whose Grams fit a budget;
``GramLedger`` counts the live Gram bytes as the statistics code allocates and
frees them, so a test can check the budget through the code's own accounting.
FWSVD's Fisher rows (n floats per layer) and the one weight gradient each row is
reduced from (m x n, one layer at a time) are counted the same way. The KL sweep's
block inputs brought to the device are counted in a ``GramLedger`` of their own
(``what="block input"``, ``blocks.BlockInputStore``).
"""
from __future__ import annotations

import ctypes
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from .model import LayerInfo

FP32 = 4  # bytes per Gram entry (statistics accumulate in float32)
DEFAULT_FRACTION = 0.8  # of the device's free memory, when no budget is given
INPUT_GROUP = {"q": "attn", "k": "attn", "v": "attn", "o": "o", "gate": "mlp", "up": "mlp", "down": "down"}
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}
MAX_MEMORY_BYTES = 1 << 60  # 1 EiB: a larger "budget" is a typo, and would overflow the float arithmetic
MAX_SIZE_CHARS = 40  # a memory size written longer than this is not one


class MemoryBudgetError(ValueError):
    """A budget that cannot be parsed, or one too small for a single block's statistics."""


def parse_bytes(text: str | int | float) -> int:
    """'24GB', '512MiB', '1.5G' or a plain number of bytes -> bytes (binary units: 1 GB = 2^30).

    Binary units match what torch.cuda and /proc/meminfo report, so '80GB' on an
    80 GB card means the card.
    """
    if isinstance(text, (int, float)):
        number, scale = text, 1
    else:
        if len(str(text)) > MAX_SIZE_CHARS:
            raise MemoryBudgetError(f"memory size {str(text)[:MAX_SIZE_CHARS]!r}… is too long to be one")
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _UNITS:
            raise MemoryBudgetError(f"cannot read memory size {text!r}: use e.g. 24GB, 512MB or a number of bytes")
        number, scale = float(match.group(1)), _UNITS[unit]
    if not number * scale <= MAX_MEMORY_BYTES:  # also inf and nan; an int too large for a float is caught the same way
        raise MemoryBudgetError(f"memory size {str(text)[:MAX_SIZE_CHARS]!r} must be a finite size of at most 1 EiB")
    value = int(number * scale)
    if value <= 0:
        raise MemoryBudgetError(f"memory budget must be positive, got {text!r}")
    return value


def format_bytes(n: int | float) -> str:
    """Bytes as a short binary-unit string (1.50 GB)."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def available_memory(device: str | torch.device) -> int:
    """What the device has: free CUDA memory on a GPU, MemAvailable (else total RAM) on CPU.

    The default budget when the user gives none.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def budget_or_default(max_memory: int | None, device: str | torch.device) -> int:
    """``max_memory``, or DEFAULT_FRACTION of what ``device`` has free when no budget is given."""
    return int(max_memory if max_memory is not None else DEFAULT_FRACTION * available_memory(device))


def process_overhead(model: torch.nn.Module, device: str | torch.device) -> int:
    """Bytes this process already holds beyond the model's weights, when the budget is CPU RAM (else 0).

    RssAnon (the interpreter, torch, the tokenizer, anything alive) less the weights held
    in anonymous memory. Weights memory-mapped from their safetensors files (how
    transformers loads a folder) are file-backed pages, not RssAnon, so only the
    parameters outside such mappings are subtracted. A budget given as memory beyond the
    weights sets this aside before the ledgers get theirs, so the process as a whole stays
    under it (docs/scale.md). Not Linux, or a CUDA budget: 0 (the CUDA context is outside
    torch's allocator and outside the budget).
    """
    if torch.device(device).type != "cpu":
        return 0
    mapped = file_mappings()
    anon_weights = sum(p.numel() * p.element_size() for p in model.parameters()
                       if p.device.type == "cpu" and not _inside(p.data_ptr(), mapped))
    return max(0, status_bytes("RssAnon") - anon_weights)


HEAP_MMAP_THRESHOLD = 1 << 20  # bytes: allocations from this size on get pages of their own under a CPU budget
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def release_freed_memory(device: str | torch.device, threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Make freed tensors of ``threshold`` bytes or more go back to the OS at once (glibc; else a no-op).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MB), so a
    budgeted build's freed Grams, factors and work arrays under that size land in the
    heap, where the holes they leave stay resident: 50-150 MB of free heap at quarter
    width, more in the runs that happen to fragment worst, which makes the peak creep
    up with depth. A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``, which also stops
    its adjustment) gives each such allocation its own mapping, unmapped on free.
    Only when the budget is CPU RAM; returns whether the setting took.
    """
    if torch.device(device).type != "cpu":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def status_bytes(field: str, pid: int | str = "self") -> int:
    """A size field of /proc/<pid>/status (e.g. ``RssAnon``) in bytes, 0 where unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def file_mappings(suffix: str = ".safetensors", pid: int | str = "self") -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of the memory mappings of files ending in ``suffix`` (Linux; else [])."""
    found, current = [], None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
                    current = None
                    if len(head) >= 6 and head[-1].endswith(suffix):
                        start, end = (int(x, 16) for x in head[0].split("-"))
                        current = [start, end, 0]
                        found.append(current)
                elif current is not None and head[0] == "Rss:":
                    current[2] = int(head[1]) * 1024
    except (OSError, ValueError, IndexError):
        return []
    return [tuple(m) for m in found]


def _inside(address: int, mappings: list[tuple[int, int, int]]) -> bool:
    return any(start <= address < end for start, end, _ in mappings)


# ------------------------------------------------------------------ what a block's Grams cost
def input_gram_bytes(layers: Iterable[LayerInfo]) -> int:
    """Bytes of the distinct input Grams of these layers (one per shared input, n x n fp32)."""
    seen: dict[tuple[int, str], int] = {}
    for l in layers:
        seen[(l.block, INPUT_GROUP[l.kind])] = l.in_features ** 2 * FP32
    return sum(seen.values())


def grad_gram_bytes(layers: Iterable[LayerInfo]) -> int:
    """Bytes of the output-gradient Grams of these layers (m x m fp32 each, KFAC's G)."""
    return sum(l.out_features ** 2 * FP32 for l in layers)


def fisher_row_bytes(layers: Iterable[LayerInfo]) -> int:
    """Bytes of FWSVD's Fisher rows of these layers (n fp32 each)."""
    return sum(l.in_features * FP32 for l in layers)


def weight_grad_bytes(layers: Iterable[LayerInfo]) -> int:
    """Bytes of the largest weight gradient among these layers (m x n fp32): the transient a Fisher row is reduced from."""
    return max((l.params * FP32 for l in layers), default=0)


@dataclass(frozen=True)
class BlockWindow:
    """Consecutive blocks whose statistics are collected in one calibration pass."""

    blocks: tuple[int, ...]
    gram_bytes: int  # peak live statistics bytes this window needs (its G's and Fisher rows + one block's A's)

    @property
    def first(self) -> int:
        return self.blocks[0]


def plan_windows(layers: Sequence[LayerInfo], needs: Iterable[str], budget: int | None) -> list[BlockWindow]:
    """Group blocks into windows whose live statistics fit ``budget`` bytes (None: one window).

    Input Grams live one block at a time (blocks run in order, each block's A is
    decomposed and freed before the next); output-gradient Grams (and FWSVD's Fisher
    rows) of a whole window live together, since one backward pass fills them all.
    The Fisher rows' weight gradient is a transient of that backward pass, one layer at
    a time, before any A of the window exists. A window therefore costs
    sum(G + F of its blocks) + max(A of one block, one weight gradient).
    """
    needs = set(needs)
    blocks = sorted({l.block for l in layers})
    of = {b: [l for l in layers if l.block == b] for b in blocks}
    per_a = {b: input_gram_bytes(of[b]) if "inputs" in needs else 0 for b in blocks}
    per_g = {b: (grad_gram_bytes(of[b]) if "grads" in needs else 0)
             + (fisher_row_bytes(of[b]) if "fisher" in needs else 0) for b in blocks}  # live for the whole window
    per_t = {b: max(per_a[b], weight_grad_bytes(of[b]) if "fisher" in needs else 0) for b in blocks}  # one at a time

    def cost(window: list[int]) -> int:
        return sum(per_g[x] for x in window) + max(per_t[x] for x in window)

    if budget is None:
        return [BlockWindow(tuple(blocks), cost(blocks) if blocks else 0)]
    windows, current = [], []
    for b in blocks:
        if cost([b]) > budget:
            raise MemoryBudgetError(
                f"memory budget {format_bytes(budget)} is below what one block's statistics need "
                f"({format_bytes(cost([b]))} for block {b}); raise --max-memory")
        if current and cost(current + [b]) > budget:
            windows.append(current)
            current = []
        current = current + [b]
    windows.append(current)
    return [BlockWindow(tuple(w), cost(w)) for w in windows]


# ------------------------------------------------------------------ live accounting
@dataclass
class GramLedger:
    """Counts live Gram bytes: ``take`` when a Gram is allocated, ``release`` when it is freed.

    ``limit`` (bytes, optional) makes ``take`` raise instead of exceeding the budget;
    ``peak`` is the most ever live at once. Thread-safe (backward hooks may run on
    autograd's threads). ``what`` names the tensors counted in its error messages (the
    KL sweep counts its device-resident block inputs in a ledger of its own).
    """

    limit: int | None = None
    what: str = "Gram"
    live: int = 0
    peak: int = 0
    _held: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        with self._lock:
            if key in self._held:
                raise RuntimeError(f"{self.what} {key} is already counted")
            if self.limit is not None and self.live + size > self.limit:
                raise MemoryBudgetError(f"allocating {self.what} {key} ({format_bytes(size)}) would exceed the budget "
                                        f"{format_bytes(self.limit)} ({format_bytes(self.live)} live)")
            self._held[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
        return tensor

    def release(self, key: str) -> None:
        with self._lock:
            self.live -= self._held.pop(key, 0)

    def release_prefix(self, prefix: str) -> None:
        """Release every Gram whose key starts with ``prefix`` (e.g. all of one block)."""
        with self._lock:
            for key in [k for k in self._held if k.startswith(prefix)]:
                self.live -= self._held.pop(key)

    @property
    def held(self) -> tuple[str, ...]:
        return tuple(self._held)
