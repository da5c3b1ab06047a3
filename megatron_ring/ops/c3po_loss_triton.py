"""Triton backend: launchers for c3po_triton_kernels. Importing this module needs no triton and
no GPU; the kernels are imported at first use. On CPU tensors the kernels run only under
Triton's interpreter (TRITON_INTERPRET=1 set before the first use), which the tests use."""

from __future__ import annotations

import functools
import importlib.util

import torch

from megatron_ring.ops import softmax_stats

CHUNK_TOKENS = 16384
CHUNK_VOCAB = 8192
# (BLOCK_T, BLOCK_V, BLOCK_H, num_warps) compiled, and interpreted (small: numpy per program).
_GPU_BLOCKS = (64, 128, 64, 8)
_INTERPRETER_BLOCKS = (16, 32, 16, 1)
# Vocabulary tiles per forward program: 8192 logits per row; independent of T and V so that
# one compilation serves every micro-batch, and enough programs fill the GPU at any T.
_FORWARD_TILES = 64


def importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _kernels():
    from megatron_ring.ops import c3po_triton_kernels

    return c3po_triton_kernels


def interpreted() -> bool:
    return type(_kernels().stats_kernel).__name__ == "InterpretedFunction"


def check_device(t: torch.Tensor):
    if not importable():
        raise RuntimeError("impl='triton' needs the triton package, which is not importable")
    if not t.is_cuda and not interpreted():
        raise RuntimeError(f"impl='triton' on a {t.device.type} tensor needs TRITON_INTERPRET=1 "
                           "set before the kernels are first used (or a CUDA tensor)")


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels read the inputs as they are (bf16 on GPU) and accumulate in fp32."""
    return dtype


def _config(dtype: torch.dtype):
    """Block sizes and the constexpr options of the kernels' dot product."""
    interp = interpreted()
    # fp32 inputs get exact fp32 products, not TF32; the interpreter's bf16 dot is upcast.
    dot = dict(PRECISION="ieee" if dtype == torch.float32 else "tf32", UPCAST=interp)
    return (_INTERPRETER_BLOCKS if interp else _GPU_BLOCKS), dot


def forward_stats(hidden, weight, tgt_local, inv_temp: float, chunk_tokens: int, chunk_vocab: int):
    """One launch over all tokens and this shard's real rows; chunks are not needed forward."""
    (bt, bv, bh, warps), dot = _config(hidden.dtype)
    n_tok, n_cols = hidden.shape[0], weight.shape[0]
    tiles = min(_FORWARD_TILES, _cdiv(n_cols, bv)) if n_cols else 1
    splits = max(1, _cdiv(n_cols, bv * tiles))
    out = torch.empty(splits, 4, n_tok, dtype=torch.float32, device=hidden.device)
    if n_tok:
        _kernels().stats_kernel[(_cdiv(n_tok, bt), splits)](
            hidden, weight, tgt_local.to(torch.int32).contiguous(), out, n_tok, n_cols,
            hidden.stride(0), weight.stride(0), inv_temp, softmax_stats.EMPTY_MAX,
            H=hidden.shape[1], TILES=tiles, BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh,
            **dot, num_warps=warps)
    return softmax_stats.combine(out)


def dz_block(h, w, tgt, lse, ez, g_logp, g_ent, inv_temp: float) -> torch.Tensor:
    (bt, bv, bh, warps), dot = _config(h.dtype)
    dz = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
    _kernels().dz_kernel[(_cdiv(h.shape[0], bt), _cdiv(w.shape[0], bv))](
        h, w, tgt.to(torch.int32).contiguous(), lse.contiguous(), ez.contiguous(),
        g_logp.contiguous(), g_ent.contiguous(), dz, h.shape[0], w.shape[0],
        h.stride(0), w.stride(0), dz.stride(0), inv_temp,
        H=h.shape[1], BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh, **dot, num_warps=warps)
    return dz


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
