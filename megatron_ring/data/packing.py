"""Documents -> fixed-length rows. Packing puts several documents in one row with positions
restarting at each document and document ids, from which attention gets a block-diagonal mask
or THD boundaries (models/packed_docs.py), so no token attends across documents; without
packing each document is padded alone. Either way the share of non-pad
tokens (packing efficiency) is reported.

Rows are kept as numpy arrays of document indices (O(documents), a few bytes each), never as
token tensors: a micro-batch's [b, S] tensors are filled from the memory-mapped documents when
it is needed (`PackedRows.batch`), so a rank's memory does not grow with the data set."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class Documents(Protocol):
    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, 0/1 loss mask) of document i."""


def assign_rows(lengths: np.ndarray, capacity: int, pack: bool) -> tuple[np.ndarray, np.ndarray]:
    """(row_ptr, members): row r holds documents members[row_ptr[r]:row_ptr[r+1]], in order.
    Best-fit decreasing: each document (longest first) goes to the row it fills most tightly.
    Deterministic; O(n log n) over a sorted list of remaining capacities, from which rows that
    no remaining document fits are dropped."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if not pack:
        return np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64)
    order = np.lexsort((np.arange(n), -lengths))  # longest first, then by index
    row_of = np.empty(n, dtype=np.int64)
    free: list[tuple[int, int]] = []  # (remaining capacity, row index), sorted
    smallest = int(lengths.min()) if n else 0
    n_rows = 0
    for i in order.tolist():
        k = bisect.bisect_left(free, (int(lengths[i]), -1))
        if k == len(free):
            r, remaining = n_rows, capacity
            n_rows += 1
        else:
            remaining, r = free.pop(k)
        row_of[i] = r
        remaining -= int(lengths[i])
        if remaining >= smallest:
            bisect.insort(free, (remaining, r))
    members = order[np.argsort(row_of[order], kind="stable")]  # within a row: placement order
    row_ptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=n_rows), out=row_ptr[1:])
    return row_ptr, members


@dataclass
class PackedRows:
    """Rows of `seq_length` positions over documents of `lengths` positions each (a document
    of n tokens occupies n-1: inputs ids[:-1], labels ids[1:])."""

    row_ptr: np.ndarray  # int64 [R + 1]
    members: np.ndarray  # int64 [D] document indices, row by row
    lengths: np.ndarray  # int64 [D] positions of each document
    seq_length: int

    @classmethod
    def build(cls, lengths: np.ndarray, seq_length: int, pack: bool) -> "PackedRows":
        lengths = np.asarray(lengths, dtype=np.int64)
        too_long = np.flatnonzero(lengths > seq_length)
        assert not len(too_long), f"documents {too_long[:3].tolist()} longer than seq_length {seq_length}"
        row_ptr, members = assign_rows(lengths, seq_length, pack)
        assert np.array_equal(np.sort(members), np.arange(len(lengths))), "packing lost or duplicated a document"
        return cls(row_ptr, members, lengths, seq_length)

    def __len__(self) -> int:
        return len(self.row_ptr) - 1

    def docs_of(self, r: int) -> np.ndarray:
        return self.members[self.row_ptr[r]:self.row_ptr[r + 1]]

    def used(self, rows) -> int:
        """Real (non-pad) positions of these rows."""
        return int(sum(int(self.lengths[self.docs_of(int(r))].sum()) for r in rows))

    @property
    def efficiency(self) -> float:
        """Share of positions holding real tokens."""
        return float(self.lengths.sum() / max(1, len(self) * self.seq_length))

    def batch(self, rows, docs: Documents, pad_id: int) -> dict[str, torch.Tensor]:
        """The [b, seq_length] tensors of rows (input_ids, labels, loss_mask, position_ids,
        doc_ids: index within the row, -1 for padding), read from docs."""
        b, s = len(rows), self.seq_length
        input_ids = np.full((b, s), pad_id, dtype=np.int64)
        labels = np.full((b, s), pad_id, dtype=np.int64)
        loss_mask = np.zeros((b, s), dtype=np.float32)
        position_ids = np.zeros((b, s), dtype=np.int64)
        doc_ids = np.full((b, s), -1, dtype=np.int64)
        for j, r in enumerate(rows):
            at = 0
            for d, i in enumerate(self.docs_of(int(r)).tolist()):
                ids, mask = docs.document(i)
                k = len(ids) - 1
                assert k == self.lengths[i], f"document {i}: {k} positions, the packing planned {self.lengths[i]}"
                input_ids[j, at:at + k] = ids[:-1]
                labels[j, at:at + k] = ids[1:]
                loss_mask[j, at:at + k] = mask[1:]
                position_ids[j, at:at + k] = np.arange(k)
                doc_ids[j, at:at + k] = d
                at += k
        return {name: torch.from_numpy(a) for name, a in (
            ("input_ids", input_ids), ("labels", labels), ("loss_mask", loss_mask),
            ("position_ids", position_ids), ("doc_ids", doc_ids))}
