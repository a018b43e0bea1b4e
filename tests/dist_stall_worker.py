"""Rank 0 merges while rank 1 never joins: run by tests/test_scale.py under `torchrun --nproc_per_node 2` (gloo).

    LEMS_DIST_TIMEOUT_S=2 torchrun --standalone --nproc_per_node 2 tests/dist_stall_worker.py
Rank 0 must fail with a DistributedError within the timeout; rank 1 sleeps (as a stopped
rank would) until torchrun ends it.
"""
import time

from lems_core import distributed


def main() -> None:
    ctx = distributed.context()
    if ctx.main:
        started = time.monotonic()
        try:
            distributed.merge_at_main(ctx, {}, {})
        finally:
            print(f"rank 0 waited {time.monotonic() - started:.1f} s", flush=True)
    else:
        time.sleep(120)


if __name__ == "__main__":
    main()
