"""Step 5a: measured per-layer sensitivity, the "scale" of the LEMS error model.

For each layer l and ratio c: compress only l to rank int(c * eq_l), run the
search windows, and measure KL(dense || perturbed) (docs/reference/methods.md §1.2).

The sweep never runs the whole model per layer: the dense hidden state entering
each block is kept, and a perturbation in block b runs only blocks b..B-1 and
the head. That is about half the naive cost (bench/sensitivity.py measures it).

KL floor (docs/reference/methods.md §9 "KL scoring positions"): the reference caches the dense
logits in bf16, so even the dense model scores KL > 0 against them (about 4.6e-4
on the demo), a floor under every measurement. Here the reference log-probs are
kept in float32 whenever they fit in LOG_PROB_CACHE_BYTES (bf16 otherwise, as the
reference), and every sweep measures the floor: the dense model against its own
cached reference through the same code path (``kl_floor``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import numpy as np
import torch
from torch import nn

from .blocks import (BlockInputs, InputPlacement, TensorShelf, advance, capture_inputs, home_off_device,
                     iter_logits_from_block, sequence_length)
from .memory import GramLedger
from .compression import LowRankLinear, set_module
from .decompositions import Factorization, check_finite_factors
from .evaluation import KL_SKIP_FRACTION, kl_from_log_probs, reference_log_probs
from .model import LayerInfo, decoder_blocks
from .run import DEFAULT_RUN, Run

LOG_PROB_CACHE_BYTES = 2 << 30  # float32 reference log-probs kept in memory up to this size


@dataclass
class DenseReference:
    """The dense model's logits on the search windows, and its NLL there."""

    logits: Sequence[torch.Tensor]  # one bf16 tensor per batch (a list or a blocks.TensorShelf)
    nll: float
    _log_probs: dict = field(default_factory=dict, repr=False)
    precision: str = "bf16"  # of the log-probs KL is measured against: "fp32" when they fit in memory
    floor: float | None = None  # KL of the dense model against this reference (``kl_floor``)

    def log_probs(self, batch: int, device) -> torch.Tensor:
        """log p_ref of one batch on the scored positions, on ``device``; kept (beside the logits)
        after the first use when all batches fit in LOG_PROB_CACHE_BYTES (saves a softmax over
        the vocabulary per layer)."""
        if batch in self._log_probs:
            return self._log_probs[batch].to(device)
        p_log = reference_log_probs(self.logits[batch].to(device))
        on_disk = getattr(self.logits, "where", None) == "disk"  # RAM is short: recompute rather than keep
        if not on_disk and sum(l.numel() for l in self.logits) * 4 <= LOG_PROB_CACHE_BYTES:
            self._log_probs[batch] = p_log.to(self.logits[batch].device)
        return p_log

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll))


def rank_at(layer: LayerInfo, ratio: float) -> int:
    """Rank kept at param ratio c: int(c * eq) (docs/reference/methods.md §0), at least 1."""
    return max(1, int(ratio * layer.eq_rank))


def _batch_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device), reduction="sum")
    return loss.item(), ids[:, 1:].numel()


