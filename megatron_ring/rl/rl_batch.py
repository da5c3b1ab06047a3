"""A micro-batch of segments as tensors: prompt + response tokens right-padded, and per position
t (which predicts token t+1) the loss weight, advantage and the rollout/old/reference logprobs
of that next token. Only a segment's own response tokens [start, end) get a weight."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

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

    def positions(self) -> torch.Tensor:
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


def rows_of(segments: list[Segment], per_response_norm: bool) -> list[Row]:
    """per_response_norm: weight 1/|y| (GRPO's per-sample mean), else 1."""
    rows = []
    for seg in segments:
        r = seg.response
        p = len(r.prompt_ids)
        rows.append(Row(r.prompt_ids + r.tokens[:seg.end], p + seg.start - 1, p + seg.end - 1,
                        1.0 / len(r.tokens) if per_response_norm else 1.0, r.advantage,
                        r.rollout_logp[seg.start:seg.end]))
    return rows


def build(segments: list[Segment], pad_id: int, multiple: int, per_response_norm: bool) -> RLBatch:
    return from_rows(rows_of(segments, per_response_norm), pad_id, multiple)


def from_rows(rows: list[Row], pad_id: int, multiple: int) -> RLBatch:
    """Right-padded to a multiple of `multiple` (TP's sequence split). No rows gives a one-row
    dummy with no loss, so a rank without work still runs the collective forward."""
    ids_rows = [r.ids for r in rows] or [[pad_id]]
    width = -(-max(len(r) + 1 for r in ids_rows) // multiple) * multiple  # +1: room for the last label
    shape = (len(ids_rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    weights, adv, rollout = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    for i, row in enumerate(ids_rows):
        ids[i, :len(row)] = torch.tensor(row)
    for i, r in enumerate(rows):
        weights[i, r.lo:r.hi] = r.weight
        adv[i, r.lo:r.hi] = r.advantage
        rollout[i, r.lo:r.hi] = torch.tensor(r.logp)
    labels = torch.full(shape, pad_id, dtype=torch.long)
    labels[:, :-1] = ids[:, 1:]
    return RLBatch(ids, labels, weights, adv, rollout)


def truncate_importance(batch: RLBatch, cap: float) -> RLBatch:
    """Truncated importance sampling: the rollout engine sampled from a slightly different policy
    (other kernels, stale weights for carried segments), so each token's weight is multiplied by
    min(pi_old / pi_rollout, cap), a correction whose variance the cap bounds. Returns a new batch."""
    ratio = torch.exp(batch.old_logp - batch.rollout_logp).clamp(max=cap)
    return replace(batch, weights=torch.where(batch.weights != 0, batch.weights * ratio, batch.weights))
