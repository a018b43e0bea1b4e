"""Loading the demo model: a plain transformers GGUF load against the project's cached conversion.

The plain load is ``AutoTokenizer`` + ``AutoModelForCausalLM.from_pretrained(folder,
gguf_file=...)`` in fp32 (what every command paid before the conversion cache). The warm
load is ``load_model("demo", "cpu")`` once the GGUF file has been converted into the
cache (``lems_core/gguf_cache.py``): hash memo lookup, conversion check, tokenizer and
safetensors load, fingerprint. A missing conversion is made first and its time printed.
The two loads alternate ``--repeats`` times in one process; the medians and their ratio
are printed with the load average and thread count next to each timing. Goal: warm at
most 0.15x the plain load.

    python -m bench.model_load [--repeats 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch

from lems_core.gguf_cache import converted_folder
from lems_core.model import demo_gguf_path, load_model

GOAL = 0.15


def plain_gguf_load() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo_gguf_path()
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def warm_load() -> None:
    load_model("demo", device="cpu")


def timed(label: str, load) -> float:
    gc.collect()
    start = time.perf_counter()
    load()
    seconds = time.perf_counter() - start
    print(f"  {label:<34} {seconds:7.2f} s | load average {os.getloadavg()[0]:.2f}, "
          f"{torch.get_num_threads()} torch thread(s)", flush=True)
    return seconds


def ensure_converted() -> None:
    """Convert the demo once if its conversion is missing or damaged; say which it was."""
    start = time.perf_counter()
    conversion = converted_folder(demo_gguf_path())
    seconds = time.perf_counter() - start
    what = "converted now (first use)" if conversion.converted else "already converted, checked"
    print(f"conversion {conversion.folder}: {what} in {seconds:.2f} s | load average {os.getloadavg()[0]:.2f}, "
          f"{torch.get_num_threads()} torch thread(s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average at start {os.getloadavg()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch thread(s), demo {demo_gguf_path().name}")
    ensure_converted()
    plain, warm = [], []
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}")
        plain.append(timed("plain transformers GGUF load", plain_gguf_load))
        warm.append(timed("warm load_model('demo') (converted)", warm_load))
    p, w = statistics.median(plain), statistics.median(warm)
    verdict = "meets" if w / p <= GOAL else "misses"
    print(f"median: plain GGUF {p:.2f} s, warm converted {w:.2f} s, ratio {w / p:.3f}x "
          f"({verdict} the goal <= {GOAL}x) | load average {os.getloadavg()[0]:.2f}, "
          f"{torch.get_num_threads()} torch thread(s)")


if __name__ == "__main__":
    main()
