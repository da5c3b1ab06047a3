"""The straightforward C3PO loss: full [T, V] fp32 logits, log_softmax, autograd. What the fused
loss replaces; the benchmark's baseline (single rank)."""

from __future__ import annotations

import torch

from megatron_ring.ops.c3po_objective import C3POCoefficients, C3POLossOutput, c3po_objective, check_is_args


def naive_c3po_loss(hidden, weight, targets, advantages, loss_mask, old_logp=None, ref_logp=None, *,
                    normalizer: float, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
                    entropy_coef: float = 0.0, temperature: float = 1.0,
                    true_vocab_size: int | None = None, rollout_logp=None, tis_cap: float = 0.0,
                    is_mask: str = "off", is_mask_low: float = 0.5, is_mask_high: float = 2.0,
                    seq_ids=None) -> C3POLossOutput:
    coef = C3POCoefficients(normalizer, eps_low, eps_high, beta, entropy_coef)
    check_is_args(rollout_logp, tis_cap, is_mask, is_mask_low, is_mask_high, seq_ids)
    logits = (hidden.float() @ weight.float().T) / temperature
    if true_vocab_size is not None:
        logits = logits[:, :true_vocab_size]
    logp_all = torch.log_softmax(logits, dim=-1)
    del logits
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    logp = logp_all.gather(1, targets.long().clamp(0, logp_all.shape[1] - 1)[:, None])[:, 0]
    return c3po_objective(logp, entropy, advantages, loss_mask, old_logp, ref_logp, coef, rollout_logp, tis_cap,
                          is_mask=is_mask, is_mask_low=is_mask_low, is_mask_high=is_mask_high, seq_ids=seq_ids)
