"""bench/scale.py end to end at a tiny width: the child runs, --offload, --reuse and the summary (issue #10).

The benchmark's figures are not checked here (they depend on the machine); what is checked is
that it runs, that an offloaded run really keeps its blocks off memory (accelerate's map), and
that reused rows are read back instead of run again.
"""
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _scale(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.scale", "--width", "tiny", "--methods", "svd_llm",
           "--max-memory", "4MB", "--samples", "1", "--seq-len", "16", "--vocab", "256", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def test_scale_bench_runs_offloaded_and_reuses_its_rows(tmp_path):
    runs = tmp_path / "runs.jsonl"
    done = _scale("--depths", "1,2", "--offload", "--reuse", str(runs), "-o", str(tmp_path / "table.txt"))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in runs.read_text().splitlines()]
    assert [(r["depth"], r["offload"], r["blocks_offloaded"]) for r in rows] == [(1, True, 1), (2, True, 2)]
    for r in rows:
        assert 0 < r["gram_peak"] <= r["gram_budget"] and r["peak_anon"] > 0 and r["peak_rss"] >= r["model_rss"]
    table = (tmp_path / "table.txt").read_text()
    assert "svd_llm: working peak 2 vs 1 block(s)" in table and "weights on disk but one block" in table
    again = _scale("--depths", "1,2", "--offload", "--reuse", str(runs))
    assert again.returncode == 0 and len(runs.read_text().splitlines()) == 2  # read back, not run again
    whole = _scale("--depths", "1", "--reuse", str(runs))  # another configuration: run, and appended
    assert whole.returncode == 0, whole.stderr[-2000:]
    last = json.loads(runs.read_text().splitlines()[-1])
    assert len(runs.read_text().splitlines()) == 3 and "offload" not in last and last["blocks_offloaded"] == 0
