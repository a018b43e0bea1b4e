"""bench/inference.py at a tiny random width: it runs end to end and builds what it says it times.

The figures are not checked (they depend on the machine); what is checked is that the
factorised models have the planned ranks and the planned parameter count, that the
prepared model gives the compressed one's logits, and that every section prints.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.inference import factor_source
from lems_core.compression import LowRankLinear, compress_model, count_parameters
from lems_core.model import compressible_layers, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_random_factors_have_the_planned_ranks_and_the_dense_scale():
    model = tiny_model("llama", hidden_size=64, intermediate_size=160)
    layers = compressible_layers(model)
    ranks = {l.name: max(1, int(0.5 * l.eq_rank)) for l in layers}
    ranks[layers[0].name] = None  # kept dense
    dense = {l.name: model.get_submodule(l.name).weight.detach().clone() for l in layers}
    before = count_parameters(model)
    applied = compress_model(model, ranks, factor_source(model, random_factors=True))
    assert applied == ranks
    for layer in layers[1:]:
        module = model.get_submodule(layer.name)
        assert isinstance(module, LowRankLinear) and module.rank == ranks[layer.name]
        product = module.b.weight @ module.a.weight
        assert product.shape == dense[layer.name].shape
        # entries of b @ a have the dense weight's standard deviation in expectation (a few sigma of room)
        assert 0.5 < product.std().item() / dense[layer.name].std().item() < 2.0
    assert not isinstance(model.get_submodule(layers[0].name), LowRankLinear)
    saved = sum(l.in_features * l.out_features - r * (l.in_features + l.out_features)
                for l in layers[1:] for r in [ranks[l.name]])
    assert count_parameters(model) == before - saved


def test_inference_bench_runs_at_a_tiny_width():
    cmd = [sys.executable, "-m", "bench.inference", "--width", "tiny", "--depth", "1", "--vocab", "128",
           "--seq-len", "16", "--new-tokens", "3", "--threads", "1", "--repeats", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "random tiny-width LLaMA, 1 blocks, vocab 128 uniform 0.6: 7 factorised Linears" in out
    assert "prepared: largest logit difference from compressed" in out
    line = out.split("prepared: largest logit difference from compressed ")[1].splitlines()[0]
    diff, largest = float(line.split()[0]), float(line.split("logits up to ")[1].rstrip(")"))
    # reordered float32 sums (tests/test_fused.py's bound): eps x hidden size (64) x blocks (1) x the logits' scale
    assert diff <= torch.finfo(torch.float32).eps * 64 * 1 * max(largest, 1.0)
    for section in ("matrix products of one token alone", "stage split, generate", "forward 1x16",
                    "generate 3 greedy"):
        assert section in out
