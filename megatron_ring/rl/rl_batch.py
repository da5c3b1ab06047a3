"""A micro-batch of segments as tensors: prompt + response tokens, one segment per row right-
padded, or (token-sized micro-batches) all segments packed into one row with per-segment
positions and document ids, so attention stays within each segment (a mask on CPU, THD under
transformer-engine). Per position t (which predicts token t+1): the loss weight, advantage and
the rollout/old/reference logprobs of that next token. Only a segment's own response tokens
[start, end) get a weight. Per position, with routed experts: the experts the rollout engine
chose for the token read there ([layers, top_k], UNKNOWN where it reported none)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_ring.models.router_replay import DTYPE, UNKNOWN
from megatron_ring.rl.responses import Segment


@dataclass
class RLBatch:
    input_ids: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s]: the next token
    weights: torch.Tensor  # [b, s] float: the loss mode's per-token weight, 0 off the segment
    advantages: torch.Tensor  # [b, s]
    rollout_logp: torch.Tensor  # [b, s]
    old_logp: torch.Tensor | None = None  # the actor's forward-only passes (a new batch carries them)
    ref_logp: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None  # packed: restarting at each segment
    doc_ids: torch.Tensor | None = None  # packed: the segment of each position, -1 for padding
    routing: torch.Tensor | None = None  # uint8 [b, s, layers, top_k]: the rollout engine's experts
    replay: torch.Tensor | None = None  # what the forwards replay (rl.router_replay; the actor sets it)

    def positions(self) -> torch.Tensor:
        if self.position_ids is not None:
            return self.position_ids
        b, s = self.input_ids.shape
        return torch.arange(s, device=self.input_ids.device).unsqueeze(0).expand(b, s)


@dataclass
class Row:
    """One segment as the trainer needs it: prompt + response tokens up to its end, the positions
    [lo, hi) that predict its loss tokens, their weight, the advantage and the rollout logprobs.
    What a data-parallel rank receives (rl/batch_transfer.py)."""

    ids: list[int]
    lo: int
    hi: int
    weight: float
    advantage: float
    logp: list[float]  # hi - lo values
    routing: np.ndarray | None = None  # uint8 [len(ids), layers, top_k]


def rows_of(segments: list[Segment], per_response_norm: bool) -> list[Row]:
    """per_response_norm: weight 1/|y| (GRPO's per-sample mean), else 1."""
    rows = []
    for seg in segments:
        r = seg.response
        p = len(r.prompt_ids)
        rows.append(Row(r.prompt_ids + r.tokens[:seg.end], p + seg.start - 1, p + seg.end - 1,
                        1.0 / len(r.tokens) if per_response_norm else 1.0, r.advantage,
                        r.rollout_logp[seg.start:seg.end], _routing_rows(r.routing, p + seg.end)))
    return rows


def _routing_rows(routing: np.ndarray | None, n: int) -> np.ndarray | None:
    """The routing of a row's n positions: the engine never read the response's last token."""
    if routing is None:
        return None
    out = np.full((n, *routing.shape[1:]), UNKNOWN, DTYPE)
    m = min(n, len(routing))
    out[:m] = routing[:m]
    return out


def _routing_tensor(rows: list[Row], shape: tuple[int, int]) -> torch.Tensor | None:
    """[b, s, layers, top_k] of UNKNOWN, to be filled per row (None when rows have no routing)."""
    if not rows or rows[0].routing is None:
        return None
    return torch.full((*shape, *rows[0].routing.shape[1:]), UNKNOWN, dtype=torch.uint8)


def build(segments: list[Segment], pad_id: int, multiple: int, per_response_norm: bool,
          packed: bool = False) -> RLBatch:
    return from_rows(rows_of(segments, per_response_norm), pad_id, multiple, packed)


def from_rows(rows: list[Row], pad_id: int, multiple: int, packed: bool = False) -> RLBatch:
    """Right-padded to a multiple of `multiple` (TP's sequence split). No rows gives a one-row
    dummy with no loss, so a rank without work still runs the collective forward."""
    if packed:
        return _packed(rows, pad_id, multiple)
    ids_rows = [r.ids for r in rows] or [[pad_id]]
    width = -(-max(len(r) + 1 for r in ids_rows) // multiple) * multiple  # +1: room for the last label
    shape = (len(ids_rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    weights, adv, rollout = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    for i, row in enumerate(ids_rows):
        ids[i, :len(row)] = torch.tensor(row)
    routing = _routing_tensor(rows, shape)
    for i, r in enumerate(rows):
        weights[i, r.lo:r.hi] = r.weight
        adv[i, r.lo:r.hi] = r.advantage
        rollout[i, r.lo:r.hi] = torch.tensor(r.logp)
        if routing is not None:
            routing[i, :len(r.ids)] = torch.from_numpy(r.routing)
    labels = torch.full(shape, pad_id, dtype=torch.long)
    labels[:, :-1] = ids[:, 1:]
    return RLBatch(ids, labels, weights, adv, rollout, routing=routing)



def _packed(rows: list[Row], pad_id: int, multiple: int) -> RLBatch:
    """All rows in one: each segment's tokens at its own offset, its last position predicting
    padding (no weight there: hi <= len(ids) - 1)."""
    width = -(-max(1, sum(len(r.ids) for r in rows)) // multiple) * multiple
    ids = torch.full((1, width), pad_id, dtype=torch.long)
    labels = torch.full((1, width), pad_id, dtype=torch.long)
    positions = torch.zeros((1, width), dtype=torch.long)
    doc_ids = torch.full((1, width), -1, dtype=torch.long)
    weights, adv, rollout = torch.zeros(1, width), torch.zeros(1, width), torch.zeros(1, width)
    routing = _routing_tensor(rows, (1, width))
    at = 0
    for d, r in enumerate(rows):
        n = len(r.ids)
        ids[0, at:at + n] = torch.tensor(r.ids)
        labels[0, at:at + n - 1] = ids[0, at + 1:at + n]
        positions[0, at:at + n] = torch.arange(n)
        doc_ids[0, at:at + n] = d
        lo, hi = at + r.lo, at + r.hi
        weights[0, lo:hi], adv[0, lo:hi] = r.weight, r.advantage
        rollout[0, lo:hi] = torch.tensor(r.logp)
        if routing is not None:
            routing[0, at:at + n] = torch.from_numpy(r.routing)
        at += n
    if at < width:  # the padding is a document of its own, positions from 0
        positions[0, at:] = torch.arange(width - at)
    return RLBatch(ids, labels, weights, adv, rollout, position_ids=positions, doc_ids=doc_ids, routing=routing)
