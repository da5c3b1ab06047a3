"""Several documents in one row, as attention must see them: no token attends across a document
boundary. The local (CPU) attention takes a [b, 1, s, s] block-diagonal mask; transformer-engine
takes the row as THD, its documents' boundaries as cumulative lengths (Megatron's
PackedSeqParams), and no mask, so fused attention skips the blocks between documents instead of
computing and masking them (and RoPE restarts at each boundary)."""

from __future__ import annotations

import torch



def document_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] document ids -> [b, 1, s, s] bool, True where attention is blocked (Megatron's
    convention): a token sees earlier tokens of its own document only. Padding (-1) sees
    padding, so no query row is fully blocked."""
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    return ~(same & causal).unsqueeze(1)


def cu_seqlens(doc_ids: torch.Tensor) -> torch.Tensor:
    """[1, s] document ids (0, 1, ... in order, -1 for the padding at the end) -> int32
    cumulative lengths [0, n0, n0+n1, ..., s]; the padding is one more sequence, so the lengths
    cover the row exactly (TE's THD layout needs every token in some sequence)."""
    if doc_ids.dim() != 2 or doc_ids.shape[0] != 1:
        raise ValueError(f"THD packing takes one packed row per micro-batch, got doc_ids of shape {tuple(doc_ids.shape)}")
    ids = doc_ids[0]
    change = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
    s = torch.tensor([ids.numel()], device=ids.device)
    return torch.cat([torch.zeros(1, dtype=change.dtype, device=ids.device), change, s]).to(torch.int32)


def packed_seq_params(doc_ids: torch.Tensor):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens(doc_ids)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def attention_inputs(doc_ids: torch.Tensor | None, use_te: bool):
    """(attention_mask, packed_seq_params) for the decoder: both None for plain causal rows."""
    if doc_ids is None:
        return None, None
    if use_te:
        return None, packed_seq_params(doc_ids)
    return document_attention_mask(doc_ids), None
