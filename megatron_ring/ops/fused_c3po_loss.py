"""Public API of the fused C3PO loss: logprob, entropy, clipped ratio and KL from the final
hidden states and the vocabulary-parallel output weight, without materialising the logits.

fused_c3po_loss = logprob_entropy (the differentiable vocabulary-parallel op of
ops/logprob_entropy.py) + c3po_objective (ops/c3po_objective.py) on its per-token outputs."""

from __future__ import annotations

from megatron_ring.ops.c3po_objective import C3POCoefficients, C3POLossOutput, c3po_objective, check_is_args
from megatron_ring.ops.logprob_entropy import check_token_vector, logprob_entropy, token_rows


def fused_c3po_loss(hidden, weight, targets, advantages, loss_mask, old_logp=None, ref_logp=None, *,
                    normalizer: float, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
                    entropy_coef: float = 0.0, temperature: float = 1.0, tp_group=None,
                    vocab_start: int | None = None, true_vocab_size: int | None = None,
                    sequence_parallel: bool = False, chunk_tokens: int | None = None,
                    chunk_vocab: int | None = None, impl: str = "auto", rollout_logp=None,
                    tis_cap: float = 0.0, is_mask: str = "off", is_mask_low: float = 0.5,
                    is_mask_high: float = 2.0, seq_ids=None) -> C3POLossOutput:
    """C3PO loss of one micro-batch, straight from the final hidden states.

    hidden [T, H], or with sequence_parallel this rank's [T/tp, H] block of Megatron's
    sequence split (a [s/tp, b, h] output flattened: every per-token input is then [s, b]
    flattened); weight [V_local, H]: rows [vocab_start, vocab_start + V_local) of the padded
    output layer. targets (global ids), advantages, loss_mask, old_logp, ref_logp: [T], the same
    on every TP rank.
    old_logp None: on-policy (ratio 1, PPO's first-epoch gradient). ref_logp None or beta 0:
    no KL. normalizer: C3PO's constant token budget Phi, the loss's divisor. tis_cap > 0:
    truncated importance weights against rollout_logp [T] (ops/c3po_objective.py). is_mask
    "token" / "sequence": weight 0 for a live token whose ratio pi_old / pi_rollout (or whose
    sequence's geometric-mean ratio; seq_ids [T] integer: each token's sequence) lies outside
    [is_mask_low, is_mask_high], 0 <= low < 1 < high; out.is_masked marks those tokens.
    Returns the loss (with gradient for hidden and weight) and detached per-token metrics."""
    coef = C3POCoefficients(normalizer, eps_low, eps_high, beta, entropy_coef)
    n = token_rows(hidden, tp_group, sequence_parallel)
    check_is_args(rollout_logp, tis_cap, is_mask, is_mask_low, is_mask_high, seq_ids)
    for name, t in (("advantages", advantages), ("old_logp", old_logp), ("ref_logp", ref_logp),
                    ("rollout_logp", rollout_logp), ("seq_ids", seq_ids)):
        check_token_vector(name, t, n)
    logp, entropy = logprob_entropy(hidden, weight, targets, temperature=temperature, tp_group=tp_group,
                                    vocab_start=vocab_start, true_vocab_size=true_vocab_size,
                                    sequence_parallel=sequence_parallel, loss_mask=loss_mask,
                                    chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab, impl=impl)
    return c3po_objective(logp, entropy, advantages, loss_mask, old_logp, ref_logp, coef, rollout_logp, tis_cap,
                          is_mask=is_mask, is_mask_low=is_mask_low, is_mask_high=is_mask_high, seq_ids=seq_ids)