def dense_reference(model: nn.Module, items: BlockInputs, windows: torch.Tensor, batch_size: int,
                    precision: str = "auto", home: str = "device", folder=None) -> DenseReference:
    """The dense logits (bf16) and NLL; log-probs in float32 when ``precision`` is "fp32",
    or "auto" and they fit in LOG_PROB_CACHE_BYTES (else from the bf16 logits, as the reference).

    One batch's logits are on the device at a time; what is kept goes to ``home``: "device",
    "cpu" or "disk" (memory-mapped under ``folder``, ``blocks.TensorShelf``), e.g. off the
    device when the block inputs are."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    kept, probs_shelf = TensorShelf(home, folder), TensorShelf(home, folder)
    total, count, log_probs = 0.0, 0, {}
    for i, out in enumerate(iter_logits_from_block(model, 0, items)):
        s, n = _batch_nll(out, windows[i * batch_size : (i + 1) * batch_size])
        total, count = total + s, count + n
        fits = windows.numel() * out.shape[-1] * 4 <= LOG_PROB_CACHE_BYTES
        if precision == "fp32" or (precision == "auto" and fits):
            log_probs[i] = probs_shelf.append(reference_log_probs(out))
        kept.append(out.to(torch.bfloat16))
    ref = DenseReference(kept, total / max(count, 1), log_probs)
    if log_probs:
        ref.precision = "fp32"
    return ref


def kl_floor(model: nn.Module, items: BlockInputs, ref: DenseReference) -> float:
    """KL of the unmodified model against its own cached reference, through the sweep's code path.

    ~0 with float32 reference log-probs; with bf16 ones it is the rounding floor that
    every single-layer measurement sits on."""
    return kl_suffix(model, 0, items, ref)


def kl_suffix(model: nn.Module, start: int, items: BlockInputs, ref: DenseReference) -> float:
    """KL on the scored positions of the model run from block ``start`` on ``items`` (that block's dense inputs)."""
    return _suffix_scores(model, start, items, ref)[0]


def _suffix_scores(model: nn.Module, start: int, items: BlockInputs, ref: DenseReference,
                   windows: torch.Tensor | None = None, batch_size: int = 1) -> tuple[float, float | None]:
    """(KL on the scored positions, mean NLL over every position or None) from block ``start`` on.

    The NLL (given ``windows``) is the single-layer search-set perplexity ASVD's
    reference search ranks by (docs/reference/methods.md §4.2); it costs only the head on the first
    eighth of the positions, which the KL skips."""
    first = int(KL_SKIP_FRACTION * sequence_length(items))  # positions the KL scores
    total, count, nll_sum, nll_count = 0.0, 0, 0.0, 0
    for i, out in enumerate(iter_logits_from_block(model, start, items, 0 if windows is not None else first)):
        if windows is not None:
            s, n = _batch_nll(out, windows[i * batch_size : (i + 1) * batch_size])
            nll_sum, nll_count = nll_sum + s, nll_count + n
            out = out[:, first:]
        s, n = kl_from_log_probs(ref.log_probs(i, out.device), out)
        total, count = total + s, count + n
    return total / max(count, 1), (nll_sum / max(nll_count, 1) if windows is not None else None)


@dataclass(frozen=True)
class SweepOptions:
    """How a KL sweep runs: ``batch_size`` windows per batch; ``only`` (layer names) measures just
    those layers and leaves the others NaN (one rank's shard under torch.distributed); ``precision``
    of the reference log-probs ("auto", "fp32", "bf16", see ``dense_reference``); ``with_nll`` also
    records each single-layer run's mean NLL on the search windows."""

    batch_size: int = 1
    only: Collection[str] | None = None
    precision: str = "auto"
    with_nll: bool = False


@dataclass
class KLSweep:
    """A sweep's measurements: {ratio: KL per layer}, the dense reference, {ratio: NLL per layer} (with_nll)."""

    kl: dict[float, np.ndarray]
    reference: DenseReference
    nll: dict[float, np.ndarray] = field(default_factory=dict)


def layer_kl_sweep(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    factorization_of: Callable[[LayerInfo], Factorization],
    windows: torch.Tensor,
    ratios: Sequence[float],
    options: SweepOptions = SweepOptions(),
    inputs: InputPlacement | None = None,
    ledger: GramLedger | None = None,
    *,
    run: Run = DEFAULT_RUN,
) -> KLSweep:
    """KL with only one layer compressed, for every layer and ratio.

    Returns the KL per ratio (an array over ``layers``) and the dense reference, whose
    ``floor`` and ``precision`` (see ``dense_reference``, ``kl_floor``) say what the
    measurements sit on; with ``options.with_nll`` also the per-layer mean NLL on the
    search windows from the same runs (single-layer perplexity = exp). Blocks run from
    the perturbed one onward on cached dense inputs; ``options.only`` leaves the other
    layers NaN (``distributed.merge_at_main`` fills the gaps).

    ``inputs`` (``blocks.InputPlacement``, default: on the device) is where the dense
    block inputs wait: off the device, a chunk within its budget comes to the device at
    a time (counted in ``ledger``, by default a new one limited to that budget) and the
    reference logits are kept off the device too (CPU RAM for a GPU device when they fit
    it, else memory-mapped on disk beside the inputs), one batch brought over per use.
    """
    blocks = decoder_blocks(model)
    batch_size = options.batch_size
    items = capture_inputs(model, windows, batch_size, inputs, ledger)
    ref = _sweep_reference(model, items, windows, options, inputs)
    index = {l.name: i for i, l in enumerate(layers)}
    swept = KLSweep({r: np.full(len(layers), np.nan) for r in ratios}, ref)
    if options.with_nll:
        swept.nll = {r: np.full(len(layers), np.nan) for r in ratios}
    measured = [l for l in layers if options.only is None or l.name in options.only]
    done, total = 0, max(1, len(measured) * len(ratios))
    for b in range(len(blocks)):
        for layer in (l for l in measured if l.block == b):
            original = model.get_submodule(layer.name)
            factors = factorization_of(layer)
            for ratio in ratios:
                run.check_cancel()
                left, right = _checked_factors(layer, factors, ratio)
                set_module(model, layer.name, LowRankLinear.from_factors(left, right, original.bias, original))
                try:
                    kl, layer_nll = _suffix_scores(model, b, items, ref, windows if options.with_nll else None,
                                                   batch_size)
                    swept.kl[ratio][index[layer.name]] = kl
                    if options.with_nll:
                        swept.nll[ratio][index[layer.name]] = layer_nll
                finally:
                    set_module(model, layer.name, original)
                done += 1
                run.report(done / total, f"KL sweep: {layer.name} at ratio {ratio:g}")
        items = advance(blocks[b], items)
    return swept


def _sweep_reference(model: nn.Module, items: BlockInputs, windows: torch.Tensor, options: SweepOptions,
                     inputs: InputPlacement | None) -> DenseReference:
    """The sweep's dense reference and its floor; kept off the device when the block inputs are."""
    off_device = inputs is not None and inputs.where != "device"
    vocab = int(model.config.vocab_size)
    home = home_off_device(windows.numel() * vocab * 2, next(model.parameters()).device) if off_device else "device"
    ref = dense_reference(model, items, windows, options.batch_size, options.precision, home,
                          inputs.folder if off_device else None)
    ref.floor = kl_floor(model, items, ref)
    return ref


def _checked_factors(layer: LayerInfo, factors: Factorization, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's factors at ``ratio`` (capped at what they hold); NonFiniteFactorsError naming it if not finite."""
    left, right = factors.factors(min(rank_at(layer, ratio), factors.max_rank))
    check_finite_factors(layer.name, left, right, f"KL sweep at ratio {ratio:g}")
    return left, right


def naive_layer_kl(
    model: nn.Module, layer: LayerInfo, factors: Factorization, windows: torch.Tensor, ratio: float, ref: DenseReference, batch_size: int = 1
) -> float:
    """The same measurement with full forward passes (for the benchmark and tests)."""
    original = model.get_submodule(layer.name)
    left, right = _checked_factors(layer, factors, ratio)
    set_module(model, layer.name, LowRankLinear.from_factors(left, right, original.bias, original))
    try:
        total, count = 0.0, 0
        with torch.no_grad():
            for i, start in enumerate(range(0, windows.shape[0], batch_size)):
                out = model(windows[start : start + batch_size].to(original.weight.device), use_cache=False).logits
                start_pos = int(KL_SKIP_FRACTION * out.shape[1])
                s, n = kl_from_log_probs(ref.log_probs(i, out.device), out[:, start_pos:])
                total, count = total + s, count + n
        return total / max(count, 1)
    finally:
        set_module(model, layer.name, original)
