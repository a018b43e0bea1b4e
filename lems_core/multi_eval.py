"""Several plans evaluated at once, spread over torch.distributed ranks.

Under torchrun each rank loads the model on its own GPU and evaluates every
world-th plan (round robin); rank 0 gathers the results in the plans' order. In a
single process this is a plain loop.
"""
from __future__ import annotations

from typing import Callable, Sequence

from . import distributed
from .pipeline import EvalResult, evaluate_plan
from .run import DEFAULT_RUN, Run


def evaluate_plans(plans: Sequence, evaluate: Callable[..., EvalResult] = evaluate_plan, *, run: Run = DEFAULT_RUN,
                   **kwargs) -> list[dict] | None:
    """``evaluate(plan, run=run, **kwargs).to_dict()`` for every plan, sharded across ranks.

    Returns the results in ``plans`` order on rank 0 (and in a single process), None
    on the other ranks. The run's device defaults to each rank's own GPU under torchrun.
    """
    ctx = distributed.context()
    if ctx.world > 1 and run.device is None:
        run = run.but(device=ctx.device)
    mine = distributed.shard(list(enumerate(plans)), ctx)
    done = [(i, evaluate(plan, run=run, **kwargs).to_dict()) for i, plan in mine]
    gathered = distributed.gather_lists(ctx, done)
    return None if gathered is None else [r for _, r in sorted(gathered, key=lambda x: x[0])]
