"""Rewards of one rollout round: rank 0 scores every response in the reward worker pool (hard
timeouts, sandboxed code), then every rank gets the same rewards."""

from __future__ import annotations

import torch.distributed as dist

from megatron_ring.rl.responses import Response


def score(pool, responses: list[Response], rows: dict[int, object], decode) -> list:
    """Sets .reward on every response; returns the pool's RewardResult per response."""
    box = [None]
    if dist.get_rank() == 0:
        box[0] = pool.score([(r.domain, decode(r.tokens), rows[r.uid].row) for r in responses])
    dist.broadcast_object_list(box, src=0)
    for r, res in zip(responses, box[0]):
        r.reward = res.reward
    return box[0]
