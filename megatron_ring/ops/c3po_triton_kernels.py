"""Triton kernels of the fused loss. Imported only by c3po_loss_triton, and only when the Triton
path runs (this module needs triton). Loop bounds are constexpr: the hidden size and the tiles
per program are fixed per model, and Triton's interpreter cannot loop to runtime scalars."""

import triton
import triton.language as tl


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, stride_h, stride_w, inv_temp,
                 H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """z[BLOCK_T, BLOCK_V] = h[rows] @ w[cols].T / temperature, accumulated in fp32."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # Triton 3.6's interpreter gets bf16 dots wrong
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc * inv_temp


@triton.jit
def stats_kernel(h_ptr, w_ptr, tgt_ptr, out_ptr, n_rows, n_cols, stride_h, stride_w, inv_temp,
                 empty_max, H: tl.constexpr, TILES: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Online log-sum-exp over TILES vocabulary tiles: program (i, j) writes the statistics
    (m, s, q, zy) of rows block i over tiles [j*TILES, (j+1)*TILES) to out[j, :, rows]."""
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    m = tl.zeros((BLOCK_T,), dtype=tl.float32) + empty_max
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    q = tl.zeros((BLOCK_T,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for i in range(0, TILES):
        cols = (pid_v * TILES + i) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < n_cols  # the vocabulary's ragged end, and tiles past it, are masked
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, stride_h, stride_w, inv_temp,
                         H, BLOCK_T, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
        ok = col_ok[None, :]
        m_new = tl.maximum(m, tl.max(tl.where(ok, z, float("-inf")), axis=1))
        shift = m - m_new
        d = tl.where(ok, z - m_new[:, None], 0.0)
        e = tl.where(ok, tl.exp(d), 0.0)
        alpha = tl.exp(shift)
        q = alpha * (q + shift * s) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        zy += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    out = out_ptr + pid_v * 4 * n_rows + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + n_rows, s, mask=row_ok)
    tl.store(out + 2 * n_rows, q, mask=row_ok)
    tl.store(out + 3 * n_rows, zy, mask=row_ok)


@triton.jit
def dz_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, ez_ptr, glogp_ptr, gent_ptr, dz_ptr, n_rows, n_cols,
              stride_h, stride_w, stride_dz, inv_temp, H: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr):
    """Recompute one logits tile and write d loss / d(h @ w.T) for it (see c3po_loss_torch.dz_block)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, stride_h, stride_w, inv_temp,
                     H, BLOCK_T, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ez = tl.load(ez_ptr + rows, mask=row_ok, other=0.0)
    g_logp = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0)
    g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    dz = -p * (g_logp[:, None] + g_ent[:, None] * (z - ez[:, None]))
    dz = tl.where(cols[None, :] == tgt[:, None], dz + g_logp[:, None], dz) * inv_temp
    ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
