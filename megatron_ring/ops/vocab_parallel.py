"""Tensor parallelism for the fused loss: the vocabulary shard of this rank, the all-reduce that
merges per-rank softmax statistics, and the two autograd mappings that make the hidden-state
gradient the full one (all-reduce; or, with sequence parallelism, all-gather/reduce-scatter),
and full_logits, the gather of logits shards for sampling.

These take an explicit process group and use torch.distributed directly, so they work with any
group (also one made without Megatron's parallel state) on gloo and NCCL alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ring.ops import softmax_stats

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


@dataclass(frozen=True)
class VocabShard:
    """Rows [start, start + local) of the (padded) output weight live on this rank; global ids
    >= true_vocab are padding and never enter the softmax. Padding is always at the end of the
    vocabulary, so a shard's real rows are its first `n_valid`."""

    group: object
    tp_size: int
    start: int
    local: int
    true_vocab: int

    @property
    def n_valid(self) -> int:
        return max(0, min(self.local, self.true_vocab - self.start))

    def local_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Global target ids -> row in this shard's real rows, or -1 if not held here."""
        rel = targets.long() - self.start
        return torch.where((rel >= 0) & (rel < self.n_valid), rel, torch.full_like(rel, -1))


def resolve_shard(weight: torch.Tensor, tp_group, vocab_start, true_vocab_size) -> VocabShard:
    """Defaults follow Megatron's even split: rank r holds rows [r*V_local, (r+1)*V_local)."""
    tp = group_size(tp_group)
    local = weight.shape[0]
    if vocab_start is None:
        vocab_start = (dist.get_rank(tp_group) if tp > 1 else 0) * local
    if true_vocab_size is None:
        true_vocab_size = tp * local
    if vocab_start < 0:
        raise ValueError(f"vocab_start={vocab_start} must be >= 0")
    if true_vocab_size < 1:
        raise ValueError(f"true_vocab_size={true_vocab_size} must be >= 1")
    if tp == 1 and (vocab_start != 0 or true_vocab_size > local):
        raise ValueError(f"without a TP group weight ({local} rows) must hold the whole vocabulary: "
                         f"got vocab_start={vocab_start}, true_vocab_size={true_vocab_size}")
    return VocabShard(tp_group, tp, int(vocab_start), local, int(true_vocab_size))


def allreduce_stats(stats: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Merge each rank's partial statistics [4, T] into whole-vocabulary ones, on every rank:
    an all-reduce(max) of the shifts, then an all-reduce(sum) of the rebased (s, q, zy)."""
    if shard.tp_size == 1:
        return stats
    new_max = stats[0].clone()
    dist.all_reduce(new_max, op=dist.ReduceOp.MAX, group=shard.group)
    rest = softmax_stats.rebase(stats, new_max).contiguous()
    dist.all_reduce(rest, group=shard.group)
    return torch.cat([new_max[None], rest])


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward sums the partial hidden gradients of the TP ranks (each rank
    only saw its vocabulary shard), like Megatron's copy_to_tensor_model_parallel_region."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherSequence(torch.autograd.Function):
    """Sequence parallel: all-gather the token dimension forward; backward reduce-scatters, which
    sums the ranks' partial gradients and hands each rank its own tokens' rows."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        tp = dist.get_world_size(group)
        out = torch.empty((x.shape[0] * tp, *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        tp = dist.get_world_size(ctx.group)
        out = torch.empty((grad.shape[0] // tp, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        _reduce_scatter(out, grad.contiguous(), group=ctx.group)
        return out, None


def full_hidden(hidden: torch.Tensor, shard: VocabShard, sequence_parallel: bool) -> torch.Tensor:
    """Every token's hidden state on this rank, with the backward that makes its gradient the
    full one. Without TP: the input itself."""
    if shard.tp_size == 1:
        return hidden
    if sequence_parallel:
        return _GatherSequence.apply(hidden, shard.group)
    return _CopyToTensorParallel.apply(hidden, shard.group) if hidden.requires_grad else hidden


def full_logits(logits: torch.Tensor, true_vocab: int, group=None) -> torch.Tensor:
    """Every TP rank's vocabulary shard of logits [..., V_local] side by side (group rank order,
    Megatron's split), padding dropped: [..., true_vocab]. Forward only (sampling, tests): the
    loss paths never need the whole logits."""
    tp = group_size(group)
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    return logits[..., :true_vocab]
