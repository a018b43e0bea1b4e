"""Recovery after compression: a short fine-tune of the low-rank factors on calibration text.

Truncating a Linear to rank r loses what the dropped directions carried; a few hundred
steps of next-token training on calibration text win part of it back. Two modes:

- ``"lora"``: LoRA adapters (through ``peft``) on the two factor Linears of every
  low-rank module (``<layer>.a``: in -> r and ``<layer>.b``: r -> out), everything else
  frozen. Afterwards each adapter is merged into its own factor: W' = W + s B_l A_l has
  W's shape, so y = b'(a'(x)) is exactly the adapter model and the rank plan is unchanged.
- ``"factors"``: the factor weights themselves are trained (biases, dense Linears,
  norms, embeddings and lm_head stay frozen).

Training reads only the calibration split: a dataset/split that is the evaluation text
(``data.evaluation_split``, compared by corpus and by local file) is refused before
any text is read, so a healed model's perplexity is never measured on its training data.
The run context (``run.Run``) carries progress (fraction, message with ETA) and cancel.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .calibration import sample_windows
from .compression import LowRankLinear
from .data import LOCAL_FILES, canonical_dataset, data_dir, evaluation_split, load_text
from .run import DEFAULT_RUN, Run

MODES = ("lora", "factors")
DEFAULT_LR = {"lora": 2e-4, "factors": 2e-5}  # full factor updates move many more weights than an adapter
SAME_CORPUS = {"wikitext2-detok": "wikitext2"}  # the same text through a detokeniser


class RecoveryError(ValueError):
    """Recovery cannot run with these settings or this model (named setting and reason)."""


@dataclass(frozen=True)
class RecoveryConfig:
    """How the factors are healed: what is trained, on which text, for how long and how fast.

    lr None means the mode's default (``DEFAULT_LR``). The learning rate warms up linearly
    over ``warmup_steps`` and then follows a cosine down to ``min_lr_fraction`` x lr.
    ``gradient_checkpointing`` trades compute for activation memory; ``bf16_autocast``
    runs the matmuls in bfloat16 on CUDA (ignored on the CPU). ``seed`` fixes the windows
    drawn from the text and the adapters' initialisation.
    """

    mode: str = "lora"
    steps: int = 100
    lr: float | None = None
    warmup_steps: int = 10
    min_lr_fraction: float = 0.1
    batch_size: int = 1
    seq_len: int = 512
    lora_rank: int = 8
    lora_alpha: float = 16.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    bf16_autocast: bool = True
    seed: int = 0
    dataset: str = "wikitext2"
    split: str = "validation"

    def __post_init__(self):
        if self.mode not in MODES:
            raise RecoveryError(f"recovery mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        for name in ("steps", "batch_size", "seq_len", "lora_rank"):
            _check_int(name, getattr(self, name), 1)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("seed", self.seed, None)
        if self.seq_len < 2:
            raise RecoveryError(f"recovery seq_len must be at least 2 tokens, got {self.seq_len}")
        for name in ("lora_alpha", "max_grad_norm"):
            _check_number(name, getattr(self, name), positive=True)
        _check_number("weight_decay", self.weight_decay, positive=False)
        if self.lr is not None:
            _check_number("lr", self.lr, positive=True)
        if not 0.0 <= self.min_lr_fraction <= 1.0:
            raise RecoveryError(f"recovery min_lr_fraction must be in [0, 1], got {self.min_lr_fraction!r}")
        if not isinstance(self.dataset, str) or not self.dataset or not isinstance(self.split, str) or not self.split:
            raise RecoveryError(f"recovery dataset and split must be non-empty strings, got "
                                f"{self.dataset!r}/{self.split!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    def to_dict(self) -> dict:
        """The settings as results and saved folders record them (lr resolved)."""
        return {**asdict(self), "lr": self.learning_rate}


def _check_int(name: str, value, lowest: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (lowest is not None and value < lowest):
        bound = f" >= {lowest}" if lowest is not None else ""
        raise RecoveryError(f"recovery {name} must be an integer{bound}, got {value!r}")


def _check_number(name: str, value, positive: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise RecoveryError(f"recovery {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


@dataclass
class RecoveryResult:
    """What one recovery run did: the loss of every step, its length and the settings it ran with."""

    losses: list[float]
    steps: int
    seconds: float
    tokens: int
    trainable_params: int
    device: str
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def record(self) -> dict:
        """The compact form stored with results and in a healed folder's meta (no loss curve)."""
        first, last = _edge_means(self.losses)
        return {**self.settings, "steps_done": self.steps, "seconds": self.seconds, "tokens": self.tokens,
                "trainable_params": self.trainable_params, "loss_first": first, "loss_last": last}


