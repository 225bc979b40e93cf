"""The small ops of ``engine.layers.ops`` as one Triton kernel each, for the GPU path.

Each kernel rounds to the model's dtype where the torch ops do (after the residual add, after the norm before
its weight, after the weight, after SiLU, after each RoPE product), so the two agree to float32 rounding in
the sums. A program takes a block of token rows: one row of a 4096-wide hidden state, or sixteen narrow
ones (the interpreter runs programs one after another, and a decode step has few rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

from engine.layers.ops import TorchOps

if TYPE_CHECKING:
    from engine.models.llama import Attention
    from engine.models.step_inputs import StepInputs

ROW_ELEMENTS = 4096  # elements per program: rows x (padded) width


@triton.jit
def _round(x, dtype: tl.constexpr):
    """``x`` rounded to ``dtype`` (to nearest, ties to even) and kept in float32. Bfloat16 rounds by its bits:
    Triton's interpreter truncates a float32 cast to bfloat16, where torch and the GPU round; stores of the
    rounded value are then exact everywhere."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # a NaN's low bits could carry to 0
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit(do_not_specialize=["eps", "rows"])
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    out_ptr,
    residual_out_ptr,
    weight_ptr,
    eps,
    rows,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    WIDTH: tl.constexpr,
    ADD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """out = weight * rmsnorm(x [+ residual]); with ADD, the sum goes to residual_out too."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    w = tl.arange(0, BLOCK_W)
    mask = (t < rows)[:, None] & (w < WIDTH)[None, :]
    x = tl.load(x_ptr + t[:, None] * stride_x + w[None, :], mask=mask, other=0.0).to(tl.float32)
    if ADD:
        x += tl.load(residual_ptr + t[:, None] * stride_r + w[None, :], mask=mask, other=0.0).to(tl.float32)
        x = _round(x, residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + t[:, None] * stride_ro + w[None, :], x, mask=mask)
    scale = 1.0 / tl.sqrt(tl.sum(x * x, 1) / WIDTH + eps)
    y = _round(x * scale[:, None], x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + w, mask=w < WIDTH, other=0.0).to(tl.float32)
    out = _round(weight[None, :] * y, out_ptr.dtype.element_ty)
    tl.store(out_ptr + t[:, None] * stride_o + w[None, :], out, mask=mask)


@triton.jit(do_not_specialize=["rows"])
def _silu_mul_kernel(
    x_ptr,
    out_ptr,
    rows,
    stride_x,
    stride_o,
    WIDTH: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """out = silu(gate) * up, where x = [gate | up]."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (t < rows)[:, None] & (w < WIDTH)[None, :]
    gate_ptrs = x_ptr + t[:, None] * stride_x + w[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + WIDTH, mask=mask, other=0.0).to(tl.float32)
    act = _round(gate / (1.0 + tl.exp(-gate)), x_ptr.dtype.element_ty)
    tl.store(
        out_ptr + t[:, None] * stride_o + w[None, :], _round(act * up, x_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def _norm_rope(src, d, mask, norm_ptr, cos_ptrs, sin_ptrs, eps, DIM: tl.constexpr, QK_NORM: tl.constexpr):
    """One head of q or k from the projection's output at ``src``: its RMSNorm (Qwen3), then rotate():
    x * cos + rotate_half(x) * sin, rounded to the model's dtype where those torch ops round (float32)."""
    dtype = cos_ptrs.dtype.element_ty
    first_half = d < DIM // 2
    partner = tl.where(first_half, d + DIM // 2, d - DIM // 2)
    x = tl.load(src + d[None, :], mask=mask, other=0.0).to(tl.float32)
    p = tl.load(src + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:
        scale = (1.0 / tl.sqrt(tl.sum(x * x, 1) / DIM + eps))[:, None]
        x_weight = tl.load(norm_ptr + d, mask=d < DIM, other=0.0).to(tl.float32)[None, :]
        p_weight = tl.load(norm_ptr + partner, mask=d < DIM, other=0.0).to(tl.float32)[None, :]
        x = _round(x_weight * _round(x * scale, dtype), dtype)
        p = _round(p_weight * _round(p * scale, dtype), dtype)
    cos = tl.load(cos_ptrs, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptrs, mask=mask, other=0.0).to(tl.float32)
    rotated = tl.where(first_half[None, :], -p, p)
    return _round(_round(x * cos, dtype) + _round(rotated * sin, dtype), dtype)


@triton.jit(do_not_specialize=["eps", "rows"])
def _qkv_epilogue_kernel(
    qkv_ptr,
    q_out_ptr,
    k_pool_ptr,
    v_pool_ptr,
    slots_ptr,
    q_cos_ptr,
    q_sin_ptr,
    k_cos_ptr,
    k_sin_ptr,
    q_norm_ptr,
    k_norm_ptr,
    eps,
    rows,
    stride_qkv,
    stride_qt,
    stride_qh,
    stride_ps,
    stride_ph,
    stride_cos,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    DIM: tl.constexpr,
    QK_NORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """One head of a block of tokens: a query head (norm, RoPE, to q_out), a key head (norm, RoPE, to its
    pool slot) or a value head (to its pool slot)."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_W)
    mask = (t < rows)[:, None] & (d < DIM)[None, :]
    src = qkv_ptr + t[:, None] * stride_qkv + head * DIM
    table = t[:, None] * stride_cos + d[None, :]
    slot = tl.load(slots_ptr + t, mask=t < rows, other=0).to(tl.int64)[:, None]
    if head < HEADS:
        y = _norm_rope(src, d, mask, q_norm_ptr, q_cos_ptr + table, q_sin_ptr + table, eps, DIM, QK_NORM)
        tl.store(q_out_ptr + t[:, None] * stride_qt + head * stride_qh + d[None, :], y, mask=mask)
    elif head < HEADS + KV_HEADS:
        y = _norm_rope(src, d, mask, k_norm_ptr, k_cos_ptr + table, k_sin_ptr + table, eps, DIM, QK_NORM)
        k_head = (head - HEADS).to(tl.int64)  # times the head-major stride: past 2**31 in large pools
        tl.store(k_pool_ptr + slot * stride_ps + k_head * stride_ph + d[None, :], y, mask=mask)
    else:
        v = tl.load(src + d[None, :], mask=mask, other=0.0)
        v_head = (head - HEADS - KV_HEADS).to(tl.int64)
        dst = v_pool_ptr + slot * stride_ps + v_head * stride_ph + d[None, :]
        tl.store(dst, v, mask=mask)


def row_block(width: int) -> dict[str, int]:
    """A program's block of rows of ``width`` elements, and its warps."""
    block_w = triton.next_power_of_2(width)
    block_t = max(1, min(16, ROW_ELEMENTS // block_w))
    return {
        "BLOCK_T": block_t,
        "BLOCK_W": block_w,
        "num_warps": 4 if block_t * block_w <= ROW_ELEMENTS else 8,
    }


def norm_meta(width: int, add: bool) -> dict[str, Any]:
    return {"WIDTH": width, "ADD": add, **row_block(width)}


def silu_meta(width: int) -> dict[str, Any]:
    return {"WIDTH": width, **row_block(min(width, 1024))}


def qkv_meta(heads: int, kv_heads: int, head_dim: int, qk_norm: bool) -> dict[str, Any]:
    return {"HEADS": heads, "KV_HEADS": kv_heads, "DIM": head_dim, "QK_NORM": qk_norm, **row_block(head_dim)}


class TritonOps(TorchOps):
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._norm(x, None, weight, eps)[0]

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._norm(x, residual, weight, eps)

    def _norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        width = x.shape[-1]
        x2 = x.reshape(-1, width).contiguous()  # the kernels take rows of stride-1 elements
        rows = x2.shape[0]
        summed = torch.empty_like(x2) if residual is not None else x2
        r2 = residual.reshape(-1, width).contiguous() if residual is not None else x2
        out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
        meta = norm_meta(width, residual is not None)
        _rms_norm_kernel[(triton.cdiv(rows, meta["BLOCK_T"]),)](
            x2,
            r2,
            out,
            summed,
            weight,
            eps,
            rows,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            summed.stride(0),
            **meta,
        )
        return out.view(x.shape), summed.view(x.shape)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate_up = gate_up.contiguous()
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out = gate_up.new_empty(rows, width)
        meta = silu_meta(width)
        grid = (triton.cdiv(rows, meta["BLOCK_T"]), triton.cdiv(width, meta["BLOCK_W"]))
        _silu_mul_kernel[grid](gate_up, out, rows, gate_up.stride(0), out.stride(0), **meta)
        return out

    def qkv_epilogue(self, qkv: torch.Tensor, attn: Attention, layer: int, step: StepInputs) -> torch.Tensor:
        s, qkv = attn.shape, qkv.contiguous()
        rows = qkv.shape[0]
        q = qkv.new_empty(rows, s.num_heads, s.head_dim)
        k_pool, v_pool = step.k_pool[layer], step.v_pool[layer]
        assert k_pool.stride() == v_pool.stride() and step.q_cos.stride() == step.k_cos.stride()
        norms = attn.qk_norms or (qkv, qkv)  # any pointers: the kernel reads them only with QK_NORM
        meta = qkv_meta(s.num_heads, s.num_kv_heads, s.head_dim, s.qk_norm)
        grid = (triton.cdiv(rows, meta["BLOCK_T"]), s.num_heads + 2 * s.num_kv_heads)
        _qkv_epilogue_kernel[grid](
            qkv,
            q,
            k_pool,
            v_pool,
            step.write_slots,
            step.q_cos,
            step.q_sin,
            step.k_cos,
            step.k_sin,
            *norms,
            s.rms_norm_eps,
            rows,
            qkv.stride(0),
            q.stride(0),
            q.stride(1),
            k_pool.stride(0),
            k_pool.stride(1),
            step.q_cos.stride(0),
            **meta,
        )
        return q
