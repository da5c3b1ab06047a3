"""C3PO's fixed token budget (paper 3.2): walk the step's responses in prompt-group order and take
whole responses while the running count is below the budget Phi; the response that crosses Phi
is cut at the token level, so exactly Phi tokens carry loss every optimizer step.

`fill_buckets` fills one bucket of Phi (budget scope "global") or one of Phi per data-parallel
rank ("per_rank", so every rank computes on exactly Phi tokens). What is not taken is returned:
the RL loop drops it or carries it, with the cut response's remainder first, to the next step."""

from __future__ import annotations

from megatron_ring.rl.responses import Segment, split_at


def fill_buckets(segments: list[Segment], budget: int, n_buckets: int = 1) -> tuple[list[list[Segment]], list[Segment]]:
    """Fill n_buckets buckets of exactly `budget` loss tokens each, in order (fewer only if the
    segments run out). Returns (buckets, leftover)."""
    if budget <= 0 or n_buckets <= 0:
        raise ValueError(f"budget and n_buckets must be > 0, got {budget}, {n_buckets}")
    queue = list(segments)
    buckets: list[list[Segment]] = []
    for _ in range(n_buckets):
        bucket, filled = [], 0
        while queue and filled < budget:
            take, rest = split_at(queue.pop(0), budget - filled)
            bucket.append(take)
            filled += take.n_tokens
            if rest is not None:
                queue.insert(0, rest)  # the cut response's remainder opens the next bucket
        buckets.append(bucket)
    assert_partition(segments, [s for b in buckets for s in b] + queue)
    return buckets, queue


def tokens_of(segments) -> int:
    return sum(s.n_tokens for s in segments)


def assert_partition(before: list[Segment], after: list[Segment]) -> None:
    """No loss token lost or counted twice: per response, the ranges after the split tile the
    ranges before it exactly."""
    def spans(segs):
        out: dict[int, list[tuple[int, int]]] = {}
        for s in segs:
            out.setdefault(s.response.uid, []).append((s.start, s.end))
        return {uid: _merge(v) for uid, v in out.items()}

    a, b = spans(before), spans(after)
    assert a == b, f"token ranges changed: {a} vs {b}"
    assert tokens_of(before) == tokens_of(after), (tokens_of(before), tokens_of(after))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    ranges = sorted(ranges)
    merged = [list(ranges[0])]
    for s, e in ranges[1:]:
        assert s >= merged[-1][1], f"overlapping loss ranges {ranges}"  # a token counted twice
        if s == merged[-1][1]:
            merged[-1][1] = e
        else:
            merged.append([s, e])
    return [tuple(m) for m in merged]
