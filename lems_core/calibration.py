"""Step 2: calibration and search sequences, sampled as in the reference protocol.

methods.md §5.1: join the split with "\\n\\n", take seeded random character
offsets, tokenise a 10 x seq_len character window and keep its first seq_len
tokens. The search set (sensitivities, KL) uses the same routine with seed + 1000.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace

import torch

from .data import load_text

SEARCH_SEED_OFFSET = 1000


@dataclass(frozen=True)
class CalibrationConfig:
    """What calibration data a profile was built from; part of every cache key.

    The reference uses WikiText-2 *train*; this workplace ships only the validation
    and test splits, so the local default is validation (test stays held out for
    perplexity).
    """

    dataset: str = "wikitext2"
    split: str = "validation"
    n_samples: int = 256
    seq_len: int = 2048
    seed: int = 42
    n_search: int = 32

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "CalibrationConfig":
        return CalibrationConfig(**{k: d[k] for k in CalibrationConfig.__dataclass_fields__ if k in d})


# Named sizes: the reference protocol, and smaller ones that fit a CPU.
PRESETS = {
    "reference": CalibrationConfig(),
    "gpu-small": CalibrationConfig(n_samples=64, seq_len=2048, n_search=16),
    "cpu": CalibrationConfig(n_samples=16, seq_len=512, n_search=8),
    "cpu-tiny": CalibrationConfig(n_samples=4, seq_len=256, n_search=2),
}


def preset(name: str, **overrides) -> CalibrationConfig:
    if name not in PRESETS:
        raise ValueError(f"Unknown calibration preset {name!r}: choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def sample_windows(tokenizer, text: str, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n_samples` token windows of exactly `seq_len` tokens, as a LongTensor [n, seq_len]."""
    chars = 10 * seq_len
    if len(text) <= chars:
        raise ValueError(f"Text of {len(text)} characters is too short for {seq_len}-token windows")
    rng = random.Random(seed)
    windows, attempts = [], 0
    while len(windows) < n_samples:
        attempts += 1
        if attempts > 20 * n_samples + 100:
            raise ValueError(f"Could not find {n_samples} windows of {seq_len} tokens in the text")
        start = rng.randint(0, len(text) - chars - 1)
        ids = tokenizer(text[start : start + chars], return_tensors="pt").input_ids[0]
        if ids.numel() >= seq_len:
            windows.append(ids[:seq_len])
    return torch.stack(windows)


def calibration_batches(tokenizer, config: CalibrationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, search windows) for a config, from its local or hub text."""
    text, _ = load_text(config.dataset, config.split)
    calib = sample_windows(tokenizer, text, config.n_samples, config.seq_len, config.seed)
    search = sample_windows(tokenizer, text, config.n_search, config.seq_len, config.seed + SEARCH_SEED_OFFSET)
    return calib, search
