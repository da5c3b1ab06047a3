"""Per-token log-probability of the target and entropy of the predictive distribution, straight
from the final hidden states and the vocabulary-parallel output weight, without materialising
the [T, V] logits. Differentiable: the SFT loss (-sum logp), the fused C3PO loss (logp and
entropy into its objective) and, under torch.no_grad(), the old-policy and reference passes all
use this one op.

Forward computes per-token softmax statistics over vocabulary tiles (online log-sum-exp) and
merges them over the TP group; backward recomputes the logits block by block. Two backends do
the per-block work with the same results: Triton kernels (GPU) and chunked torch (CPU, fallback).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ring.ops import c3po_loss_torch, c3po_loss_triton, softmax_stats, vocab_parallel

IMPLS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class _Plan:
    """What the autograd function needs besides tensors."""

    backend: object
    shard: vocab_parallel.VocabShard
    inv_temp: float
    chunk_tokens: int
    chunk_vocab: int


def _backend(impl: str, hidden: torch.Tensor):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and c3po_loss_triton.importable() else "torch"
    if impl == "triton":
        c3po_loss_triton.check_device(hidden)
        return c3po_loss_triton
    return c3po_loss_torch


def token_rows(hidden: torch.Tensor, tp_group=None, sequence_parallel: bool = False) -> int:
    """How many tokens the per-token inputs ([T] vectors) must have: hidden's rows, times the
    TP size when hidden is this rank's sequence-parallel block."""
    return hidden.shape[0] * (vocab_parallel.group_size(tp_group) if sequence_parallel else 1)


def _plan(hidden, weight, targets, *, temperature, tp_group, vocab_start, true_vocab_size,
          sequence_parallel, chunk_tokens, chunk_vocab, impl) -> _Plan:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [T, H] and weight [V_local, H]; got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)} (flatten [s, b, h] first)")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size differs: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have one dtype")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shard = vocab_parallel.resolve_shard(weight, tp_group, vocab_start, true_vocab_size)
    rows = token_rows(hidden, tp_group, sequence_parallel)
    if targets.shape != (rows,):
        sp = f" (sequence_parallel: {hidden.shape[0]} local rows x TP {shard.tp_size})" if sequence_parallel else ""
        raise ValueError(f"targets must be [{rows}] to match hidden{sp}; got {tuple(targets.shape)}")
    backend = _backend(impl, hidden)
    chunk_tokens = chunk_tokens or backend.CHUNK_TOKENS
    chunk_vocab = chunk_vocab or backend.CHUNK_VOCAB
    if chunk_tokens < 1 or chunk_vocab < 1:
        raise ValueError(f"chunk sizes must be >= 1, got chunk_tokens={chunk_tokens}, chunk_vocab={chunk_vocab}")
    return _Plan(backend, shard, 1.0 / temperature, int(chunk_tokens), int(chunk_vocab))


def check_token_vector(name: str, t, n: int):
    """A per-token input must be [n] (None: absent, accepted)."""
    if t is not None and t.shape != (n,):
        raise ValueError(f"{name} must be [{n}] (one value per token), got {tuple(t.shape)}")


def _check_targets(targets, mask, true_vocab: int):
    """Every target that carries loss must be a real vocabulary id (one host sync)."""
    bad = (targets < 0) | (targets >= true_vocab)
    if mask is not None:
        bad &= mask != 0
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] = {int(targets[i])} is outside [0, true_vocab_size={true_vocab})"
                         " on a token with loss_mask != 0")


def _operands(hidden, weight, plan: _Plan):
    """Contiguous hidden in the backend's matmul dtype, and the weight cut to the shard's real
    rows (cast chunk by chunk by whoever reads it, so no second copy of it exists)."""
    dtype = plan.backend.matmul_dtype(hidden.dtype)
    return hidden.to(dtype).contiguous(), weight[:plan.shard.n_valid].contiguous()


def _forward_stats(hidden, weight, targets, plan: _Plan):
    h, w = _operands(hidden, weight, plan)
    stats = plan.backend.forward_stats(h, w, plan.shard.local_targets(targets), plan.inv_temp,
                                       plan.chunk_tokens, plan.chunk_vocab)
    return softmax_stats.finalize(vocab_parallel.allreduce_stats(stats, plan.shard))


