"""Step 9: perplexity (reference protocol) and KL of a compressed model against the dense one.

Perplexity (docs/reference/methods.md §5.1): tokenise the whole split once, cut it into
non-overlapping seq_len windows (remainder dropped), PPL = exp(mean next-token
NLL over all predicted positions); windows with non-finite logits are skipped.

KL (docs/reference/methods.md §1.2): p = softmax(z_dense / T), q = softmax(z_comp / T), T = 0.6,
KL(p || q) summed over the vocabulary and averaged over positions after the first
eighth of each sequence.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BlockInput, capture_block_inputs, run_block
from .compression import compress_model, restore_dense
from .model import decoder_blocks
from .numerics import nonnegative
from .run import Cancelled, Progress, check_cancel  # noqa: F401  (Cancelled: re-exported beside check_cancel)

KL_TEMPERATURE = 0.6
KL_SKIP_FRACTION = 0.125  # positions 256.. of 2048


@dataclass(frozen=True)
class EvalProtocol:
    """How perplexity is measured: window length and how many windows (None = all).

    ``reference`` is the reference's protocol (docs/reference/methods.md §5.1, docs/reference/methods.md §9 "Evaluation"):
    2048-token non-overlapping windows over the whole split. ``quick`` (512 x the
    first 8 windows) is minutes on a CPU but not comparable with published
    numbers; every stored result records which one it used.
    """

    seq_len: int = 2048
    max_windows: int | None = None

    @property
    def name(self) -> str:
        return next((n for n, p in EVAL_PROTOCOLS.items() if p == self), "custom")

    def to_dict(self) -> dict:
        return {"name": self.name, "seq_len": self.seq_len, "max_windows": self.max_windows}


# "quick" is 8 x 512: a first evaluation in minutes on a CPU, and the demo study's windows.
# Results stored while quick meant 512 x 16 keep their recorded name, "quick-16".
EVAL_PROTOCOLS = {"reference": EvalProtocol(2048, None), "quick": EvalProtocol(512, 8), "quick-16": EvalProtocol(512, 16)}
REFERENCE_EVAL, QUICK_EVAL = EVAL_PROTOCOLS["reference"], EVAL_PROTOCOLS["quick"]


def protocol_name(settings: dict | None) -> str:
    """The protocol of a stored result's ``settings`` ("reference", "quick", "custom").

    Results stored before the protocol was recorded are named from their
    seq_len / max_windows (the old defaults 512 x 16 read as "quick-16")."""
    settings = settings or {}
    recorded = settings.get("protocol")
    if isinstance(recorded, dict) and isinstance(recorded.get("name"), str):
        return recorded["name"]
    seq_len, max_windows = settings.get("seq_len"), settings.get("max_windows")
    if not isinstance(seq_len, int):
        return "unknown"
    return EvalProtocol(seq_len, max_windows).name


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    skipped: int


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Tokenise once and cut into non-overlapping [n, seq_len] windows.

    ``max_windows`` None means all; 0 or less is an error (it would give no window
    and a perplexity of infinity).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be a positive integer or None (all windows), got {max_windows!r}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> PerplexityResult:
    """exp(mean NLL) over all windows, on the model's device."""
    device = _device_of(model)
    nll_sum, count, skipped = 0.0, 0, 0
    n = windows.shape[0]
    for start in range(0, n, batch_size):
        check_cancel(cancel)
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits.float()
        if not torch.isfinite(logits).all():
            skipped += batch.shape[0]
            continue
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        nll_sum += loss.item()
        count += batch[:, 1:].numel()
        if progress:
            progress(min(start + batch_size, n) / n, f"perplexity window {min(start + batch_size, n)}/{n}")
    if count == 0:
        return PerplexityResult(math.inf, math.inf, 0, n, skipped)
    mean = nll_sum / count
    return PerplexityResult(math.exp(mean), mean, count, n, skipped)


def reference_log_probs(ref_logits: torch.Tensor, temperature: float = KL_TEMPERATURE,
                        skip_fraction: float = KL_SKIP_FRACTION) -> torch.Tensor:
    """log p_ref at temperature T on the scored positions (after the first `skip_fraction`), as [N, V] float32."""
    start = int(skip_fraction * ref_logits.shape[1])
    return F.log_softmax(ref_logits[:, start:].float() / temperature, dim=-1).flatten(0, 1)


