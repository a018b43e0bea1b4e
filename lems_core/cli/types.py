"""Bounded argparse types of the CLI's options.

Every number is parsed here, before any model loads: too long to be meant (400 nines),
not finite, or out of range is an argparse error (exit 2 with one line), never a
traceback or a silently absurd run.
"""
from __future__ import annotations

import argparse
import math

MAX_NUMBER_CHARS = 40  # a double holds 17 significant digits: a longer number is a typo or an attack
MAX_COUNT = 2**31 - 1  # counts and sizes (tokens, windows, samples, trials): a C int, beyond any real run
MAX_SEED = 2**32 - 1


def _number_text(text: str) -> str:
    """``text`` stripped; too long to be a number anyone meant (400 nines) is an argparse error."""
    text = str(text).strip()
    if len(text) > MAX_NUMBER_CHARS:
        raise argparse.ArgumentTypeError(f"{text[:20]!r}… ({len(text)} characters) is too long to be a number "
                                         f"(at most {MAX_NUMBER_CHARS})")
    return text


def int_in(low: int, high: int, what: str):
    """argparse type: an integer in [low, high]; ``what`` ("a positive integer") heads the message."""

    def parse(text: str) -> int:
        text = _number_text(text)
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be {what} of at most {high}, got {value}")
        return value

    parse.__name__ = what
    return parse


# 0 windows, samples or tokens would mean nothing to measure
positive_int = int_in(1, MAX_COUNT, "a positive integer")
seed_int = int_in(0, MAX_SEED, "a non-negative seed")
# latency.model_timing's MAX_TOKENS and MAX_REPEATS (not imported: it loads torch); the model's positions are checked
# once it is loaded
latency_tokens = int_in(1, 1 << 20, "a positive number of prompt tokens")
latency_repeats = int_in(1, 100, "a positive number of repeats")
_window_count = int_in(1, MAX_COUNT, "a positive integer or 'all' (every window)")


def window_cap(text: str) -> int | str:
    """argparse type of --max-windows: a positive cap, or "all". 0 and negatives are refused:
    a zero cap would measure nothing (a perplexity of Infinity)."""
    if str(text).strip().lower() == "all":
        return "all"
    return _window_count(text)


def finite_float(text: str) -> float:
    """argparse type: a finite number of at most MAX_NUMBER_CHARS characters (nan / inf are refused)."""
    text = _number_text(text)
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def kept_fraction(text: str) -> float:
    """argparse type: a budget, the kept fraction of the compressible parameters, in (0, 1]."""
    value = finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text.strip()} is not a kept fraction in (0, 1]")
    return value


def kept_fractions(text: str) -> list[float]:
    """argparse type: comma-separated kept fractions ("0.8,0.6"), in the order given; "" is none."""
    return [kept_fraction(token) for token in str(text).split(",") if token.strip()]


def bias_fit_ratios(text: str) -> tuple[float, ...]:
    """argparse type of --bias-fit-ratios: "0.6,0.8" -> (0.6, 0.8), sorted and unique; "" or "none" -> ()."""
    if str(text).strip().lower() in ("", "none"):
        return ()
    return tuple(sorted({round(value, 6) for value in kept_fractions(text)}))


def memory_size(text: str) -> int:
    """argparse type of --max-memory: 24GB, 512MB, 1.5G or bytes (binary units)."""
    from ..memory import MemoryBudgetError, parse_bytes

    try:
        return parse_bytes(text)
    except MemoryBudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
