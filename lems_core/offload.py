"""Models larger than the device: accelerate's ``device_map`` / ``max_memory`` / offload folder.

``load_offloaded`` loads a checkpoint with accelerate's dispatch: the blocks that fit
``max_memory`` sit on the GPU (or CPU), the rest in CPU RAM or memory-mapped from an
offload folder on disk, and accelerate's hooks move each block's weights to the
execution device only while that block runs. Every step here that runs blocks one at
a time (calibration statistics, the KL sweep's suffix runs, perplexity) therefore
holds about one block of weights on the device.

A step that reads a weight directly (the decomposition, the fingerprint) must go
through ``module_weight``: an offloaded Linear's ``weight`` is a meta tensor until
its hook materialises it. Saving a whole (compressed) offloaded model goes through
``weights_in_memory``, which brings every offloaded weight to CPU RAM meanwhile.

``OffloadSpec`` is what the command line's ``--weights-memory`` / ``--offload-folder``
say; ``pipeline.get_model`` loads with it (``load_with``) for profile, evaluate,
evaluate-plans and compress.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .memory import DEFAULT_FRACTION, MemoryBudgetError, available_memory, format_bytes
from .model import LoadedModel, checkpoint_folder, default_device, model_fingerprint, weight_sample


@dataclass(frozen=True)
class OffloadSpec:
    """How to load a model larger than the device (``--weights-memory``, ``--offload-folder``).

    ``weights_memory``: bytes of weights accelerate may put on the compute device (None:
    its own estimate); what does not fit goes to CPU RAM (on a GPU), then to memory-mapped
    safetensors in ``folder``.
    """

    weights_memory: int | None = None
    folder: str | None = None

    def __post_init__(self):
        if self.weights_memory is None and not self.folder:
            raise ValueError("offloaded loading needs --weights-memory and/or --offload-folder")
        if self.weights_memory is not None and self.weights_memory <= 0:
            raise MemoryBudgetError(f"--weights-memory must be positive, got {self.weights_memory}")
        if self.folder and Path(self.folder).expanduser().exists() and not Path(self.folder).expanduser().is_dir():
            raise ValueError(f"--offload-folder {self.folder} exists and is not a folder")

    def max_memory(self, device: str | None = None) -> dict | None:
        """accelerate's ``max_memory``: {GPU index: weights_memory, "cpu": 80 % of free RAM} on a GPU,
        {"cpu": weights_memory} on the CPU (the rest goes to the folder); None without a limit."""
        if self.weights_memory is None:
            return None
        where = device or default_device()
        if not where.startswith("cuda"):
            return {"cpu": self.weights_memory}
        index = int(where.split(":")[1]) if ":" in where else 0
        return {index: self.weights_memory, "cpu": int(DEFAULT_FRACTION * available_memory("cpu"))}


def load_with(spec: OffloadSpec, source: str, device: str | None = None) -> LoadedModel:
    """``source`` loaded by accelerate under ``spec`` for ``device`` (default: CUDA when present)."""
    return load_offloaded(source, max_memory=spec.max_memory(device), offload_folder=spec.folder)


def is_offloaded(module: nn.Module) -> bool:
    """True when accelerate keeps this module's weights elsewhere (meta until its hook runs)."""
    hook = getattr(module, "_hf_hook", None)
    return hook is not None and getattr(hook, "offload", False)


def has_offloaded_weights(model: nn.Module) -> bool:
    """True when any module of ``model`` is offloaded (steps that read weights directly must materialise them)."""
    return any(is_offloaded(m) for m in model.modules())


@contextlib.contextmanager
def weights_in_memory(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every offloaded weight loaded to CPU RAM for the duration (e.g. to save it whole).

    Needs RAM for the offloaded part of the model; a model without offloaded weights is
    yielded as it is.
    """
    with contextlib.ExitStack() as stack:
        for module in model.modules():
            if is_offloaded(module):
                stack.enter_context(_on_cpu(module))
        yield model


def _on_cpu(module: nn.Module):
    from accelerate.utils import align_module_device

    return align_module_device(module, torch.device("cpu"))


@contextlib.contextmanager
def module_weight(model: nn.Module, name: str) -> Iterator[torch.Tensor]:
    """The weight of Linear ``name`` on a real device for the duration of the block.

    Plain modules yield their weight as is; an accelerate-offloaded one is loaded from
    its weights map (CPU RAM or the offload folder) and put back on meta afterwards.
    """
    module = model.get_submodule(name)
    with materialized(module):
        yield module.weight


@contextlib.contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with its own parameters on its execution device for the duration (a no-op unless offloaded)."""
    if not is_offloaded(module):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module, module._hf_hook.execution_device):
        yield module


def offloaded_fingerprint(model: nn.Module) -> str:
    """``model_fingerprint`` with each offloaded weight materialised in turn (same value as loaded whole)."""
    def sample_of(name: str) -> torch.Tensor:
        with module_weight(model, name) as w:
            return weight_sample(w).float().cpu().clone()
    return model_fingerprint(model, sample_of=sample_of)


def load_offloaded(
    source: str, max_memory: dict | None = None, offload_folder: str | Path | None = None,
    device_map: str | dict = "auto", dtype: torch.dtype | None = None, trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``source`` with accelerate dispatch under ``max_memory`` ({device: "20GB", "cpu": "64GB"}).

    Blocks beyond the budget go to CPU RAM, then to ``offload_folder`` (memory-mapped
    safetensors). ``device_map`` may also be an explicit {module name: device or "disk"}.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = checkpoint_folder(source)  # a GGUF file: its converted safetensors folder, which accelerate can map
    if dtype is None:
        dtype = torch.float16 if default_device().startswith("cuda") else torch.float32
    kwargs = {"trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs) if (Path(folder) / "tokenizer_config.json").is_file() \
        or not Path(folder).is_dir() else None
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, device_map=device_map, max_memory=max_memory,
        offload_folder=str(offload_folder) if offload_folder else None, **kwargs)
    model.eval()
    model.config.use_cache = False
    check_embeddings_placed(model, max_memory)
    return LoadedModel(model, tokenizer, source, offloaded_fingerprint(model))


def check_embeddings_placed(model: nn.Module, max_memory: dict | None) -> None:
    """The input embeddings must sit on a real device: every step reads the execution device from the
    model's first parameter and runs the blocks from there. accelerate puts them on disk (a meta tensor)
    when the weights budget cannot hold them beside its reserve for the largest layer."""
    embed = model.get_input_embeddings().weight
    if embed.device.type == "meta":
        raise MemoryBudgetError(
            f"--weights-memory leaves not even the input embeddings on the device (accelerate's max_memory "
            f"{max_memory}, embeddings {format_bytes(embed.numel() * embed.element_size())} beside the largest "
            "layer it sets aside): raise --weights-memory")
