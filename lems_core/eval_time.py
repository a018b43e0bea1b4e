"""How long a perplexity evaluation will take on a CPU, before it runs: an estimate, not a promise.

The app asks for confirmation before a long run and shows the estimate while the
job loads its model, when the job itself has nothing to extrapolate from yet. The
estimate is windows x a per-window time:

- windows: the evaluation split's size in tokens (``APPROX_TOKENS``, counted with the
  demo's tokenizer; other tokenizers differ by some ten percent) cut into ``seq_len``
  windows, capped by ``max_windows``;
- per window: ``seq_len`` tokens at the forward FLOPs of a decoder (2 per weight,
  plus the causal attention over the window) and a CPU throughput timed on the demo
  model (``CPU_FLOPS``: the quick protocol's 8 x 512-token perplexity in 18 s on a
  2-core machine, bench/first_run.py). Faster machines take less.

Each dataset is measured twice, on the compressed and on the dense model; the dense
perplexity is cached after the first run, so the low end counts one pass.
"""
from __future__ import annotations

from dataclasses import dataclass

APPROX_TOKENS = {"wikitext2": 305_000, "ptb": 106_000, "c4": 1_000_000}  # WikiText-2 test, PTB test, C4's 2000 docs
CPU_FLOPS = 52e9  # demo: 4096 tokens x (2 x 106M params + 2 x 30 blocks x 512 x 576) in 18 s
SETUP_SECONDS_PER_PARAM = 125 / 106e6  # demo's first run: statistics 106 s + decompositions 16 s + load (cached later)


@dataclass(frozen=True)
class EvalEstimate:
    """Windows to run and the estimated seconds; ``low`` = compressed pass only, ``high`` = with the dense pass."""

    windows: int
    seconds_per_window: float
    low: float
    high: float
    setup: float  # loading the model and factorising its layers the first time (cached afterwards)


def windows_of(dataset: str, seq_len: int, max_windows: int | None) -> int:
    """Approximate number of ``seq_len`` windows perplexity runs on ``dataset`` (unknown datasets: one window)."""
    n = max(1, APPROX_TOKENS.get(dataset, seq_len) // seq_len)
    return n if max_windows is None else min(n, max_windows)


def seconds_per_window(seq_len: int, params: int, hidden: int = 0, blocks: int = 0) -> float:
    """Estimated CPU seconds of one forward pass over ``seq_len`` tokens of a model with ``params`` weights."""
    flops_per_token = 2.0 * params + 2.0 * blocks * seq_len * hidden
    return seq_len * flops_per_token / CPU_FLOPS


def estimate_eval(datasets: list[str], seq_len: int, max_windows: int | None, params: int, hidden: int = 0,
                  blocks: int = 0, plans: int = 1) -> EvalEstimate:
    """The estimate for ``plans`` plans evaluated on ``datasets`` of a model of ``params`` compressible weights."""
    windows = plans * sum(windows_of(d, seq_len, max_windows) for d in datasets)
    per_window = seconds_per_window(seq_len, params, hidden, blocks)
    low = windows * per_window
    dense = sum(windows_of(d, seq_len, max_windows) for d in datasets) * per_window  # once per dataset
    return EvalEstimate(windows, per_window, low, low + dense, params * SETUP_SECONDS_PER_PARAM)
