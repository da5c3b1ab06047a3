"""The model's tokens through the vocabulary-parallel output layer, as the SFT loss, the RL loss
and the RL old/reference passes all read them: the final hidden states flattened in Megatron's
token order, and what `ops.logprob_entropy` / `ops.fused_c3po_loss` need to know of the
model's output shard (its TP group, the true vocabulary, sequence parallelism)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from megatron_ring.models.packed_docs import attention_inputs


def unwrap(model):
    """The LingModel under Megatron's DDP (whose forward only calls its module)."""
    return getattr(model, "module", model)


def flat(x: torch.Tensor | None) -> torch.Tensor | None:
    """[b, s] -> [s*b], the token order of Megatron's [s, b, h] hidden states flattened."""
    return None if x is None else x.transpose(0, 1).reshape(-1).contiguous()


def hidden_tokens(model, input_ids, position_ids, doc_ids=None) -> torch.Tensor:
    """Final hidden states [s*b (/tp with sequence parallelism), h]. doc_ids [b, s]: packed
    documents (models/packed_docs.py: a mask on CPU, THD under transformer-engine); None: causal."""
    m = unwrap(model)
    mask, packed = attention_inputs(doc_ids, m.use_te)
    h = m.hidden_states(input_ids, position_ids, mask, packed_seq_params=packed)
    return h.reshape(-1, h.shape[-1])


def head_args(model) -> dict:
    """The output shard's description for the fused ops (the weight is `output_weight()`)."""
    m = unwrap(model)
    tp = ps.get_tensor_model_parallel_world_size()
    return dict(tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None,
                true_vocab_size=m.arch.vocab_size, sequence_parallel=m.config.sequence_parallel)
