"""Fused kernels. fused_c3po_loss: the RL loss from hidden states (vocab-parallel, no logits);
logprob_entropy: its forward-only twin for the old-policy and reference passes."""

from megatron_ring.ops.c3po_objective import C3POLossOutput
from megatron_ring.ops.fused_c3po_loss import fused_c3po_loss, logprob_entropy

__all__ = ["C3POLossOutput", "fused_c3po_loss", "logprob_entropy"]
