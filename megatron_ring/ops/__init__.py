"""Fused kernels. logprob_entropy: per-token target log-probability and entropy from hidden
states and the vocabulary-parallel output weight, differentiable, never holding [T, V] logits
(the SFT loss; under torch.no_grad() the old-policy and reference passes); fused_c3po_loss: the
RL loss built on it; full_logits: every TP rank's logits shard gathered (sampling, tests)."""

from megatron_ring.ops.c3po_objective import C3POLossOutput
from megatron_ring.ops.fused_c3po_loss import fused_c3po_loss
from megatron_ring.ops.logprob_entropy import logprob_entropy
from megatron_ring.ops.vocab_parallel import full_logits

__all__ = ["C3POLossOutput", "full_logits", "fused_c3po_loss", "logprob_entropy"]