def _edge_means(losses: list[float], span: int = 10) -> tuple[float | None, float | None]:
    """Mean loss of the first and of the last ``span`` steps (a single step's loss is noisy), a quarter of a short run."""
    if not losses:
        return None, None
    k = max(1, min(span, len(losses) // 4))
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


# ----------------------------------------------------------------- training text
def check_not_evaluation_text(dataset: str, split: str, evaluation: tuple[str, ...]) -> None:
    """Refuse a calibration dataset/split that is one of the evaluation texts, before reading anything.

    Each evaluated dataset is read on ``evaluation_split(name)``; a known corpus (or its
    detokenised twin) on that split, or the same file path, is the evaluation text.
    """
    corpus = _corpus(dataset)
    for name in evaluation:
        if corpus == _corpus(name) and (corpus.startswith("/") or split == evaluation_split(name)):
            raise RecoveryError(f"recovery text {dataset}/{split} is the evaluation text of {name}: train on the "
                                "calibration split (e.g. validation or train), never on the split perplexity reads")


def _corpus(name: str) -> str:
    """A known corpus's family name, or a file path resolved (a file is its own corpus)."""
    known = canonical_dataset(name)
    if known is not None:
        return SAME_CORPUS.get(known, known)
    return str(Path(name).expanduser().resolve())


def _check_not_evaluation_file(origin: str, evaluation: tuple[str, ...]) -> None:
    """Refuse training text read from a file that an evaluation split would read (compared by path only)."""
    if origin.startswith("hub:"):
        return
    read = Path(origin).resolve()
    for name in evaluation:
        if read in _evaluation_files(name):
            raise RecoveryError(f"recovery text {origin} is the evaluation text of {name} (the same file)")


def _evaluation_files(name: str) -> set[Path]:
    """The local files the evaluation split of ``name`` may be read from (a path names itself)."""
    key = canonical_dataset(name)
    if key is None:
        return {Path(name).expanduser().resolve()}
    return {(data_dir() / rel).resolve() for rel in LOCAL_FILES.get((key, evaluation_split(name)), [])}


def training_windows(tokenizer, config: RecoveryConfig, evaluation: tuple[str, ...] = ("wikitext2",)) -> torch.Tensor:
    """``steps x batch_size`` seeded windows of ``seq_len`` tokens from the calibration split, [n, seq_len]."""
    check_not_evaluation_text(config.dataset, config.split, tuple(evaluation))
    text, source = load_text(config.dataset, config.split)
    _check_not_evaluation_file(source.origin, tuple(evaluation))
    try:
        return sample_windows(tokenizer, text, config.steps * config.batch_size, config.seq_len, config.seed)
    except ValueError as exc:
        raise RecoveryError(f"recovery text {config.dataset}/{config.split}: {exc}") from exc


# ----------------------------------------------------------------- what is trained
def low_rank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """The factorised Linears of ``model`` by name; RecoveryError when there is none to heal."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not found:
        raise RecoveryError("the model has no low-rank layer: compress it before recovery")
    return found


@dataclass
class Trainable:
    """The module to call for the loss and the parameters the optimiser updates."""

    module: nn.Module
    params: list[nn.Parameter]


@contextmanager
def trainable(model: nn.Module, config: RecoveryConfig) -> Iterator[Trainable]:
    """``model`` made trainable as ``config.mode`` says, left as a plain compressed model afterwards.

    lora: on a normal exit the adapters are merged into the factors; on an error (a
    cancel included) they are dropped, so the model is what it was. factors: the
    factors keep what the steps done taught them. Either way every parameter's
    ``requires_grad`` and the train/eval mode are restored.
    """
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        with _lora(model, config) if config.mode == "lora" else _factors(model) as prepared:
            yield prepared
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
        model.train(was_training)


@contextmanager
def _lora(model: nn.Module, config: RecoveryConfig) -> Iterator[Trainable]:
    from peft import LoraConfig, get_peft_model

    targets = [f"{name}.{factor}" for name in low_rank_modules(model) for factor in ("a", "b")]
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=targets)
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = get_peft_model(model, lora)
    try:
        yield Trainable(wrapped, [p for p in wrapped.parameters() if p.requires_grad])
    except BaseException:
        wrapped.unload()  # adapters removed without merging: the model is as it was
        raise
    wrapped.merge_and_unload()  # each factor W becomes W + s B_l A_l, its shape unchanged


@contextmanager
def _factors(model: nn.Module) -> Iterator[Trainable]:
    params = [p for m in low_rank_modules(model).values() for p in (m.a.weight, m.b.weight)]
    if any(p.dtype != torch.float32 for p in params):
        raise RecoveryError("factors mode trains the factors in their own dtype and 16-bit weights would lose "
                            "the updates: load the model in float32 (bf16 autocast still runs the matmuls on CUDA)")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    yield Trainable(model, params)


# ----------------------------------------------------------------- the loop
def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the base lr at 0-based ``step``: linear warm-up to 1, then a cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(prepared: Trainable, windows: torch.Tensor, config: RecoveryConfig, run: Run = DEFAULT_RUN) -> RecoveryResult:
    """Run ``config.steps`` optimiser steps of next-token loss over ``windows`` (``batch_size`` windows each)."""
    module, device = prepared.module, next(prepared.module.parameters()).device
    steps = min(config.steps, windows.shape[0] // config.batch_size)
    if steps < 1:
        raise RecoveryError(f"{windows.shape[0]} windows are fewer than one batch of {config.batch_size}")
    optimizer = torch.optim.AdamW(prepared.params, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, steps, config.min_lr_fraction))
    losses, started = [], time.perf_counter()
    with _checkpointing(module, config.gradient_checkpointing):
        module.train()
        for step in range(steps):
            run.check_cancel()
            batch = windows[step * config.batch_size:(step + 1) * config.batch_size].to(device)
            losses.append(_step(module, batch, prepared.params, optimizer, config, device))
            schedule.step()
            run.report((step + 1) / steps, _progress_message(step + 1, steps, losses[-1], started))
    return RecoveryResult(losses, steps, round(time.perf_counter() - started, 2), steps * config.batch_size
                          * config.seq_len, sum(p.numel() for p in prepared.params), str(device), config.to_dict())


def _step(module: nn.Module, batch: torch.Tensor, params: list[nn.Parameter], optimizer, config: RecoveryConfig,
          device: torch.device) -> float:
    """One forward/backward/update; the loss before the update. A non-finite loss stops the run."""
    with _autocast(device, config.bf16_autocast):
        loss = module(input_ids=batch, labels=batch, use_cache=False).loss
    if not torch.isfinite(loss):
        raise RecoveryError(f"the training loss is {loss.item()}: lower the learning rate ({config.learning_rate:g})")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _autocast(device: torch.device, wanted: bool):
    """bfloat16 autocast on CUDA when wanted; nothing on the CPU (its bf16 matmuls are slower than fp32)."""
    if wanted and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def _checkpointing(module: nn.Module, wanted: bool) -> Iterator[None]:
    """Gradient checkpointing of the decoder blocks for the run, when asked (non-reentrant: frozen inputs work)."""
    if not wanted:
        yield
        return
    model = module.get_base_model() if hasattr(module, "get_base_model") else module  # under peft's wrapper
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the older names warn there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def _progress_message(done: int, total: int, loss: float, started: float) -> str:
    elapsed = time.perf_counter() - started
    eta = elapsed / done * (total - done)
    return f"recovery step {done}/{total}, loss {loss:.3f}, ETA {eta:.0f} s"


def recover(model: nn.Module, tokenizer, config: RecoveryConfig, run: Run = DEFAULT_RUN,
            evaluation: tuple[str, ...] = ("wikitext2",)) -> RecoveryResult:
    """Heal a compressed ``model`` in place on calibration text; it stays a compressed model of the same ranks.

    ``evaluation`` names the datasets the healed model will be evaluated on: their
    evaluation splits are refused as training text. Training runs where the model's
    weights are; ``run`` brings the progress callback and the cancel event.
    """
    windows = training_windows(tokenizer, config, evaluation)
    torch.manual_seed(config.seed)  # the adapters' initialisation
    with trainable(model, config) as prepared:
        result = train(prepared, windows, config, run)
    model.eval()
    return result


# ----------------------------------------------------------------- saving
def healed_meta(meta: dict | None, result: RecoveryResult) -> dict:
    """A compressed folder's meta, or an evaluation record (``EvalResult.to_dict()``) of the healed
    model, with the recovery settings and outcome added under ``recovery`` (what results store)."""
    return {**(meta or {}), "recovery": result.record()}


@dataclass(frozen=True)
class HFTarget:
    """Where a Hugging Face export of the healed model goes, and what it describes itself with:
    the plan document and a ``hf_export.ModelCard``."""

    folder: str | Path
    plan_doc: dict
    card: object


def save_healed(model: nn.Module, tokenizer, ranks: dict[str, int | None], result: RecoveryResult,
                folder: str | Path | None = None, hf: HFTarget | None = None, *, meta: dict | None = None,
                overwrite: bool = False) -> list[Path]:
    """Save the healed (merged) model as a compressed folder and/or a Hugging Face export; the written folders.

    Both keep the low-rank shapes: the adapters are already merged into the factors.
    """
    from .compression import save_compressed
    from .hf_export import export_hf

    meta, written = healed_meta(meta, result), []
    if hf is not None and (hf.plan_doc is None or hf.card is None):
        raise RecoveryError("a Hugging Face export of the healed model needs the plan document and a model card")
    if folder is not None:
        written.append(save_compressed(model, tokenizer, ranks, folder, meta=meta, overwrite=overwrite))
    if hf is not None:
        written.append(export_hf(model, tokenizer, ranks, hf.folder, hf.plan_doc, hf.card, meta=meta,
                                 overwrite=overwrite))
    return written
