"""Under torchrun (2 ranks, TP1 so DP 2), with the default group's timeout shortened to 3 s by
the test: rank 0 works for longer than that (a rollout round) while rank 1 waits on the control
group, then rank 0 sends each rank only its own micro-batches. Each rank writes what it got."""

import json
import sys
import time
from pathlib import Path

from megatron_ring.platform import distributed
from megatron_ring.rl import batch_transfer
from megatron_ring.rl.rl_batch import Row


def rows(dp_rank: int) -> list[list[Row]]:
    """Data-parallel rank d's micro-batches: distinct per rank, the second one a dummy."""
    return [[Row([1, 2, 3 + dp_rank, 4], 1, 3, 0.5, 1.0 + dp_rank, [-0.25, -0.5 - dp_rank])], []]


def main(out: str, seconds: str, control_timeout_s: str) -> None:
    distributed.init(1, 1, control_timeout_s=float(control_timeout_s))
    rank = 0 if distributed.is_rank0() else 1
    dp_of = batch_transfer.dp_ranks()
    waited = time.monotonic()
    distributed.rank0_then_broadcast(lambda: time.sleep(float(seconds)))
    waited = time.monotonic() - waited
    plan = [rows(d) for d in range(2)] if rank == 0 else None
    mine, divisor = batch_transfer.scatter(plan, 7, dp_of)
    got = [[vars(r) for r in mb] for mb in mine]
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"dp_of": dp_of, "waited_s": waited, "divisor": divisor, "mine": got}))
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
