"""Segments -> micro-batches per data-parallel rank. Every rank must run the same number of
micro-batches (MoE all-to-all and the DP gradient reduction are collective), so ranks with
fewer are padded with empty micro-batches (one dummy row, no loss); segments are spread so the
ranks' token loads are close (longest first to the least loaded rank that has room). The
invariants (equal counts, every segment exactly once) are asserted here, not hoped for."""

from __future__ import annotations

import math

from megatron_ring.rl.responses import Segment
from megatron_ring.rl.token_budget import assert_partition

MicroBatch = list[Segment]  # empty: a dummy micro-batch


def spread(segments: list[Segment], dp: int) -> list[list[Segment]]:
    """Whole segments to ranks: at most ceil(n/dp) each, balancing forward tokens."""
    cap = math.ceil(len(segments) / dp) if segments else 0
    ranks: list[list[Segment]] = [[] for _ in range(dp)]
    load = [0] * dp
    for seg in sorted(segments, key=lambda s: (-s.seq_len, s.response.uid, s.start)):
        r = min((r for r in range(dp) if len(ranks[r]) < cap), key=lambda r: (load[r], r))
        ranks[r].append(seg)
        load[r] += seg.seq_len
    return ranks


def by_tokens(segs: list[Segment], max_tokens: int) -> list[MicroBatch]:
    """First-fit decreasing: each segment (longest first) joins the first micro-batch with room
    for its seq_len tokens; a segment longer than max_tokens is a micro-batch of its own."""
    out: list[MicroBatch] = []
    room: list[int] = []
    for seg in sorted(segs, key=lambda s: (-s.seq_len, s.response.uid, s.start)):
        k = next((i for i, free in enumerate(room) if free >= seg.seq_len), None)
        if k is None:
            out.append([seg])
            room.append(max_tokens - seg.seq_len)
        else:
            out[k].append(seg)
            room[k] -= seg.seq_len
    return out


def micro_batches(per_rank: list[list[Segment]], micro_batch: int, max_tokens: int = 0) -> list[list[MicroBatch]]:
    """Each rank's segments in micro-batches of `micro_batch` rows (similar lengths together, to
    pad little), or of at most `max_tokens` tokens when > 0 (packed into one row each), every
    rank padded to the same number of micro-batches."""
    if micro_batch <= 0:
        raise ValueError(f"micro_batch must be > 0, got {micro_batch}")
    out = []
    for segs in per_rank:
        if max_tokens > 0:
            out.append(by_tokens(segs, max_tokens))
            continue
        segs = sorted(segs, key=lambda s: (s.seq_len, s.response.uid, s.start))
        out.append([segs[i:i + micro_batch] for i in range(0, len(segs), micro_batch)])
    count = max(1, max(len(m) for m in out))
    for m in out:
        m.extend([] for _ in range(count - len(m)))
    assert len({len(m) for m in out}) == 1, "ranks must run the same number of micro-batches"
    assert_partition([s for segs in per_rank for s in segs], [s for m in out for mb in m for s in mb])
    return out


def plan(buckets: list[list[Segment]], dp: int, micro_batch: int, per_rank: bool,
         max_tokens: int = 0) -> list[list[MicroBatch]]:
    """Buckets from fill_buckets -> micro-batches per rank. per_rank (StepBudget.per_rank): one
    bucket per rank, each trained where it was filled; else one bucket spread over the ranks."""
    if len(buckets) != (dp if per_rank else 1):
        raise ValueError(f"{len(buckets)} buckets for {dp} data-parallel ranks (per_rank={per_rank})")
    return micro_batches(buckets if per_rank else spread(buckets[0], dp), micro_batch, max_tokens)
