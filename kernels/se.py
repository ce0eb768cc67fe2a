"""Fused squeeze-excitation gate: Triton kernels, their launchers, the ``fasttrain::se_gate`` op.

Math (x: [N, C, H, W], w1: [Cr, C], b1: [Cr], w2: [C, Cr], b2: [C]; HW = H * W)::

    m[n, c] = 1/HW * sum_hw x[n, c, hw]                  squeeze
    h[n]    = relu(w1 @ m[n] + b1)                        excitation MLP, hidden [Cr]
    s[n]    = sigmoid(w2 @ h[n] + b2)                     gate [C]
    y       = x * s[n, c]                                 plain gate
    y       = relu(x * s[n, c] + residual)                fused with the block's residual add

Backward, with g = dL/dy masked by (y > 0) when the residual/ReLU is fused::

    dL/dresidual = g
    gs[n, c]     = sum_hw g * x                            dL/ds
    dz           = gs * s * (1 - s)                        through the sigmoid
    dw2 = dz^T h,  db2 = sum_n dz,  dh = (dz @ w2) * (h > 0)
    dw1 = dh^T m,  db1 = sum_n dh,  dm = dh @ w1
    dL/dx        = g * s[n, c] + dm[n, c] / HW

Kernels (each memory pass reads/writes the big [N, C, H, W] tensors at most once):

    forward   _se_pool_kernel     x -> m                        (reduce over HW)
              _se_excite_kernel   m -> s                        (per image MLP)
              _se_gate_kernel     x, s, residual -> y           (elementwise)
    backward  _se_bwd_reduce_kernel  dy, x, y -> gs, m, g       (one pass: also re-derives m, so the
                                                                 forward saves nothing but x and y)
              _se_excite_bwd_kernel  m, gs -> s, h, dz, dh, dm/HW    (per image MLP backward)
              _se_wgrad_kernel       dz, h, dh, m -> dw1, db1, dw2, db2   (deterministic sum over N)
              _se_gate_bwd_kernel    g, s, dm/HW -> dx          (elementwise)

Dtypes: x, residual and the upstream gradient may be fp32, fp16 or bf16; the weights may have another
dtype (fp32 master weights with bf16 activations under autocast). Every kernel loads, converts to fp32,
accumulates in fp32 and stores in the destination's dtype: y and dx in x's dtype, dresidual in the
upstream gradient's dtype (autograd casts it to the residual's dtype), weight grads in the weights'
dtype. The MLP always runs in fp32, whatever autocast says.

Layouts: any N, C, H, W. The kernels index [n, c, hw] with explicit strides, which covers NCHW and
channels_last (both have stride_h == W * stride_w) and broadcast (stride-0) gradients; other layouts are
copied to contiguous first. Outputs are allocated with ``empty_like`` so y and dx keep x's memory format.

Device dispatch: CUDA tensors run the Triton kernels; CPU tensors run the PyTorch reference, except
under ``TRITON_INTERPRET=1`` where they run the Triton kernels in the interpreter (how the tests check
the kernel code on CPU).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import INTERPRET, next_pow2, use_triton

__all__ = ["se_gate", "se_gate_reference"]

# Elements per program of the elementwise and reduction kernels (a [BLOCK_C, BLOCK_HW] tile), and the
# size cap of the broadcast-multiply tiles of the MLP kernels. The GPU values keep a tile in registers;
# the interpreter pays ~30 ms per program whatever its size, so it gets 8x larger tiles (the test shapes
# still run multi-iteration loops and partial tiles: channels_last 32x32, odd 7x5).
# GPU values from benchmarks/kernels/tune_se.py on an H200 (benchmarks/results/2026-11-26-h200/tune):
# gate 2048 / reduce 1024 was the fastest pair over the network's four SE shapes (2.78 ms against 4.06
# ms for the former 4096 / 2048) and second for the paper's stem SE (0.696 ms; best 0.688). That sweep
# timed forward+backward with the host's launch overhead included (fixed since in benchmarks/common.py):
# a provisional choice until the sweep is rerun.
_GATE_TILE = 16384 if INTERPRET else 2048
_REDUCE_TILE = 8192 if INTERPRET else 1024
_MLP_TILE = 4096


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _tile(c_start, hw_start, C, HW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Channel indices, HW indices and the in-bounds mask of one [BLOCK_C, BLOCK_HW] tile."""
    c = c_start + tl.arange(0, BLOCK_C)
    hw = hw_start + tl.arange(0, BLOCK_HW)
    mask = (c[:, None] < C) & (hw[None, :] < HW)
    return c, hw, mask


