"""Tokenised SFT documents on disk, in Megatron-Core's indexed dataset format (.bin/.idx,
memory-mapped), as `megatron-ring data prepare` writes them and training reads them.

A directory holds two aligned indexed datasets, one sequence per document:
- `tokens`: the token ids (int32);
- `loss_spans`: the loss mask as [start, end) pairs of token positions (int32), one pair per
  run of loss tokens (in practice one per assistant turn). Spans rather than an aligned uint8
  mask: a few bytes per turn instead of one per token (a 10K-token trace costs 16 bytes, not
  10 KB), and they rebuild any 0/1 mask exactly;
and `meta.json` (tokenizer fingerprint, input files with sizes and mtimes, the row report,
documents, tokens). Nothing is read until asked: a document is a slice of the mapped file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from megatron_ring.data.jsonl_rows import DataError

FORMAT = "megatron-ring-sft-indexed/1"
TOKENS, SPANS, META = "tokens", "loss_spans", "meta.json"


def mask_to_spans(mask) -> np.ndarray:
    m = np.asarray(mask, dtype=np.int8)
    edges = np.diff(np.concatenate(([0], m, [0])))
    return np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], 1).ravel().astype(np.int32)


def spans_to_mask(spans: np.ndarray, n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=np.uint8)
    for start, end in spans.reshape(-1, 2).tolist():
        mask[start:end] = 1
    return mask


_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u 1+1?"},
          {"role": "assistant", "content": "a 2"}]


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer files and how a probe conversation tokenises (so a different chat template
    choice counts as a different tokenizer)."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        h.update((tokenizer.path / name).read_bytes())
    ids, mask = tokenizer.encode_chat(_PROBE)
    h.update(json.dumps([ids, mask]).encode())
    return h.hexdigest()[:16]


class Writer:
    """Appends documents to the two datasets of a directory; `finish` writes the indexes."""

    def __init__(self, out: Path):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.out = out
        self.builders = {name: IndexedDatasetBuilder(str(out / f"{name}.bin"), dtype=np.int32)
                         for name in (TOKENS, SPANS)}
        self.documents = 0
        self.tokens = 0
        self.loss_tokens = 0

    def add(self, ids: np.ndarray, spans: np.ndarray) -> None:
        for name, a in ((TOKENS, ids), (SPANS, spans)):
            self.builders[name].add_item(torch.from_numpy(a))
            self.builders[name].end_document()
        self.documents += 1
        self.tokens += len(ids)
        self.loss_tokens += int((spans[1::2] - spans[0::2]).sum())

    def finish(self, meta: dict) -> dict:
        for name, b in self.builders.items():
            b.finalize(str(self.out / f"{name}.idx"))
        meta = {"format": FORMAT, **meta, "documents": self.documents, "tokens": self.tokens,
                "loss_tokens": self.loss_tokens}
        (self.out / META).write_text(json.dumps(meta, indent=2))
        return meta


class SFTDocuments:
    """A prepared directory, memory-mapped: `lengths` (tokens per document) and `document(i)`
    -> (ids, loss mask), read from the mapped files when asked."""

    def __init__(self, path: str | Path):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.path = Path(path)
        meta = self.path / META
        if not meta.is_file():
            raise DataError(f"{self.path}: not a prepared SFT directory (no {META}; "
                            "write one with `megatron-ring data prepare`)")
        self.meta = json.loads(meta.read_text())
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{meta}: format {self.meta.get('format')!r}, expected {FORMAT!r}; prepare it again")
        self.tokens = IndexedDataset(str(self.path / TOKENS), mmap=True)
        self.spans = IndexedDataset(str(self.path / SPANS), mmap=True)
        if len(self.tokens) != len(self.spans) or len(self.tokens) != self.meta["documents"]:
            raise DataError(f"{self.path}: {len(self.tokens)} token and {len(self.spans)} span sequences, "
                            f"{META} says {self.meta['documents']} documents; prepare it again")
        # A copy (8 bytes a document): a view of the index would dangle once the dataset closes its map.
        self.lengths = np.array(self.tokens.sequence_lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokens[i]
        return ids, spans_to_mask(self.spans[i], len(ids))
