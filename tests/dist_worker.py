"""A profile build on a tiny model, run by tests/test_scale.py under `torchrun --nproc_per_node 2` (gloo).

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py CORPUS CACHE_DIR OUT_JSON
Rank 0 writes the profile folder's path to OUT_JSON.
"""
import json
import sys
from pathlib import Path

import torch

from helpers import tiny_loaded
from lems_core import distributed
from lems_core.calibration import CalibrationConfig
from lems_core.multi_eval import evaluate_plans
from lems_core.pipeline import ProfileSettings, build_profile
from lems_core.run import Run

CFG = dict(split="train", n_samples=3, seq_len=48, seed=1, n_search=2)


def main(corpus: str, cache: str, out: str) -> None:
    torch.set_num_threads(1)
    ctx = distributed.context()
    folder = build_profile(tiny_loaded(8), "kfac", CalibrationConfig(dataset=corpus, **CFG),
                           ProfileSettings(extra_ratios=(0.5,)), force=True, run=Run(cache_dir=Path(cache)))
    spread = evaluate_plans(["a", "b", "c"], evaluate=_Fake)  # which rank evaluated which plan
    if ctx.main:
        Path(out).write_text(json.dumps({"folder": str(folder), "world": ctx.world, "spread": spread}))


class _Fake:
    """Stands in for evaluate_plan: records the plan and the rank that evaluated it."""

    def __init__(self, plan, run, **kwargs):
        self.plan, self.device = plan, run.device

    def to_dict(self):
        return {"plan": self.plan, "rank": distributed.context().rank, "device": self.device}


if __name__ == "__main__":
    main(*sys.argv[1:4])