def kl_from_log_probs(p_log: torch.Tensor, scored_logits: torch.Tensor,
                      temperature: float = KL_TEMPERATURE) -> tuple[float, int]:
    """(sum of per-position KL(p_ref || q), positions) given log p_ref and the logits of the scored positions only.

    KL is >= 0; the float32 sum of a KL that is 0 up to round-off (q ~= p, e.g. a layer
    kept at nearly full rank) can land a few eps below 0, so the sum is clamped at 0
    (``numerics.nonnegative``): every KL downstream (sweep, floor, plan, bias fit) reads this.
    """
    q_log = F.log_softmax(scored_logits.float() / temperature, dim=-1).flatten(0, 1)
    kl = F.kl_div(q_log, p_log, log_target=True, reduction="sum")
    return nonnegative(kl.item()), p_log.shape[0]


def kl_from_logits(ref_logits: torch.Tensor, logits: torch.Tensor, temperature: float = KL_TEMPERATURE,
                   skip_fraction: float = KL_SKIP_FRACTION) -> tuple[float, int]:
    """(sum of per-position KL(p_ref || q), number of positions) for one batch [B, T, V]."""
    start = int(skip_fraction * ref_logits.shape[1])
    return kl_from_log_probs(reference_log_probs(ref_logits, temperature, skip_fraction), logits[:, start:], temperature)


@torch.no_grad()
def model_logits(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, dtype=torch.bfloat16) -> list[torch.Tensor]:
    """Logits per batch, stored compactly (bf16 as the reference) for later KL comparisons."""
    device = _device_of(model)
    return [model(windows[s : s + batch_size].to(device), use_cache=False).logits.to(dtype)
            for s in range(0, windows.shape[0], batch_size)]


def mean_kl(ref_logits: Sequence[torch.Tensor], logits: Sequence[torch.Tensor], **kw) -> float:
    """Token-weighted mean KL over batches."""
    total, count = 0.0, 0
    for ref, out in zip(ref_logits, logits):
        s, n = kl_from_logits(ref.to(out.device), out, **kw)
        total, count = total + s, count + n
    return total / max(count, 1)


@torch.no_grad()
def kl_to_reference(model: nn.Module, windows: torch.Tensor, ref_logits: Sequence[torch.Tensor], batch_size: int = 1,
                    cancel: threading.Event | None = None) -> float:
    """KL(dense || model) on the search windows, given the dense model's cached logits."""
    device = _device_of(model)
    total, count = 0.0, 0
    for i, start in enumerate(range(0, windows.shape[0], batch_size)):
        check_cancel(cancel)
        logits = model(windows[start : start + batch_size].to(device), use_cache=False).logits
        s, n = kl_from_logits(ref_logits[i].to(device), logits)
        total, count = total + s, count + n
    return total / max(count, 1)


# ------------------------------------------------------------------ final-layer output error (ERC-SVD PLC)
def make_final_error_scorer(model: nn.Module, input_ids: torch.Tensor,
                            factors_for: Callable[[dict], dict],
                            batch_size: int = 1) -> Callable[[dict], float]:
    """score_fn(ranks) = ||h_N^c - h_N||_F / ||h_N||_F of the last decoder block's output.

    PLC's k-selection metric ([RECON] definition, docs/reference/other-seed-methods.md §2.3). Block-0 inputs and the dense
    outputs are computed once; each call compresses the model in place with
    ``factors_for(ranks)``, runs the blocks, and restores the dense Linears.
    """
    items = capture_block_inputs(model, input_ids, batch_size)
    reference = _final_hidden(model, items)
    ref_norm = sum(float(r.double().pow(2).sum()) for r in reference)

    def score(ranks: dict) -> float:
        planned = {n: r for n, r in ranks.items() if r is not None}
        originals = {name: model.get_submodule(name) for name in planned}
        factors = factors_for(ranks)
        try:
            compress_model(model, planned, lambda l: factors[l.name])
            outputs = _final_hidden(model, items)
        finally:
            restore_dense(model, originals)
        err = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outputs, reference))
        return (err / max(ref_norm, 1e-300)) ** 0.5
    return score


@torch.no_grad()
def _final_hidden(model: nn.Module, items: list[BlockInput]) -> list[torch.Tensor]:
    blocks = decoder_blocks(model)
    outputs = []
    for item in items:
        hidden = item.hidden
        for block in blocks:
            hidden = run_block(block, BlockInput(hidden, item.kwargs))
        outputs.append(hidden)
    return outputs

