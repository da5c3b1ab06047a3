"""Rank 0 -> every rank: its own micro-batches and nothing else, as flat tensors on the control
group (gloo), not the step's responses as pickled objects. A rank receives the rows of its
data-parallel rank (TP peers get the same), packed as

    header   int64 [7]: micro-batches, rows, token ids, logprobs, the loss divisor D, and the
             routing's layers and top_k (0 without routed experts)
    mb_rows  int64 [micro-batches]: rows per micro-batch (0: a dummy micro-batch)
    spans    int64 [rows, 3]: row length, lo, hi (positions predicting its loss tokens)
    ids      int64 [token ids]: every row's prompt + response tokens, concatenated
    values   float64 [rows, 2]: weight, advantage
    logp     float32 [logprobs]: each row's hi - lo rollout logprobs, concatenated
    routing  uint8 [token ids, layers, top_k]: every position's routed experts (empty without)

so rank 0 sends O(tokens) bytes per rank and a rank holds only what it trains on."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from megatron_ring.platform import distributed
from megatron_ring.rl.rl_batch import Row

MicroBatchRows = list[Row]


def pack(micro_batches: list[MicroBatchRows], divisor: int) -> list[torch.Tensor]:
    rows = [r for mb in micro_batches for r in mb]
    ids = [t for r in rows for t in r.ids]
    logp = [x for r in rows for x in r.logp]
    routed = [r.routing for r in rows if r.routing is not None]
    layers, top_k = routed[0].shape[1:] if routed else (0, 0)
    assert len(routed) in (0, len(rows)), "some rows have routed experts, others not"
    routing = torch.from_numpy(np.concatenate(routed)) if routed else torch.zeros((0, 0, 0), dtype=torch.uint8)
    header = torch.tensor([len(micro_batches), len(rows), len(ids), len(logp), divisor, layers, top_k],
                          dtype=torch.int64)
    return [header,
            torch.tensor([len(mb) for mb in micro_batches], dtype=torch.int64),
            torch.tensor([[len(r.ids), r.lo, r.hi] for r in rows], dtype=torch.int64).reshape(len(rows), 3),
            torch.tensor(ids, dtype=torch.int64),
            torch.tensor([[r.weight, r.advantage] for r in rows], dtype=torch.float64).reshape(len(rows), 2),
            torch.tensor(logp, dtype=torch.float32), routing]


def unpack(tensors: list[torch.Tensor]) -> tuple[list[MicroBatchRows], int]:
    header, mb_rows, spans, ids, values, logp, routing = tensors
    divisor = int(header[4])
    routed = routing.numel() > 0
    routing = routing.numpy()
    rows, at_id, at_lp = [], 0, 0
    for (length, lo, hi), (weight, adv) in zip(spans.tolist(), values.tolist()):
        rows.append(Row(ids[at_id:at_id + length].tolist(), lo, hi, weight, adv, logp[at_lp:at_lp + hi - lo].tolist(),
                        routing[at_id:at_id + length] if routed else None))
        at_id += length
        at_lp += hi - lo
    assert at_id == len(ids) and at_lp == len(logp), "packed rows do not add up to the sent tensors"
    out, at = [], 0
    for n in mb_rows.tolist():
        out.append(rows[at:at + n])
        at += n
    assert at == len(rows), "micro-batch row counts do not add up to the sent rows"
    return out, divisor


def _shapes(header: torch.Tensor) -> list[tuple]:
    n_mb, n_rows, n_ids, n_logp, _, layers, top_k = header.tolist()
    return [(n_mb,), (n_rows, 3), (n_ids,), (n_rows, 2), (n_logp,), (n_ids if layers else 0, layers, top_k)]


_DTYPES = [torch.int64, torch.int64, torch.int64, torch.float64, torch.float32, torch.uint8]


def scatter(per_dp_rank: list[list[MicroBatchRows]] | None, divisor: int, dp_rank_of: list[int]
            ) -> tuple[list[MicroBatchRows], int]:
    """Collective. On rank 0, per_dp_rank[d] are data-parallel rank d's micro-batches and
    dp_rank_of[r] is global rank r's data-parallel rank; every rank returns its own (and D)."""
    if not distributed.is_rank0():
        group = distributed.control_group()
        header = torch.empty(7, dtype=torch.int64)
        dist.recv(header, src=0, group=group)
        parts = [torch.empty(shape, dtype=dtype) for shape, dtype in zip(_shapes(header), _DTYPES)]
        for t in parts:
            dist.recv(t, src=0, group=group)
        return unpack([header, *parts])
    packed = {d: pack(mbs, divisor) for d, mbs in enumerate(per_dp_rank)}
    for rank in range(1, len(dp_rank_of)):
        for t in packed[dp_rank_of[rank]]:
            dist.send(t, dst=rank, group=distributed.control_group())
    return per_dp_rank[dp_rank_of[0]], divisor


def dp_ranks() -> list[int]:
    """Collective: the data-parallel rank of every global rank, in global rank order."""
    from megatron.core import parallel_state as ps  # deferred: Megatron is slow to import

    mine = ps.get_data_parallel_rank()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([mine], dtype=torch.int64), group=distributed.control_group())
    return [int(t) for t in out]
