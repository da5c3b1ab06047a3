"""The trainer's weights as SGLang receives them in a push: HF-named tensors in one dtype, packed
back to back into flat uint8 buckets of about rollout.weight_bucket_mb (the layout of SGLang's
FlattenedTensorBucket: byte offsets in order, each a multiple of its dtype's size). Few large
tensors per push matter on both ends: a broadcast per tensor pays a collective's latency
thousands of times, and SGLang's MoE load_weights goes quadratic when expert tensors arrive one
by one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterator

import torch
import torch.distributed as dist

KEEP_ROWS = 4  # rows of a tensor read back to verify a push (SGLang's get_weights_by_name truncate_size)


@dataclass
class Bucket:
    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[list[int]]
    flat: torch.Tensor  # uint8: every tensor's bytes, back to back

    @classmethod
    def of(cls, named: list[tuple[str, torch.Tensor]], staging: "Staging | None" = None) -> "Bucket":
        parts = [t.contiguous().view(-1).view(torch.uint8) for _, t in named]
        size = sum(p.numel() for p in parts)
        flat = torch.cat(parts, out=staging.take(size, parts[0].device)) if staging else torch.cat(parts)
        return cls([n for n, _ in named], [t.dtype for _, t in named], [list(t.shape) for _, t in named], flat)

    @property
    def nbytes(self) -> int:
        return self.flat.numel()

    def spans(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for dtype, shape in zip(self.dtypes, self.shapes):
            end = start + torch.Size(shape).numel() * dtype.itemsize
            out.append((start, end))
            start = end
        return out

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Views into flat, as FlattenedTensorBucket.reconstruct_tensors gives them."""
        return [(n, self.flat[a:b].view(d).view(s))
                for n, d, s, (a, b) in zip(self.names, self.dtypes, self.shapes, self.spans())]

    def metadata(self) -> list[SimpleNamespace]:
        """FlattenedTensorMetadata's fields, as a type SGLang's restricted unpickler admits
        (SimpleNamespace): the trainer does not import SGLang."""
        return [SimpleNamespace(name=n, shape=torch.Size(s), dtype=d, start_idx=a, end_idx=b, numel=b - a)
                for n, d, s, (a, b) in zip(self.names, self.dtypes, self.shapes, self.spans())]

    def dtype_names(self) -> list[str]:
        return [str(d).removeprefix("torch.") for d in self.dtypes]


class Staging:
    """Two flat buffers, used in turn bucket after bucket and push after push: one is filled while
    the other is in flight, and filling fresh memory costs its page faults every time (measured:
    they were most of the trainer's side of a push on the CPU). A bucket's tensor is valid until
    the bucket after next is made."""

    def __init__(self):
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.turn = 0

    def take(self, nbytes: int, device) -> torch.Tensor:
        self.turn ^= 1
        buf = self.buffers[self.turn]
        if buf is None or buf.numel() < nbytes or buf.device != torch.device(device):
            buf = self.buffers[self.turn] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buf[:nbytes]


def hf_buckets(model, bucket_bytes: int, dtype: torch.dtype = torch.bfloat16, every_rank: bool = False,
               keep: dict[str, torch.Tensor] | None = None, staging: Staging | None = None) -> Iterator[Bucket]:
    """Buckets of the whole model in HF names (collective: every rank must walk it to the end).

    every_rank=False: only data-parallel replica 0 gathers (weights.gather_full(first_replica))
    and only global rank 0 gets buckets (the sender of a distributed push); the other ranks
    yield nothing. every_rank=True: every rank gets every bucket (each hands its own GPU's copy
    to its colocated engine). keep: names -> filled with a float32 copy of the first KEEP_ROWS
    rows of each such tensor as sent (what a push is verified against). staging: the buffers the
    buckets are packed into (a consumer holds at most two buckets at once)."""
    from megatron_ring.models import hf_convert as conv
    from megatron_ring.models.weights import gather_full  # imports Megatron: the rest needs only torch

    sender = every_rank or not dist.is_initialized() or dist.get_rank() == 0
    current, size = [], 0
    for name, full in gather_full(model, first_replica=not every_rank):
        if not sender:
            continue
        for hf_name, t in conv.to_hf(name, full, model.arch).items():
            t = t.detach().to(dtype)
            if keep is not None and hf_name in keep:
                keep[hf_name] = t[:KEEP_ROWS].float().cpu()
            if current and size + t.numel() * t.element_size() > bucket_bytes:
                yield Bucket.of(current, staging)
                current, size = [], 0
            current.append((hf_name, t))
            size += t.numel() * t.element_size()
    if current:
        yield Bucket.of(current, staging)


def sample_names(names: list[str], k: int, version: int) -> list[str]:
    """k tensor names to read back after push `version`: a different draw each push, so every
    tensor is checked over a run, the first and last (embedding, head) always among them."""
    if k <= 0 or not names:
        return []
    ends = [names[0], names[-1]][:k]
    rest = [n for n in names if n not in ends]
    return ends + random.Random(version).sample(rest, min(len(rest), k - len(ends)))
