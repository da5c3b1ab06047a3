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
    """Per-token negative log-likelihood from local vocab shards [b, s, V/tp] -> [b, s]."""
    return tensor_parallel.vocab_parallel_cross_entropy(mask_padded_vocab(logits, true_vocab).float(), labels)


def full_logits(logits: torch.Tensor, true_vocab: int) -> torch.Tensor:
    """Gather the vocab shards of every TP rank and drop the padding: [b, s, true_vocab]."""
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)[..., :true_vocab]
