"""Peak memory of the user's command, ``lems profile --max-memory``, by depth (``python -m bench.scale --cli``).

Saves a random-weight LLaMA of the bench width (``bench.scale.BENCH_WIDTHS``) with an
offline word tokenizer to a folder, writes a corpus of its words, runs
``python -m lems_core profile --model DIR --max-memory B`` (KFAC, KL sweep and bias fit
on, small windows) in a child process and samples the child's RssAnon plus the resident
pages of its memory-mapped weight files every 20 ms (``child_memory``). Per depth: the
budget, the weights (parameter bytes), the peak, the peak beyond the weights, the same
less the idle interpreter (a child that imports the CLI and torch, nothing else) and the ratio of beyond-the-weights to the first depth's.

Goal: beyond the weights at the deepest within 1.1x of 2 blocks, and under the budget.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lems_core.memory import file_mappings, parse_bytes, status_bytes

GB = 2**30


def child_memory(pid: int) -> int:
    """RssAnon of process ``pid`` plus the resident pages of its memory-mapped safetensors files (0 once gone).

    transformers maps a folder's weights from their files: those pages are RssFile, not
    RssAnon, so the weights' own memory is the mapped part plus whatever was copied to
    anonymous memory; subtracting the parameter bytes from this sum leaves the memory
    beyond the weights, however the weights were loaded.
    """
    return status_bytes("RssAnon", pid) + sum(rss for _, _, rss in file_mappings(pid=pid))


def peak_of(cmd: list[str], env: dict) -> tuple[int, float, str]:
    """(peak of ``child_memory``, seconds, its stderr tail), sampled every 20 ms."""
    started, peak = time.perf_counter(), 0
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        while child.poll() is None:
            peak = max(peak, child_memory(child.pid))
            time.sleep(0.02)
        err.seek(0)
        tail = err.read()[-2000:]
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{tail}")
    return peak, time.perf_counter() - started, tail


def save_model(args, depth: int, folder: Path) -> int:
    """The bench model of ``depth`` blocks with a word tokenizer in ``folder``; returns its parameter bytes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import word_tokenizer

    from .scale import build_model

    args.depth = depth
    model = build_model(args)
    model.save_pretrained(folder)
    word_tokenizer(args.vocab).save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def write_corpus(path: Path, vocab: int) -> Path:
    rng = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(f"w{i}" for i in rng.integers(2, vocab, 12)) for _ in range(400)))
    return path


def run(args) -> list[str]:
    """Every depth of ``args.depths`` through the CLI; the table's lines."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    idle, _, _ = peak_of([sys.executable, "-c", "import torch, lems_core.cli, transformers"], env)
    lines = [f"load average {os.getloadavg()}, {args.threads} thread(s), width {args.width}, vocab {args.vocab}, "
             f"model {args.dtype}, KFAC, {args.samples}x{args.seq_len} calibration tokens, 2 search windows, "
             f"bias fit at 0.6, budget {args.max_memory}; idle interpreter {idle / GB:.2f}G; memory = RssAnon + resident pages of mapped safetensors",
             f"{'blocks':>6} {'budget':>7} {'weights':>8} {'peak':>7} {'beyond':>7} {'- interp':>8} "
             f"{'ratio':>6} {'windows':>7} {'seconds':>7} {'load avg':>8}"]
    print("\n".join(lines), flush=True)
    first, by_depth = None, {}
    for depth in (int(d) for d in args.depths.split(",")):
        with tempfile.TemporaryDirectory(prefix="lems-scale-cli-") as tmp:
            folder = Path(tmp) / "model"
            weights = save_model(args, depth, folder)
            corpus = write_corpus(Path(tmp) / "words.txt", args.vocab)
            cmd = [sys.executable, "-m", "lems_core", "profile", "--model", str(folder), "--decomposition", "kfac",
                   "--max-memory", args.max_memory, "--calib-dataset", str(corpus), "--calib-split", "train",
                   "--n-samples", str(args.samples), "--seq-len", str(args.seq_len), "--n-search", "2",
                   "--bias-fit-ratios", "0.6", "--cache-dir", str(Path(tmp) / "cache")]
            peak, seconds, _ = peak_of(cmd, env)
            windows = build_windows(Path(tmp) / "cache")
        beyond = peak - weights
        first = first or beyond
        by_depth[depth] = beyond
        line = (f"{depth:6d} {args.max_memory:>7} {weights / GB:7.2f}G {peak / GB:6.2f}G {beyond / GB:6.2f}G "
                f"{(beyond - idle) / GB:7.2f}G {beyond / first:6.2f} {windows:>7} {seconds:7.0f} {os.getloadavg()[0]:8.1f}")
        print(line, flush=True)
        lines.append(line)
    lines.extend(goal_lines(by_depth, parse_bytes(args.max_memory)))
    print("\n".join(lines[-2:]), flush=True)
    return lines


def build_windows(cache: Path) -> str:
    """How many Gram windows (calibration passes) the build chose, from its factor folder's index."""
    import json

    found = sorted(cache.glob("tensors/factor_blocks/*/index.json"))
    return str(json.loads(found[0].read_text()).get("meta", {}).get("windows", "?")) if found else "?"


def goal_lines(by_depth: dict[int, int], budget: int) -> list[str]:
    """The issue's two goals: the deepest within 1.1x of 2 blocks, and every depth under the budget."""
    deepest = max(by_depth)
    base = by_depth.get(2, by_depth[min(by_depth)])
    over = [d for d, b in by_depth.items() if b > budget]
    return [f"goal: beyond the weights at {deepest} blocks / at {2 if 2 in by_depth else min(by_depth)} = "
            f"{by_depth[deepest] / base:.2f}x (at most 1.1x)",
            f"goal: under the budget at every depth: {'yes' if not over else 'no, over at ' + str(over)}"]