@triton.jit
def _gate_tile(HW_BLOCKS, C, HW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """(n, c, hw, mask) of an elementwise program. Axis 0 walks (image, HW block) pairs: only it may
    exceed CUDA's 65,535 programs (an axis of HW blocks alone would, for large images in channels_last)."""
    pid = tl.program_id(0)
    n = (pid // HW_BLOCKS).to(tl.int64)
    c, hw, mask = _tile(tl.program_id(1) * BLOCK_C, (pid % HW_BLOCKS) * BLOCK_HW, C, HW, BLOCK_C, BLOCK_HW)
    return n, c, hw, mask


@triton.jit
def _offsets(c, hw, stride_c, stride_hw):
    """Element offsets of a tile inside one image; the stride-1 axis is the coalesced one."""
    return c[:, None] * stride_c + hw[None, :] * stride_hw


@triton.jit
def _se_pool_kernel(
    x_ptr, m_ptr, C, HW, sx_n, sx_c, sx_hw, inv_hw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """m[n, c] = mean_hw x[n, c, :]. Grid (N, cdiv(C, BLOCK_C)); fp32 accumulation."""
    n = tl.program_id(0)
    c_start = tl.program_id(1) * BLOCK_C
    x_ptr += n.to(tl.int64) * sx_n
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for hw_start in range(0, HW, BLOCK_HW):
        c, hw, mask = _tile(c_start, hw_start, C, HW, BLOCK_C, BLOCK_HW)
        acc += tl.load(x_ptr + _offsets(c, hw, sx_c, sx_hw), mask=mask, other=0.0).to(tl.float32)
    c = c_start + tl.arange(0, BLOCK_C)
    tl.store(m_ptr + n * C + c, tl.sum(acc, axis=1) * inv_hw, mask=c < C)


@triton.jit
def _se_hidden(m_row_ptr, w1_ptr, b1_ptr, C, CR, BLOCK_C: tl.constexpr, BLOCK_CR: tl.constexpr):
    """h = relu(w1 @ m + b1) for one image, [BLOCK_CR] in fp32 (lanes >= CR are 0)."""
    j = tl.arange(0, BLOCK_CR)
    acc = tl.zeros([BLOCK_CR, BLOCK_C], dtype=tl.float32)
    for c_start in range(0, C, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        m = tl.load(m_row_ptr + c, mask=c < C, other=0.0)
        w_mask = (j[:, None] < CR) & (c[None, :] < C)
        w = tl.load(w1_ptr + j[:, None] * C + c[None, :], mask=w_mask, other=0.0).to(tl.float32)
        acc += w * m[None, :]
    b = tl.load(b1_ptr + j, mask=j < CR, other=0.0).to(tl.float32)
    return tl.maximum(tl.sum(acc, axis=1) + b, 0.0)


@triton.jit
def _se_gate_logits(h, w2_ptr, b2_ptr, c, C, CR, BLOCK_CR: tl.constexpr):
    """z[c] = w2[c, :] @ h + b2[c] for a block of channels c, fp32."""
    j = tl.arange(0, BLOCK_CR)
    w_mask = (c[:, None] < C) & (j[None, :] < CR)
    w = tl.load(w2_ptr + c[:, None] * CR + j[None, :], mask=w_mask, other=0.0).to(tl.float32)
    b = tl.load(b2_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    return tl.sum(w * h[None, :], axis=1) + b


@triton.jit
def _se_excite_kernel(
    m_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, s_ptr, C, CR,
    BLOCK_C: tl.constexpr, BLOCK_CR: tl.constexpr,
):
    """s[n] = sigmoid(w2 @ relu(w1 @ m[n] + b1) + b2). Grid (N,): the MLP is tiny (C x C/r)."""
    n = tl.program_id(0)
    h = _se_hidden(m_ptr + n * C, w1_ptr, b1_ptr, C, CR, BLOCK_C, BLOCK_CR)
    for c_start in range(0, C, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        z = _se_gate_logits(h, w2_ptr, b2_ptr, c, C, CR, BLOCK_CR)
        tl.store(s_ptr + n * C + c, tl.sigmoid(z), mask=c < C)


@triton.jit
def _se_gate_kernel(
    x_ptr, s_ptr, r_ptr, y_ptr, C, HW,
    sx_n, sx_c, sx_hw, sr_n, sr_c, sr_hw, sy_n, sy_c, sy_hw,
    HW_BLOCKS, HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """y = x * s[n, c], or relu(x * s[n, c] + r). Grid from `_gate_grid`."""
    n, c, hw, mask = _gate_tile(HW_BLOCKS, C, HW, BLOCK_C, BLOCK_HW)
    x = tl.load(x_ptr + n * sx_n + _offsets(c, hw, sx_c, sx_hw), mask=mask, other=0.0)
    s = tl.load(s_ptr + n * C + c, mask=c < C, other=0.0)
    y = x.to(tl.float32) * s[:, None]
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + n * sr_n + _offsets(c, hw, sr_c, sr_hw), mask=mask, other=0.0)
        y = tl.maximum(y + r.to(tl.float32), 0.0)
    y_ptr += n * sy_n + _offsets(c, hw, sy_c, sy_hw)
    tl.store(y_ptr, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _se_bwd_reduce_kernel(
    dy_ptr, x_ptr, y_ptr, g_ptr, gs_ptr, m_ptr, C, HW,
    sd_n, sd_c, sd_hw, sx_n, sx_c, sx_hw, sy_n, sy_c, sy_hw, sg_n, sg_c, sg_hw, inv_hw,
    HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """One pass over dy and x: gs = sum_hw g * x and m = mean_hw x (re-derived, not saved).

    With the fused residual, g = dy * (y > 0) is also stored: it is dL/dresidual and the input of the
    dx kernel, which then reads one tensor instead of dy and y. Grid (N, cdiv(C, BLOCK_C)).
    """
    n = tl.program_id(0).to(tl.int64)
    c_start = tl.program_id(1) * BLOCK_C
    acc_gs = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    acc_x = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for hw_start in range(0, HW, BLOCK_HW):
        c, hw, mask = _tile(c_start, hw_start, C, HW, BLOCK_C, BLOCK_HW)
        dy = tl.load(dy_ptr + n * sd_n + _offsets(c, hw, sd_c, sd_hw), mask=mask, other=0.0)
        x = tl.load(x_ptr + n * sx_n + _offsets(c, hw, sx_c, sx_hw), mask=mask, other=0.0)
        if HAS_RESIDUAL:
            y = tl.load(y_ptr + n * sy_n + _offsets(c, hw, sy_c, sy_hw), mask=mask, other=0.0)
            dy = tl.where(y > 0, dy, 0.0)
            g_offs = n * sg_n + _offsets(c, hw, sg_c, sg_hw)
            tl.store(g_ptr + g_offs, dy.to(g_ptr.dtype.element_ty), mask=mask)
        x = x.to(tl.float32)
        acc_gs += dy.to(tl.float32) * x
        acc_x += x
    c = c_start + tl.arange(0, BLOCK_C)
    tl.store(gs_ptr + n * C + c, tl.sum(acc_gs, axis=1), mask=c < C)
    tl.store(m_ptr + n * C + c, tl.sum(acc_x, axis=1) * inv_hw, mask=c < C)


@triton.jit
def _se_excite_bwd_kernel(
    m_ptr, gs_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, s_ptr, h_ptr, dz_ptr, dh_ptr, dx_pool_ptr,
    C, CR, inv_hw, BLOCK_C: tl.constexpr, BLOCK_CR: tl.constexpr,
):
    """Per image: recompute h and s, then dz, dh and the pooled-path gradient dm / HW. Grid (N,)."""
    n = tl.program_id(0)
    j = tl.arange(0, BLOCK_CR)
    h = _se_hidden(m_ptr + n * C, w1_ptr, b1_ptr, C, CR, BLOCK_C, BLOCK_CR)
    # dh = w2^T dz needs dz over all channels: accumulate it over the channel blocks.
    dh_acc = tl.zeros([BLOCK_C, BLOCK_CR], dtype=tl.float32)
    for c_start in range(0, C, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        s = tl.sigmoid(_se_gate_logits(h, w2_ptr, b2_ptr, c, C, CR, BLOCK_CR))
        gs = tl.load(gs_ptr + n * C + c, mask=c < C, other=0.0)
        dz = gs * s * (1.0 - s)
        tl.store(s_ptr + n * C + c, s, mask=c < C)
        tl.store(dz_ptr + n * C + c, dz, mask=c < C)
        w_mask = (c[:, None] < C) & (j[None, :] < CR)
        w2 = tl.load(w2_ptr + c[:, None] * CR + j[None, :], mask=w_mask, other=0.0).to(tl.float32)
        dh_acc += w2 * dz[:, None]
    dh = tl.where(h > 0, tl.sum(dh_acc, axis=0), 0.0)
    tl.store(h_ptr + n * CR + j, h, mask=j < CR)
    tl.store(dh_ptr + n * CR + j, dh, mask=j < CR)
    for c_start in range(0, C, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        w_mask = (j[:, None] < CR) & (c[None, :] < C)
        w1 = tl.load(w1_ptr + j[:, None] * C + c[None, :], mask=w_mask, other=0.0).to(tl.float32)
        dm = tl.sum(w1 * dh[:, None], axis=0)
        tl.store(dx_pool_ptr + n * C + c, dm * inv_hw, mask=c < C)


@triton.jit
def _se_wgrad_kernel(
    dz_ptr, h_ptr, dh_ptr, m_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, N, C, CR,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CR: tl.constexpr,
):
    """dw2 = dz^T h, db2 = sum_n dz, dw1 = dh^T m, db1 = sum_n dh. Grid (cdiv(C, BLOCK_C),).

    Each program owns a block of channels and loops over the batch, so the sums over N are
    deterministic (no atomics). The products are broadcast-multiply-reduce in fp32 rather than
    ``tl.dot``: Cr can be as small as 1 and the operands are fp32.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, BLOCK_CR)
    acc_w2 = tl.zeros([BLOCK_C, BLOCK_CR], dtype=tl.float32)
    acc_w1 = tl.zeros([BLOCK_CR, BLOCK_C], dtype=tl.float32)
    acc_b2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b1 = tl.zeros([BLOCK_CR], dtype=tl.float32)
    for n_start in range(0, N, BLOCK_N):
        n = n_start + tl.arange(0, BLOCK_N)
        nc_mask = (n[:, None] < N) & (c[None, :] < C)
        nj_mask = (n[:, None] < N) & (j[None, :] < CR)
        dz = tl.load(dz_ptr + n[:, None] * C + c[None, :], mask=nc_mask, other=0.0)
        m = tl.load(m_ptr + n[:, None] * C + c[None, :], mask=nc_mask, other=0.0)
        h = tl.load(h_ptr + n[:, None] * CR + j[None, :], mask=nj_mask, other=0.0)
        dh = tl.load(dh_ptr + n[:, None] * CR + j[None, :], mask=nj_mask, other=0.0)
        acc_w2 += tl.sum(dz[:, :, None] * h[:, None, :], axis=0)
        acc_w1 += tl.sum(dh[:, :, None] * m[:, None, :], axis=0)
        acc_b2 += tl.sum(dz, axis=0)
        acc_b1 += tl.sum(dh, axis=0)
    cj_mask = (c[:, None] < C) & (j[None, :] < CR)
    tl.store(dw2_ptr + c[:, None] * CR + j[None, :], acc_w2.to(dw2_ptr.dtype.element_ty), mask=cj_mask)
    jc_mask = (j[:, None] < CR) & (c[None, :] < C)
    tl.store(dw1_ptr + j[:, None] * C + c[None, :], acc_w1.to(dw1_ptr.dtype.element_ty), mask=jc_mask)
    tl.store(db2_ptr + c, acc_b2.to(db2_ptr.dtype.element_ty), mask=c < C)
    # Every program computed the same db1; one of them writes it.
    tl.store(db1_ptr + j, acc_b1.to(db1_ptr.dtype.element_ty), mask=(j < CR) & (tl.program_id(0) == 0))


@triton.jit
def _se_gate_bwd_kernel(
    g_ptr, s_ptr, p_ptr, dx_ptr, C, HW, sg_n, sg_c, sg_hw, sd_n, sd_c, sd_hw,
    HW_BLOCKS, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """dx = g * s[n, c] + p[n, c] with p = dm / HW. Grid from `_gate_grid`."""
    n, c, hw, mask = _gate_tile(HW_BLOCKS, C, HW, BLOCK_C, BLOCK_HW)
    g = tl.load(g_ptr + n * sg_n + _offsets(c, hw, sg_c, sg_hw), mask=mask, other=0.0)
    s = tl.load(s_ptr + n * C + c, mask=c < C, other=0.0)
    p = tl.load(p_ptr + n * C + c, mask=c < C, other=0.0)
    dx = g.to(tl.float32) * s[:, None] + p[:, None]
    dx_ptr += n * sd_n + _offsets(c, hw, sd_c, sd_hw)
    tl.store(dx_ptr, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _nchw_strides(t: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """(stride_n, stride_c, stride_hw) when H and W flatten into one strided axis, else None."""
    _, _, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if w == 1:
        return sn, sc, sh
    if h == 1 or sh == w * sw:
        return sn, sc, sw
    return None


def _flat(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` (copied to contiguous if its H, W do not flatten) and its [n, c, hw] strides."""
    strides = _nchw_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _nchw_strides(t)
    return t, strides


def _empty_like_flat(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, buf): ``out = empty_like(t)`` keeps t's memory format (what the fake kernels promise);
    ``buf`` is where a kernel writes: ``out`` itself, or a contiguous scratch tensor when out's H, W do
    not flatten (then copy ``buf`` into ``out`` afterwards)."""
    out = torch.empty_like(t)
    if _nchw_strides(out) is not None:
        return out, out
    return out, torch.empty_like(t, memory_format=torch.contiguous_format)


def _blocks(C: int, HW: int, channels_fast: bool, tile: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) of a ~``tile``-element tile, spanning the contiguous axis first.

    The contiguous axis is HW for NCHW and C for channels_last; covering it first keeps the loads
    coalesced and the remaining budget goes to the other axis.
    """
    if channels_fast:
        block_c = min(next_pow2(C), tile)
        return block_c, min(next_pow2(HW), max(1, tile // block_c))
    block_hw = min(next_pow2(HW), tile)
    return min(next_pow2(C), max(1, tile // block_hw)), block_hw


def _gate_grid(N: int, C: int, HW: int, block_c: int, block_hw: int) -> tuple[tuple[int, int], int]:
    """((N x HW blocks, C blocks), HW blocks) for the elementwise kernels: CUDA allows 2^31 - 1 programs
    on axis 0 but 65,535 on the others, and only C blocks stay small for every real shape."""
    hw_blocks = max(1, triton.cdiv(HW, block_hw))
    return (N * hw_blocks, triton.cdiv(C, block_c)), hw_blocks


def _warps(block_elems: int) -> int:
    return 8 if block_elems >= 4096 else 4


def _mlp_blocks(C: int, CR: int) -> tuple[int, int]:
    block_cr = next_pow2(CR)
    return min(next_pow2(C), max(16, _MLP_TILE // block_cr)), block_cr


def _pool(x: torch.Tensor, xs: tuple[int, int, int]) -> torch.Tensor:
    N, C, H, W = x.shape
    m = torch.empty(N, C, device=x.device, dtype=torch.float32)
    bc, bhw = _blocks(C, H * W, xs[1] == 1, _REDUCE_TILE)
    _se_pool_kernel[(N, triton.cdiv(C, bc))](
        x, m, C, H * W, *xs, 1.0 / max(H * W, 1), BLOCK_C=bc, BLOCK_HW=bhw, num_warps=_warps(bc * bhw)
    )
    return m


def _excite(m: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    N, C = m.shape
    CR = w1.shape[0]
    s = torch.empty_like(m)
    bc, bcr = _mlp_blocks(C, CR)
    _se_excite_kernel[(N,)](m, w1, b1, w2, b2, s, C, CR, BLOCK_C=bc, BLOCK_CR=bcr)
    return s


def _se_gate_triton(x, w1, b1, w2, b2, residual):
    N, C, H, W = x.shape
    y, y_buf = _empty_like_flat(x)
    x, xs = _flat(x)
    w1, b1, w2, b2 = (t.contiguous() for t in (w1, b1, w2, b2))
    s = _excite(_pool(x, xs), w1, b1, w2, b2)
    r, rs = _flat(residual) if residual is not None else (x, xs)
    bc, bhw = _blocks(C, H * W, xs[1] == 1, _GATE_TILE)
    grid, hw_blocks = _gate_grid(N, C, H * W, bc, bhw)
    _se_gate_kernel[grid](
        x, s, r, y_buf, C, H * W, *xs, *rs, *_nchw_strides(y_buf), hw_blocks,
        HAS_RESIDUAL=residual is not None, BLOCK_C=bc, BLOCK_HW=bhw, num_warps=_warps(bc * bhw),
    )
    return y if y_buf is y else y.copy_(y_buf)


def _bwd_reduce(dy, ds, x, xs, y, ys, g, has_res):
    """Pass 1 over the big tensors: (gs, m) per (n, c) in fp32, and g = dy * (y > 0) when fused."""
    N, C, H, W = x.shape
    gs, m = (torch.empty(N, C, device=x.device, dtype=torch.float32) for _ in range(2))
    bc, bhw = _blocks(C, H * W, xs[1] == 1, _REDUCE_TILE)
    _se_bwd_reduce_kernel[(N, triton.cdiv(C, bc))](
        dy, x, y, g, gs, m, C, H * W, *ds, *xs, *ys, *_nchw_strides(g), 1.0 / max(H * W, 1),
        HAS_RESIDUAL=has_res, BLOCK_C=bc, BLOCK_HW=bhw, num_warps=_warps(bc * bhw),
    )
    return gs, m


def _excite_backward(m, gs, w1, b1, w2, b2, HW):
    """The MLP backward: s, dm / HW (the pooled path of dx) and the weight gradients."""
    (N, C), CR = m.shape, w1.shape[0]
    f32 = dict(device=m.device, dtype=torch.float32)
    s, dz, dx_pool = (torch.empty(N, C, **f32) for _ in range(3))
    h, dh = (torch.empty(N, CR, **f32) for _ in range(2))
    bc, bcr = _mlp_blocks(C, CR)
    _se_excite_bwd_kernel[(N,)](
        m, gs, w1, b1, w2, b2, s, h, dz, dh, dx_pool, C, CR, 1.0 / max(HW, 1), BLOCK_C=bc, BLOCK_CR=bcr
    )
    dw1, db1, dw2, db2 = (torch.empty_like(t) for t in (w1, b1, w2, b2))
    bc = min(next_pow2(C), 64)
    bn = max(1, min(next_pow2(N), _MLP_TILE // (bc * bcr)))
    _se_wgrad_kernel[(triton.cdiv(C, bc),)](
        dz, h, dh, m, dw1, db1, dw2, db2, N, C, CR, BLOCK_N=bn, BLOCK_C=bc, BLOCK_CR=bcr
    )
    return s, dx_pool, (dw1, db1, dw2, db2)


def _gate_backward(g, s, dx_pool, dx, channels_fast):
    """Pass 2: dx = g * s + dm / HW."""
    N, C, H, W = dx.shape
    bc, bhw = _blocks(C, H * W, channels_fast, _GATE_TILE)
    grid, hw_blocks = _gate_grid(N, C, H * W, bc, bhw)
    _se_gate_bwd_kernel[grid](
        g, s, dx_pool, dx, C, H * W, *_nchw_strides(g), *_nchw_strides(dx), hw_blocks,
        BLOCK_C=bc, BLOCK_HW=bhw, num_warps=_warps(bc * bhw),
    )


def _se_gate_backward_triton(dy, x, w1, b1, w2, b2, y):
    """(dx, dw1, db1, dw2, db2, dresidual or an empty placeholder); y is given iff fused."""
    has_res = y is not None
    dx, dx_buf = _empty_like_flat(x)
    g, g_buf = _empty_like_flat(dy) if has_res else (None, None)
    dy, ds = _flat(dy)
    x, xs = _flat(x)
    y, ys = _flat(y) if has_res else (x, xs)
    g_buf = g_buf if has_res else dy  # without the residual, g is dy itself
    gs, m = _bwd_reduce(dy, ds, x, xs, y, ys, g_buf, has_res)
    w1, b1, w2, b2 = (t.contiguous() for t in (w1, b1, w2, b2))
    s, dx_pool, weight_grads = _excite_backward(m, gs, w1, b1, w2, b2, x.shape[2] * x.shape[3])
    _gate_backward(g_buf, s, dx_pool, dx_buf, xs[1] == 1)
    if dx_buf is not dx:
        dx.copy_(dx_buf)
    if has_res and g_buf is not g:
        g.copy_(g_buf)
    return dx, *weight_grads, (g if has_res else x.new_empty(0))


# ----------------------------------------------------------------------------------------------------
# PyTorch reference (also the CPU implementation of the op)
# ----------------------------------------------------------------------------------------------------
def _as_matrix(w: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight [out, in, 1, 1] as the [out, in] matrix (a view for conv weights)."""
    return w.reshape(w.shape[0], -1)


def _excitation_reference(x, w1, b1, w2, b2):
    """(m, h, s) in fp32 for x [N, C, H, W]."""
    m = x.float().sum(dim=(2, 3)) / max(x.shape[2] * x.shape[3], 1)  # an empty image pools to 0, not NaN
    h = F.relu(F.linear(m, w1.float(), b1.float()))
    s = torch.sigmoid(F.linear(h, w2.float(), b2.float()))
    return m, h, s


def se_gate_reference(x, w1, b1, w2, b2, residual=None):
    """Plain-PyTorch SE gate: ``x * s`` or ``relu(x * s + residual)``; see the module docstring.

    Differentiable by autograd. Computes in fp32 regardless of autocast and returns x's dtype, the
    same numerical contract as the kernels. ``w1``/``w2`` may be 1x1 conv weights or matrices.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        _, _, s = _excitation_reference(x, _as_matrix(w1), b1, _as_matrix(w2), b2)
        y = x.float() * s[:, :, None, None]
        if residual is not None:
            y = F.relu(y + residual.float())
        return y.to(x.dtype)


def _se_gate_backward_reference(dy, x, w1, b1, w2, b2, y):
    """The backward math of the module docstring in PyTorch (the op's CPU path)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        g = dy.float() if y is None else dy.float() * (y > 0)
        m, h, s = _excitation_reference(x, w1, b1, w2, b2)
        dz = (g * x.float()).sum(dim=(2, 3)) * s * (1 - s)
        dh = (dz @ w2.float()) * (h > 0)
        dm = dh @ w1.float()
        dx = g * s[:, :, None, None] + (dm / max(x.shape[2] * x.shape[3], 1))[:, :, None, None]
        grads = (dz.t() @ h, dz.sum(0), dh.t() @ m, dh.sum(0))
    dw2, db2, dw1, db1 = (gr.to(w.dtype) for gr, w in zip(grads, (w2, b2, w1, b1)))
    dres = torch.empty_like(dy).copy_(g) if y is not None else x.new_empty(0)
    return torch.empty_like(x).copy_(dx), dw1, db1, dw2, db2, dres


# ----------------------------------------------------------------------------------------------------
# The op: fasttrain::se_gate (+ its backward op), registered for torch.compile
# ----------------------------------------------------------------------------------------------------
def _check(x, w1, b1, w2, b2, residual):
    torch._check(x.dim() == 4, lambda: f"se_gate: x must be [N, C, H, W], got {tuple(x.shape)}")
    C, CR = x.shape[1], w1.shape[0]
    torch._check(w1.shape == (CR, C) and w2.shape == (C, CR),
                 lambda: f"se_gate: w1 {tuple(w1.shape)} / w2 {tuple(w2.shape)} do not fit C={C}")
    torch._check(b1.shape == (CR,) and b2.shape == (C,), lambda: "se_gate: bias shapes do not fit")
    if residual is not None:
        torch._check(residual.shape == x.shape, lambda: "se_gate: residual must have x's shape")


@torch.library.custom_op("fasttrain::se_gate", mutates_args=())
def _se_gate_op(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
    residual: Optional[torch.Tensor],
) -> torch.Tensor:
    _check(x, w1, b1, w2, b2, residual)
    if use_triton(x):
        return _se_gate_triton(x, w1, b1, w2, b2, residual)
    return torch.empty_like(x).copy_(se_gate_reference(x, w1, b1, w2, b2, residual))


@_se_gate_op.register_fake
def _(x, w1, b1, w2, b2, residual):
    _check(x, w1, b1, w2, b2, residual)
    return torch.empty_like(x)


@torch.library.custom_op("fasttrain::se_gate_backward", mutates_args=())
def _se_gate_backward_op(
    dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
    b2: torch.Tensor, y: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw1, db1, dw2, db2, dresidual); ``y`` is the forward output when the residual is fused
    (its sign is the ReLU mask), None otherwise, and then dresidual is an empty placeholder."""
    if use_triton(x):
        return _se_gate_backward_triton(dy, x, w1, b1, w2, b2, y)
    return _se_gate_backward_reference(dy, x, w1, b1, w2, b2, y)


@_se_gate_backward_op.register_fake
def _(dy, x, w1, b1, w2, b2, y):
    dres = torch.empty_like(dy) if y is not None else x.new_empty(0)
    # both real paths return contiguous weight gradients, whatever the weights' strides
    return torch.empty_like(x), *(t.new_empty(t.shape) for t in (w1, b1, w2, b2)), dres


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual = inputs
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, w1, b1, w2, b2, output if ctx.has_residual else None)


def _backward(ctx, dy):
    x, w1, b1, w2, b2, y = ctx.saved_tensors
    dx, dw1, db1, dw2, db2, dres = _se_gate_backward_op(dy, x, w1, b1, w2, b2, y)
    return dx, dw1, db1, dw2, db2, (dres if ctx.has_residual else None)


_se_gate_op.register_autograd(_backward, setup_context=_setup_context)


def se_gate(x, w1, b1, w2, b2, residual=None):
    """Fused SE gate ``x * s`` (or ``relu(x * s + residual)``) with ``s = sigmoid(w2 relu(w1 m + b1) + b2)``.

    x: [N, C, H, W] (NCHW or channels_last; fp32/fp16/bf16); w1: [Cr, C] or the 1x1 conv weight
    [Cr, C, 1, 1]; b1: [Cr]; w2: [C, Cr] or [C, Cr, 1, 1]; b2: [C]; residual: None or like x.
    Returns x's dtype and memory format. Differentiable in every tensor argument.
    """
    return _se_gate_op(x, _as_matrix(w1), b1, _as_matrix(w2), b2, residual)
