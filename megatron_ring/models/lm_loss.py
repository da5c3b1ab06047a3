"""Token cross-entropy on vocab-parallel logits, with Megatron's vocabulary padding masked out."""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel


def mask_padded_vocab(logits: torch.Tensor, true_vocab: int) -> torch.Tensor:
    """Padding rows exist only so the vocabulary splits evenly over TP; they must get no
    probability, or the loss would depend on the TP size."""
    local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local
    n_valid = max(0, min(local, true_vocab - start))
    if n_valid == local:
        return logits
    col = torch.arange(local, device=logits.device)
    return logits.masked_fill(col >= n_valid, float("-inf"))


def token_nll(logits: torch.Tensor, labels: torch.Tensor, true_vocab: int) -> torch.Tensor:
    """Per-token negative log-likelihood from local vocab shards [b, s, V/tp] -> [b, s].
    Megatron's vocab_parallel_cross_entropy overwrites fp32 logits in place (shifted, then
    exponentiated): read anything else from them before calling this."""
    return tensor_parallel.vocab_parallel_cross_entropy(mask_padded_vocab(logits, true_vocab).float(), labels)


def full_logits(logits: torch.Tensor, true_vocab: int) -> torch.Tensor:
    """Gather the vocab shards of every TP rank and drop the padding: [b, s, true_vocab]."""
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)[..., :true_vocab]


@torch.no_grad()
def token_entropy(logits: torch.Tensor, true_vocab: int) -> torch.Tensor:
    """Entropy of the predictive distribution per token from local vocab shards [b, s, V/tp]
    -> [b, s], merging each rank's max, sum of exp and sum of p*z over the TP group."""
    z = mask_padded_vocab(logits, true_vocab).float()
    group = ps.get_tensor_model_parallel_group()
    m = z.max(dim=-1, keepdim=True).values
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    e = torch.exp(z - m)
    zs = torch.where(torch.isfinite(z), z - m, torch.zeros_like(z))  # -inf * 0 would be nan
    parts = torch.stack([e.sum(-1), (e * zs).sum(-1)])
    torch.distributed.all_reduce(parts, group=group)
    sum_exp, sum_ez = parts
    return torch.log(sum_exp) - sum_ez / sum_exp
