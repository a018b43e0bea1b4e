"""Factorisations kept on disk, one safetensors file per block, read back one layer at a time.

A streamed profile build writes each block's factors as soon as they are
computed, so the factors of a 70B model (about the size of its Linear weights in
fp32) never sit in memory. ``FactorShards`` is a read-only Mapping name ->
Factorization that opens the block file of a layer lazily (``safe_open``), keeps
every spectrum in memory (they are small) and casts the factors back to float32.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .cache import load_tensors, save_tensors
from .decompositions.base import Factorization
from .safe_io import check_regular_file, read_json_capped

INDEX = "index.json"
FACTOR_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def check_factor_dtype(name: str) -> torch.dtype:
    """The torch dtype of a factor storage name ("fp32" or "fp16"), else a ValueError naming them."""
    if name not in FACTOR_DTYPES:
        raise ValueError(f"factor dtype must be one of {', '.join(FACTOR_DTYPES)}, got {name!r}")
    return FACTOR_DTYPES[name]


def block_file(folder: Path, block: int) -> Path:
    return Path(folder) / f"block_{block:04d}.safetensors"


def write_block(folder: Path, block: int, factors: dict[str, Factorization], dtype: str = "fp32") -> None:
    """Write one block's factors (left/right in ``dtype``, sigma in float64) with a checksum sidecar."""
    cast = check_factor_dtype(dtype)
    tensors = {}
    for name, f in factors.items():
        tensors.update({f"{name}.sigma": torch.from_numpy(np.ascontiguousarray(f.sigma)),
                        f"{name}.left": f.left.detach().to("cpu", cast), f"{name}.right": f.right.detach().to("cpu", cast)})
    save_tensors(block_file(folder, block), tensors, {"block": block, "dtype": dtype})


def finish(folder: Path, layers: dict[str, int], dtype: str, meta: dict | None = None) -> None:
    """Mark a folder complete: its index names every layer and its block (written last)."""
    (Path(folder) / INDEX).write_text(json.dumps({"layers": layers, "dtype": dtype, "meta": meta or {}}))


def is_complete(folder: Path) -> bool:
    return (Path(folder) / INDEX).is_file()


class FactorShards(Mapping):
    """name -> Factorization over a finished folder of block files; factors load on access."""

    def __init__(self, folder: Path, device: str | torch.device = "cpu"):
        self.folder = Path(folder)
        doc = read_json_capped(self.folder / INDEX, 64 * 2**20, ValueError, "a factor index")
        self._block = {str(k): int(v) for k, v in doc["layers"].items()}
        self.dtype = doc.get("dtype", "fp32")
        self.device = torch.device(device)
        self.spectra = self._read_spectra()

    def _read_spectra(self) -> dict[str, np.ndarray]:
        from safetensors import safe_open

        spectra = {}
        for block in sorted(set(self._block.values())):
            path = check_regular_file(block_file(self.folder, block), ValueError, "a factor block file")
            with safe_open(str(path), framework="pt") as f:
                for name in (n for n, b in self._block.items() if b == block):
                    spectra[name] = f.get_tensor(f"{name}.sigma").numpy()
        return spectra

    def verify(self) -> bool:
        """Every block file passes its checksum (a corrupt folder counts as missing)."""
        return all(load_tensors(block_file(self.folder, b)) is not None for b in set(self._block.values()))

    def __getitem__(self, name: str) -> Factorization:
        from safetensors import safe_open

        if name not in self._block:
            raise KeyError(name)
        with safe_open(str(block_file(self.folder, self._block[name])), framework="pt") as f:
            left = f.get_tensor(f"{name}.left").to(self.device, torch.float32)
            right = f.get_tensor(f"{name}.right").to(self.device, torch.float32)
        return Factorization(self.spectra[name], left, right)

    def truncated(self, name: str) -> "ShardedFactors":
        """The layer's factors read lazily at one rank: only its first r columns / rows leave the disk."""
        if name not in self._block:
            raise KeyError(name)
        return ShardedFactors(block_file(self.folder, self._block[name]), name, self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._block)

    def __len__(self) -> int:
        return len(self._block)


@dataclass(frozen=True)
class ShardedFactors:
    """One layer's factors in a block file, read at a rank on demand (``compression.Factors``).

    Slicing in the file keeps a per-block compressed forward's reads at the truncated
    size, not the full-rank factors (docs/scale.md).
    """

    path: Path
    name: str
    device: torch.device

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            left_slice = f.get_slice(f"{self.name}.left")
            max_rank = left_slice.get_shape()[1]
            if not 1 <= rank <= max_rank:
                raise ValueError(f"rank {rank} outside [1, {max_rank}]")
            left = left_slice[:, :rank]
            right = f.get_slice(f"{self.name}.right")[:rank]
        return left.to(self.device, torch.float32), right.to(self.device, torch.float32)
