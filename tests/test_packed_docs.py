"""Packed documents as attention sees them (models/packed_docs.py): THD boundaries for
transformer-engine and the CPU mask describe the same documents."""

import pytest
import torch

from megatron_ring.models.packed_docs import attention_inputs, cu_seqlens, packed_seq_params


def test_cu_seqlens_cover_the_row_with_padding_as_its_own_sequence():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    assert cu_seqlens(doc_ids).tolist() == [0, 3, 5, 6, 8]
    assert cu_seqlens(torch.tensor([[0, 0, 1, 1]])).tolist() == [0, 2, 4]
    assert cu_seqlens(doc_ids).dtype == torch.int32  # TE's kernels take int32
    p = packed_seq_params(doc_ids)
    assert p.qkv_format == "thd" and p.max_seqlen_q == p.max_seqlen_kv == 3


def test_thd_boundaries_and_the_cpu_mask_agree():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask, none = attention_inputs(doc_ids, use_te=False)
    assert none is None
    cu = cu_seqlens(doc_ids).tolist()
    allowed = ~mask[0, 0]
    for q in range(6):
        seq = max(i for i, c in enumerate(cu[:-1]) if c <= q)
        assert allowed[q].nonzero().flatten().tolist() == list(range(cu[seq], q + 1))
    assert attention_inputs(None, use_te=True) == (None, None)


def test_thd_takes_one_packed_row():
    with pytest.raises(ValueError, match="one packed row"):
        cu_seqlens(torch.zeros(2, 4, dtype=torch.long))
