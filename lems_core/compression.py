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

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from .budget import is_force_factorised
from .model import LayerInfo, compressible_layers, decoder_blocks
from .numerics import check_finite_factors
from .safe_io import check_regular_file, read_json_capped, replaced_folder

RANKS_FILE = "ranks.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
COMPRESSED_SCHEMA = "lems-compressed/1"
LOW_RANK_CONFIG_KEY = "lems_low_rank"  # an HF export's ranks in config.json; must match modeling_lowrank.RANKS_KEY
MAX_RANKS_BYTES = 16 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024


class CompressedModelError(ValueError):
    """A compressed model folder that cannot be written or loaded as it is (named file and reason)."""


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
    layers = _planned_layers(model, ranks)
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


def _planned_layers(model: nn.Module, ranks: dict[str, int | None]) -> dict[str, LayerInfo]:
    """The model's compressible layers by name; a planned name the model lacks is a KeyError."""
    layers = {l.name: l for l in compressible_layers(model)}
    unknown = sorted(set(ranks) - set(layers))
    if unknown:
        raise KeyError(f"{len(unknown)} planned layers are not in this model, e.g. {unknown[:3]}")
    return layers


@contextlib.contextmanager
def compressed_per_block(
    model: nn.Module,
    ranks: dict[str, int | None],
    factorization_of: Callable[[LayerInfo], Factors],
    ledger=None,
) -> Iterator[dict[str, int | None]]:
    """Within the block, every forward runs the planned model, but only one decoder block is compressed at a time.

    A pre-hook on each decoder block swaps in its low-rank Linears (reading their
    factors through ``factorization_of``, e.g. block files on disk) and a hook after it
    puts the dense ones back, so the truncated factors of one block are alive at once
    instead of every layer's: what keeps a memory-budgeted build's bias fit and
    evaluation flat in depth (docs/scale.md). The outputs equal ``compress_model``'s.
    Forward only: the factors are rebuilt on every pass, so nothing here is trained.
    ``ledger`` (a ``memory.GramLedger``, optional) counts the live block's factors and
    refuses to go over its limit. Yields the ranks applied (None = dense), as
    ``compress_model`` returns them.
    """
    layers = _planned_layers(model, ranks)
    applied = {name: None if is_dense_rank(layers[name], rank) else int(rank) for name, rank in ranks.items()}
    per_block: dict[int, list[str]] = {}
    for name, rank in applied.items():
        if rank is not None:
            per_block.setdefault(layers[name].block, []).append(name)
    live: dict[int, dict[str, nn.Module]] = {}

    def swap_in(index: int) -> None:
        if index in live:  # already compressed: a nested call of the same block
            return
        originals = live[index] = {}
        for name in per_block.get(index, ()):
            linear = model.get_submodule(name)
            left, right = _factors_at(factorization_of(layers[name]), name, applied[name])
            low_rank = LowRankLinear.from_factors(left, right, linear.bias, linear)
            del left, right
            if ledger is not None:
                ledger.take(f"{index}:{name}.a", low_rank.a.weight)
                ledger.take(f"{index}:{name}.b", low_rank.b.weight)
            set_module(model, name, low_rank)
            originals[name] = linear

    def swap_out(index: int) -> None:
        restore_dense(model, live.pop(index, {}))
        if ledger is not None:
            ledger.release_prefix(f"{index}:")

    handles = []
    for index, block in enumerate(decoder_blocks(model)):
        if index in per_block:
            handles.append(block.register_forward_pre_hook(lambda _m, _a, i=index: swap_in(i)))
            handles.append(block.register_forward_hook(lambda _m, _a, _o, i=index: swap_out(i)))
    try:
        yield applied
    finally:
        for handle in handles:
            handle.remove()
        for index in list(live):  # a forward that raised inside a block
            swap_out(index)


