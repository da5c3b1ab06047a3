"""Partial softmax statistics over a slice of the vocabulary, and how slices combine.

A slice (a vocabulary chunk, one Triton program's tiles, one TP rank's shard) is summarised per
token by four fp32 numbers, stacked as rows of a [4, T] tensor. From them the log-sum-exp, the
entropy and the target's log-probability over the whole vocabulary follow, without any slice
seeing another slice's logits:

    m  = max_v z_v                          the slice's own shift
    s  = sum_v exp(z_v - m)
    q  = sum_v exp(z_v - m) * (z_v - m)     entropy term, relative to m (no cancellation)
    zy = z_target if the target lies in the slice, else 0
"""

from __future__ import annotations

import torch

# The max of an empty slice. Finite on purpose: rescaling an empty slice then multiplies
# s = q = 0 by exp(-1e30 - M) = 0 and by (-1e30 - M), which gives 0, where -inf would give NaN.
EMPTY_MAX = -1e30


def empty(n: int, device) -> torch.Tensor:
    """Statistics of an empty slice for n tokens."""
    stats = torch.zeros(4, n, dtype=torch.float32, device=device)
    stats[0] = EMPTY_MAX
    return stats


def rebase(stats: torch.Tensor, new_max: torch.Tensor) -> torch.Tensor:
    """(s, q, zy) of slices [..., 4, T] re-expressed relative to a common max (>= their own)."""
    m, s, q, zy = stats.unbind(-2)
    shift = m - new_max
    scale = shift.exp()
    return torch.stack([scale * s, scale * (q + shift * s), zy], dim=-2)


def combine(parts: torch.Tensor) -> torch.Tensor:
    """Merge the statistics of P disjoint slices [P, 4, T] into those of their union [4, T]."""
    new_max = parts[:, 0].amax(0)
    return torch.cat([new_max[None], rebase(parts, new_max).sum(0)])


def finalize(stats: torch.Tensor):
    """Whole-vocabulary statistics -> (logp of the target, entropy, logsumexp), each [T] fp32.

    entropy = lse - E_p[z] = log s - q / s."""
    m, s, q, zy = stats.unbind(0)
    log_s = s.log()
    lse = m + log_s
    return zy - lse, log_s - q / s, lse
