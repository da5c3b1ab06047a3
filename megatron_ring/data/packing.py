"""Documents -> fixed-length rows. Packing puts several documents in one row with positions
restarting at each document and a block-diagonal causal mask, so no token attends across
documents; without packing each document is padded alone. Either way the share of non-pad
tokens (packing efficiency) is reported."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from megatron_ring.data.sft_rows import Example


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # [N, S]
    labels: torch.Tensor  # [N, S] next token within the same document
    loss_mask: torch.Tensor  # [N, S] 1 where the label is a response token
    position_ids: torch.Tensor  # [N, S] restart at 0 for each document
    doc_ids: torch.Tensor  # [N, S] document index within its row, -1 for padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def efficiency(self) -> float:
        """Share of positions holding real tokens."""
        return float((self.doc_ids >= 0).float().mean())


def assign_rows(lengths: list[int], capacity: int, pack: bool) -> list[list[int]]:
    """Best-fit decreasing: each document (longest first) goes to the row it fills most
    tightly. Deterministic; O(n log n) over a sorted list of remaining capacities."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - lengths[i], len(rows) - 1))
        else:
            remaining, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (remaining - lengths[i], r))
    return rows


def pack(examples: list[Example], seq_length: int, pad_id: int, pack: bool = True) -> PackedRows:
    """A document of n tokens occupies n-1 positions (inputs ids[:-1], labels ids[1:])."""
    lengths = [len(e.ids) - 1 for e in examples]
    too_long = [e.source for e, n in zip(examples, lengths) if n > seq_length]
    assert not too_long, f"documents longer than seq_length {seq_length}: {too_long[:3]}"
    rows = assign_rows(lengths, seq_length, pack)
    n = len(rows)
    out = PackedRows(
        input_ids=torch.full((n, seq_length), pad_id, dtype=torch.long),
        labels=torch.full((n, seq_length), pad_id, dtype=torch.long),
        loss_mask=torch.zeros(n, seq_length),
        position_ids=torch.zeros(n, seq_length, dtype=torch.long),
        doc_ids=torch.full((n, seq_length), -1, dtype=torch.long),
    )
    for r, members in enumerate(rows):
        at = 0
        for d, i in enumerate(members):
            ids, mask, k = examples[i].ids, examples[i].loss_mask, lengths[i]
            span = slice(at, at + k)
            out.input_ids[r, span] = torch.tensor(ids[:-1])
            out.labels[r, span] = torch.tensor(ids[1:])
            out.loss_mask[r, span] = torch.tensor(mask[1:], dtype=torch.float)
            out.position_ids[r, span] = torch.arange(k)
            out.doc_ids[r, span] = d
            at += k
    placed = sorted(i for members in rows for i in members)
    assert placed == list(range(len(examples))), "packing lost or duplicated a document"
    return out


def document_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] document ids -> [b, 1, s, s] bool, True where attention is blocked (Megatron's
    convention): a token sees earlier tokens of its own document only. Padding (-1) sees
    padding, so no query row is fully blocked."""
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    return ~(same & causal).unsqueeze(1)