def _factors_at(factors: Factors, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``factors.factors(rank)``, with the layer's name in the error when the rank is out of reach
    or the factors are not finite (``numerics.NonFiniteFactorsError``)."""
    try:
        left, right = factors.factors(rank)
    except ValueError as exc:
        raise ValueError(f"layer {name}: cannot factorise at rank {rank}: {exc}") from exc
    check_finite_factors(name, left, right, f"compressing at rank {rank}")
    return left, right


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


def write_weights(model: nn.Module, path: Path) -> None:
    """All of ``model``'s weights to one safetensors file, a tied tensor once under its first name.

    The first name in the model's order is the input embedding (``model.embed_tokens.weight``),
    not ``lm_head.weight``, as transformers saves it: a bare base model (``AutoModel``, what
    serving engines load) finds its embedding, and the causal LM ties its head to it.
    """
    from safetensors.torch import save_file

    tensors, stored = {}, set()
    for name, tensor in model.state_dict().items():
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if storage not in stored or tensor.numel() == 0:
            stored.add(storage)
            tensors[name] = tensor.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_compressed(model: nn.Module, tokenizer, ranks: dict[str, int | None], folder: Path,
                     meta: dict | None = None) -> None:
    """Write config, tokenizer, ranks and weights into the existing folder ``folder`` (no atomicity)."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # GGUF sources are dequantised in memory
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    doc = {"schema": COMPRESSED_SCHEMA, "ranks": ranks, "meta": meta or {}}
    (folder / RANKS_FILE).write_text(json.dumps(doc, indent=1))
    write_weights(model, folder / WEIGHTS_FILE)


def save_compressed(model: nn.Module, tokenizer, ranks: dict[str, int | None], folder: str | Path,
                    meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write config, tokenizer, ranks and weights so the model reloads without recompressing.

    The folder is written beside ``folder`` and renamed into place: a kill mid-write leaves
    the earlier folder (or none), and ``overwrite`` replaces an earlier export as a whole.
    """
    folder = Path(folder)
    check_output_folder(folder, overwrite)
    with replaced_folder(folder) as temporary:
        write_compressed(model, tokenizer, ranks, temporary, meta)
    return folder


def is_compressed_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a compressed model (a readable ranks.json of our schema)."""
    try:
        doc = read_json_capped(folder / RANKS_FILE, MAX_RANKS_BYTES, CompressedModelError, "a ranks file")
    except CompressedModelError:
        return False
    return isinstance(doc, dict) and doc.get("schema") == COMPRESSED_SCHEMA


def check_output_folder(folder: str | Path, overwrite: bool) -> None:
    """Refuse an output that is a file, a non-empty folder (unless ``overwrite``), or a folder of other files.

    ``overwrite`` replaces the whole folder, so it is allowed only over an earlier export:
    a folder of someone's other files is never deleted.
    """
    folder = Path(folder)
    if not os.path.lexists(folder):
        return
    if folder.is_symlink() or not folder.is_dir():
        raise CompressedModelError(f"{folder} exists and is not a folder")
    if not any(folder.iterdir()):
        return
    if not overwrite:
        raise CompressedModelError(f"{folder} is not empty; pass overwrite (--force) to replace an earlier export")
    if not is_compressed_folder(folder):
        raise CompressedModelError(f"{folder} holds files that are not a compressed model (no {RANKS_FILE} of "
                                   f"{COMPRESSED_SCHEMA}); replacing it would delete them: choose another folder")


def load_compressed(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """Rebuild a compressed model from `save_compressed` output; returns (model, tokenizer, ranks, meta).

    Every file is checked before anything is allocated: each is a regular file, ranks.json
    is capped in size and its ranks fit the layers the config describes, and the weights'
    shapes match that structure. Anything else is a CompressedModelError.
    """
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    doc = _read_ranks_document(folder)
    config_doc = read_json_capped(folder / CONFIG_FILE, MAX_CONFIG_BYTES, CompressedModelError, "a model config")
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ranks = check_saved_ranks(doc.get("ranks"), compressible_layers(model), folder / RANKS_FILE)
    _check_config_ranks(config_doc, ranks, folder)
    apply_structure(model, ranks)
    weights = folder / WEIGHTS_FILE
    check_weight_shapes(model, weights)
    model.to_empty(device=device)
    model.tie_weights()
    missing, unexpected = load_model(model, str(weights), strict=False, device=device)
    missing = [m for m in missing if "rotary_emb" not in m and not _is_tied_to_loaded(model, m, set(missing))]
    if missing or unexpected:
        raise CompressedModelError(f"Weights do not match the saved structure: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
    _reset_rotary_buffers(model, device)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model, tokenizer, ranks, doc.get("meta", {})


def _read_ranks_document(folder: Path) -> dict:
    """ranks.json of ``folder`` (capped, our schema), after refusing pipes and devices anywhere in the folder."""
    if not folder.is_dir():
        raise CompressedModelError(f"{folder} is not a folder: not a compressed model")
    _refuse_special_files(folder)
    doc = read_json_capped(folder / RANKS_FILE, MAX_RANKS_BYTES, CompressedModelError, "a compressed model's ranks")
    if not isinstance(doc, dict) or doc.get("schema") != COMPRESSED_SCHEMA:
        schema = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise CompressedModelError(f"{folder / RANKS_FILE}: not a compressed model (schema {schema!r})")
    return doc


def _refuse_special_files(folder: Path) -> None:
    """Refuse a folder holding a named pipe, device or socket: transformers would block on or stream from it."""
    for entry in folder.iterdir():
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue  # a dangling link: the reader that needs the file names it
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            check_regular_file(entry, CompressedModelError, "a file of a compressed model")


def check_saved_ranks(raw, layers: list[LayerInfo], where: Path) -> dict[str, int | None]:
    """The saved ``{layer: rank or None}``, each rank an integer in [1, min(m, n)] of a known layer."""
    if not isinstance(raw, dict):
        raise CompressedModelError(f"{where}: 'ranks' must be an object {{layer name: rank or null}}")
    by_name = {l.name: l for l in layers}
    unknown = sorted(set(raw) - set(by_name))
    if unknown:
        raise CompressedModelError(f"{where}: {len(unknown)} layers are not compressible Linears of the model "
                                   f"config.json describes, e.g. {unknown[:3]}")
    return {name: _checked_rank(by_name[name], rank, where) for name, rank in raw.items()}


def _checked_rank(layer: LayerInfo, rank, where: Path) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise CompressedModelError(f"{where}: layer {layer.name}: rank must be an integer or null, got {rank!r}")
    upper = min(layer.out_features, layer.in_features)
    if not 1 <= rank <= upper:
        raise CompressedModelError(f"{where}: layer {layer.name}: rank {rank} out of range [1, {upper}] for a "
                                   f"{layer.out_features}x{layer.in_features} matrix")
    return rank


def _check_config_ranks(config: dict, ranks: dict[str, int | None], folder: Path) -> None:
    """config.json's ``lems_low_rank`` (an HF export's structure for remote code), when present, equals ranks.json's."""
    listed = config.get(LOW_RANK_CONFIG_KEY) if isinstance(config, dict) else None
    if listed is not None and listed != {n: r for n, r in ranks.items() if r is not None}:
        raise CompressedModelError(f"{folder / CONFIG_FILE}: {LOW_RANK_CONFIG_KEY} disagrees with {RANKS_FILE}: "
                                   "the folder mixes two exports")


def check_weight_shapes(model: nn.Module, path: Path) -> None:
    """Each tensor of the safetensors file has the shape ``model``'s structure expects (read from its header only)."""
    from safetensors import SafetensorError, safe_open

    check_regular_file(path, CompressedModelError, "a safetensors weights file")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise CompressedModelError(f"{path} is not a readable safetensors file: {exc}") from None
    wrong = [f"{k} {stored[k]} (expected {expected[k]})" for k in stored if k in expected and stored[k] != expected[k]]
    if wrong:
        raise CompressedModelError(f"{path}: tensors of the wrong shape for {RANKS_FILE} and {CONFIG_FILE}: "
                                   + ", ".join(wrong[:3]))


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