def _accumulate_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """out (fp32) += a @ b, in place when the operands are fp32 too."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_(a @ b)


def _chunked_grads(hidden, weight, targets, lse, ez, g_logp, g_ent, plan: _Plan, need_dh, need_dw):
    """Gradients for hidden (this rank's partial sum over its shard, fp32) and for the weight
    shard, one [chunk_tokens, chunk_vocab] logits block at a time (vocabulary chunks outer, so
    each weight chunk's gradient is finished before the next starts)."""
    if not (need_dh or need_dw):
        return None, None
    h, w = _operands(hidden, weight, plan)
    tgt = plan.shard.local_targets(targets)
    dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None  # padding rows keep a zero gradient
    token_spans = c3po_loss_torch.spans(h.shape[0], plan.chunk_tokens)
    in_place = need_dw and dw.dtype == torch.float32  # else accumulate a chunk in fp32, then cast
    for v0, v1 in c3po_loss_torch.spans(w.shape[0], plan.chunk_vocab):
        w_v = w[v0:v1].to(h.dtype)
        if need_dw:
            acc = dw[v0:v1] if in_place else torch.zeros(w_v.shape, dtype=torch.float32, device=w.device)
        for t0, t1 in token_spans:
            dz = plan.backend.dz_block(h[t0:t1], w_v, tgt[t0:t1] - v0, lse[t0:t1], ez[t0:t1],
                                       g_logp[t0:t1], g_ent[t0:t1], plan.inv_temp)
            if need_dh:
                _accumulate_mm(dh[t0:t1], dz, w_v)
            if need_dw:
                _accumulate_mm(acc, dz.T, h[t0:t1])
        if need_dw and not in_place:
            dw[v0:v1].copy_(acc)
    return dh, dw


class _FusedLogpEntropy(torch.autograd.Function):
    """(hidden [T, H] with every token, weight shard) -> (logp [T], entropy [T]) in fp32.

    Saves only the inputs and two floats per token; backward recomputes the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, plan: _Plan):
        logp, entropy, lse = _forward_stats(hidden, weight, targets, plan)
        ctx.plan = plan
        ctx.save_for_backward(hidden, weight, targets, lse, lse - entropy)  # lse - H = E_p[z]
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ez = ctx.saved_tensors
        zeros = torch.zeros_like(lse)
        g_logp = zeros if g_logp is None else g_logp.float().contiguous()
        g_ent = zeros if g_ent is None else g_ent.float().contiguous()
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh, dw = _chunked_grads(hidden, weight, targets, lse, ez, g_logp, g_ent, ctx.plan, need_dh, need_dw)
        # dh is this shard's partial sum; full_hidden's backward sums it over the TP group.
        return (dh.to(hidden.dtype) if need_dh else None), dw, None, None


def logprob_entropy(hidden, weight, targets, *, temperature: float = 1.0, tp_group=None,
                    vocab_start: int | None = None, true_vocab_size: int | None = None,
                    sequence_parallel: bool = False, loss_mask=None, chunk_tokens: int | None = None,
                    chunk_vocab: int | None = None, impl: str = "auto"):
    """(logp [T], entropy [T]) in fp32 of softmax(hidden @ weight.T / temperature) over the real
    vocabulary (Megatron's padding rows never enter it), with gradient for hidden and weight
    through both outputs (an output left out of the loss costs nothing in backward).

    hidden [T, H], or with sequence_parallel this rank's [T/tp, H] block of Megatron's sequence
    split (an [s/tp, b, h] output flattened; every per-token input is then [s, b] flattened);
    weight [V_local, H]: rows [vocab_start, vocab_start + V_local) of the padded output layer
    (defaults: Megatron's even split over tp_group, true_vocab_size = all rows). targets: global
    ids [T], the same on every TP rank; loss_mask [T] (optional) only says which targets must be
    real vocabulary ids (all of them without a mask): it does not weight anything.
    Under torch.no_grad() (old-policy and reference passes) nothing is kept for backward.
    chunk_tokens/chunk_vocab: the logits block size (backend defaults); impl: auto (Triton on
    GPU when it imports), triton, torch."""
    plan = _plan(hidden, weight, targets, temperature=temperature, tp_group=tp_group,
                 vocab_start=vocab_start, true_vocab_size=true_vocab_size,
                 sequence_parallel=sequence_parallel, chunk_tokens=chunk_tokens,
                 chunk_vocab=chunk_vocab, impl=impl)
    check_token_vector("loss_mask", loss_mask, targets.shape[0])
    _check_targets(targets, loss_mask, plan.shard.true_vocab)
    full = vocab_parallel.full_hidden(hidden, plan.shard, sequence_parallel)
    if torch.is_grad_enabled() and (full.requires_grad or weight.requires_grad):
        return _FusedLogpEntropy.apply(full, weight, targets, plan)
    logp, entropy, _ = _forward_stats(full, weight, targets, plan)
    return logp, entropy
