"""Chunked pure-torch backend (CPU, and the fallback on GPU): fp32 logits exist one
[chunk_tokens, chunk_vocab] block at a time, so memory does not grow with T x V."""

from __future__ import annotations

import torch

from megatron_ring.ops import softmax_stats

CHUNK_TOKENS = 1024
CHUNK_VOCAB = 8192


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits are computed from fp32 copies of each block: fp32 accumulation on every device."""
    return torch.float32


def spans(n: int, chunk: int):
    return [(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def _logits(h, w, inv_temp: float) -> torch.Tensor:
    return (h @ w.T).mul_(inv_temp)


def _block_stats(z: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Statistics of one logits block [n, v]; tgt is the column of the target or outside [0, v)."""
    inside = (tgt >= 0) & (tgt < z.shape[1])
    zy = torch.where(inside, z.gather(1, tgt.clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0.0)
    m = z.amax(1)
    d = z.sub_(m[:, None])  # z is not needed any more: reuse its memory
    e = d.exp()
    return torch.stack([m, e.sum(1), torch.linalg.vecdot(e, d), zy])


def forward_stats(hidden, weight, tgt_local, inv_temp: float, chunk_tokens: int, chunk_vocab: int):
    """Per-token statistics [4, T] over the rows of `weight` (this shard's real rows)."""
    n_tok = hidden.shape[0]
    stats = softmax_stats.empty(n_tok, hidden.device)
    for v0, v1 in spans(weight.shape[0], chunk_vocab):
        w = weight[v0:v1].to(hidden.dtype)
        for t0, t1 in spans(n_tok, chunk_tokens):
            block = _block_stats(_logits(hidden[t0:t1], w, inv_temp), tgt_local[t0:t1] - v0)
            stats[:, t0:t1] = softmax_stats.combine(torch.stack([stats[:, t0:t1], block]))
    return stats


def dz_block(h, w, tgt, lse, ez, g_logp, g_ent, inv_temp: float) -> torch.Tensor:
    """d loss / d (h @ w.T) for one block, logits recomputed:
    dz_v = g_logp * (1[v=y] - p_v) - g_ent * p_v * (z_v - E_p[z]), times 1/temperature."""
    z = _logits(h, w, inv_temp)
    p = (z - lse[:, None]).exp_()
    coeff = z.sub_(ez[:, None]).mul_(g_ent[:, None]).add_(g_logp[:, None])
    dz = p.mul_(coeff).neg_()
    rows = torch.nonzero((tgt >= 0) & (tgt < w.shape[0]))[:, 0]
    dz.index_put_((rows, tgt[rows]), g_logp[rows], accumulate=True)
    return dz.mul_(inv_temp)
