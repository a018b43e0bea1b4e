"""Step 2: calibration and search sequences, sampled as in the reference protocol.

docs/reference/methods.md §5.1: join the split with "\\n\\n", take seeded random character
offsets, tokenise a 10 x seq_len character window and keep its first seq_len
tokens. The search set (sensitivities, KL) uses the same routine with seed + 1000.

Offsets (``sampling``): the reference (``all_utils/data_utils.py``
``get_calib_train_data``) draws ``randint(0, len(text) - seq_len - 1)`` for N + 1
draws and never uses the last one; ``"reference"`` does exactly that. Profiles
built before this option existed drew from ``len(text) - 10 seq_len - 1``
(``"chars10"``); a config dict without the field means that rule, so their
windows and cache keys are unchanged.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace

import torch

from .data import has_local, load_text

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
    sampling: str = "reference"  # offset rule, see the module docstring and SAMPLING_RULES

    def __post_init__(self):
        for name in ("n_samples", "seq_len", "n_search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"calibration {name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"calibration seed must be an integer, got {self.seed!r}")
        if not isinstance(self.dataset, str) or not self.dataset or not isinstance(self.split, str):
            raise ValueError(f"calibration dataset and split must be non-empty strings, got {self.dataset!r}/{self.split!r}")
        if self.sampling not in SAMPLING_RULES:
            raise ValueError(f"calibration sampling must be one of {', '.join(SAMPLING_RULES)}, got {self.sampling!r}")

    def to_dict(self) -> dict:
        """The config as stored in profiles, plans and cache keys.

        ``sampling`` is left out at its legacy value so that configs (and so cache
        keys) of profiles built before the field existed stay byte-identical.
        """
        d = asdict(self)
        if d["sampling"] == LEGACY_SAMPLING:
            del d["sampling"]
        return d

    @staticmethod
    def from_dict(d: dict) -> "CalibrationConfig":
        if not isinstance(d, dict):
            raise ValueError(f"calibration must be an object, got {type(d).__name__}")
        kwargs = {k: d[k] for k in CalibrationConfig.__dataclass_fields__ if k in d}
        kwargs.setdefault("sampling", LEGACY_SAMPLING)  # written before the field existed
        return CalibrationConfig(**kwargs)


# Offset rules of sample_windows (docs/reference/methods.md §9 "Calibration").
SAMPLING_RULES = ("reference", "chars10")
LEGACY_SAMPLING = "chars10"


# Limits for a calibration config that arrives from outside (an uploaded or loaded
# plan): generous for real runs, small enough that a hostile file cannot ask for hours.
UNTRUSTED_LIMITS = {"n_samples": 4096, "seq_len": 32768, "n_search": 1024}
UNTRUSTED_SPLITS = ("train", "validation", "test")


def untrusted_calibration(d: dict) -> CalibrationConfig:
    """A calibration config from a plan file, resolved by dataset *name* only.

    A plan's ``meta.calibration`` is data from whoever wrote the file: its dataset
    must be one of the known corpus names (the allow-list the app's own forms use,
    ``data.HUB_DATASETS``), never a path, and its sizes must be within
    ``UNTRUSTED_LIMITS``. Raises ValueError naming the offending field.
    """
    from .data import HUB_DATASETS, canonical_dataset

    cfg = CalibrationConfig.from_dict(d)
    name = canonical_dataset(cfg.dataset)
    if name is None:
        raise ValueError(f"plan calibration dataset {cfg.dataset!r} is not a known dataset name "
                         f"({', '.join(sorted(HUB_DATASETS))}); file paths in plans are never opened")
    if cfg.split not in UNTRUSTED_SPLITS:
        raise ValueError(f"plan calibration split {cfg.split!r} is not one of {', '.join(UNTRUSTED_SPLITS)}")
    for field_name, limit in UNTRUSTED_LIMITS.items():
        if getattr(cfg, field_name) > limit:
            raise ValueError(f"plan calibration {field_name}={getattr(cfg, field_name)} exceeds the limit {limit}")
    return replace(cfg, dataset=name)


# Named sizes: the reference protocol, and smaller ones that fit a CPU.
PRESETS = {
    "reference": CalibrationConfig(),
    "gpu-small": CalibrationConfig(n_samples=64, seq_len=2048, n_search=16),
    "cpu": CalibrationConfig(n_samples=16, seq_len=512, n_search=8),
    "cpu-tiny": CalibrationConfig(n_samples=4, seq_len=256, n_search=2),
}


def preset(name: str, **overrides) -> CalibrationConfig:
    """A named preset with overrides. Without a ``split`` override the split is
    WikiText-2 *train* (the reference's) when a local copy exists, else validation."""
    if name not in PRESETS:
        raise ValueError(f"Unknown calibration preset {name!r}: choose from {sorted(PRESETS)}")
    base = PRESETS[name]
    if "split" not in overrides and "dataset" not in overrides and has_local(base.dataset, "train"):
        base = replace(base, split="train")
    return replace(base, **overrides)


def default_preset(device: str) -> str:
    """The preset the CLI and the app start from: the reference's sizes on a GPU, ``cpu`` otherwise."""
    return "reference" if str(device).startswith("cuda") else "cpu"


def demo_calibration() -> CalibrationConfig:
    """The committed demo profiles' calibration: the ``cpu`` preset (16 x 512 tokens) with 2 x 512
    search windows, since the per-layer KL sweep dominates a CPU build (about one 1k-token pass
    per layer and ratio). A function, because the preset's split depends on the local data."""
    return preset("cpu", n_search=2)


def sample_windows(tokenizer, text: str, n_samples: int, seq_len: int, seed: int,
                   sampling: str = "reference") -> torch.Tensor:
    """`n_samples` token windows of exactly `seq_len` tokens, as a LongTensor [n, seq_len].

    Each draw tokenises ``text[i : i + 10 seq_len]`` at a seeded random character
    offset i. ``"reference"``: i ~ randint(0, len - seq_len - 1), the reference's
    rule; a draw near the end can give fewer than seq_len tokens: the reference
    then returns fewer windows, here the draw is skipped and drawing goes on, so
    the result is the reference's whenever no draw is short (its extra N+1-th
    draw is never used, so it does not change the windows). ``"chars10"``: the
    earlier rule i ~ randint(0, len - 10 seq_len - 1).
    """
    chars = 10 * seq_len
    if sampling not in SAMPLING_RULES:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING_RULES)}, got {sampling!r}")
    upper = len(text) - (seq_len if sampling == "reference" else chars) - 1
    if upper < 0 or len(text) <= chars:
        raise ValueError(f"Text of {len(text)} characters is too short for {seq_len}-token windows")
    rng = random.Random(seed)
    windows, attempts = [], 0
    while len(windows) < n_samples:
        attempts += 1
        if attempts > 20 * n_samples + 100:
            raise ValueError(f"Could not find {n_samples} windows of {seq_len} tokens in the text")
        start = rng.randint(0, upper)
        ids = tokenizer(text[start : start + chars], return_tensors="pt").input_ids[0]
        if ids.numel() >= seq_len:
            windows.append(ids[:seq_len])
    return torch.stack(windows)


def calibration_batches(tokenizer, config: CalibrationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, search windows) for a config, from its local or hub text."""
    text, _ = load_text(config.dataset, config.split)
    calib = sample_windows(tokenizer, text, config.n_samples, config.seq_len, config.seed, config.sampling)
    search = sample_windows(tokenizer, text, config.n_search, config.seq_len, config.seed + SEARCH_SEED_OFFSET,
                            config.sampling)
    return calib, search
