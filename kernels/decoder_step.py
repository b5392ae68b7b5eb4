"""Fused pieces of a decoder layer for the engine's backbone step, each next to its torch reference.

Eager PyTorch spends ~35 small kernels per layer on the glue between the matrix products
(RMSNorm alone is six, rotary embedding ten, the cache write two), about a third of a one-image
decode step on an H200. Here each piece is one kernel:
- add_rms_norm: the residual add and the next RMSNorm (after a split stream_linear, the sum of its K slices too),
- rope_write_kv: rotary embedding of q and k, k and v stored in the paged cache (after a split q/k/v
  stream_linear, the sum of its K slices too),
- silu_mul: the MLP's SiLU(gate) * up,
- stream_linear: a few rows' projection as a Triton weight stream that launches as a dependent, so
  it starts while the kernel before it finishes (cuBLAS launches cannot); stream_linear_silu_mul:
  the MLP's gate/up product with silu_mul in its epilogue.
Each rounds to the model's dtype where the eager code does, so the residual add, the rotary
embedding and the cache write are bit-identical to it; the norm and SiLU may differ in the last
bit (reduction order, exp). The references are the model's own modules and functions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.dispatch import runs_triton, supports_pdl
from model.rope import apply_rotary

try:
    import triton
    import triton.language as tl

    from kernels.dispatch import await_predecessor, prefetch_l2
except ImportError:  # the references still work without triton
    triton = None

# launch the kernels as programmatic dependents of the previous kernel (Hopper), see dispatch.py
PDL = True
# products of at most this many rows take stream_linear, cuBLAS above (0: always); the rows are padded
# to 16 (32) anyway. H100, decode step at 32 sequences 11.52-11.55 vs 11.92 ms with cuBLAS, none at
# 64: backbone_nofold_h100_s21.json, backbone_split_h100_s21.json
STREAM_LINEAR_MAX_ROWS = 32
STREAM_LINEAR_TILE = (64, 128, 4, 4)  # weight rows per program, K per iteration, warps, stages
# split K until a product has about this many programs per SM (0: never split): a 5120-wide output
# is only 80 weight blocks, too few programs to keep enough bytes in flight. The last slice to finish
# sums the slices' fp32 partials in slice order, so results do not depend on which finishes first.
# H100 decode step, 2 sequences: 9.71 vs 9.78 ms (9.97 vs 10.11 on another); 32: 11.67 vs 11.53, so
# only up to STREAM_LINEAR_SPLIT_MAX_ROWS rows.
STREAM_LINEAR_PROGRAMS_PER_SM = 2
STREAM_LINEAR_SPLIT_MAX_ROWS = 16
STREAM_LINEAR_MIN_SLICE = 4  # K tiles per slice at least
# split products of at most this many rows leave their fp32 partials to the kernel that consumes them
# (add_rms_norm after o and down, rope_write_kv after q/k/v), which waits for the whole product anyway, instead
# of the last slice summing them after an arrival atomic (0: never). H100 decode step at 800 positions, ms: 2
# sequences 9.58-9.60 vs 9.65-9.68, 4: 9.79 vs 9.83-9.87; 8: 10.22 vs 10.15-10.17, 16: 10.90-10.91 vs 10.80-10.83
# (there the consumer's one program per row sums what many product programs would): backbone_split_sums*_h100_s24
STREAM_LINEAR_SUM_IN_CONSUMER_MAX_ROWS = 4
# the MLP's SiLU(gate) * up in the epilogue of the gate/up stream product (a block streams half gate,
# half the matching up rows, as many programs as the plain product): one dependent launch fewer per
# layer. H100 decode step, 16 sequences: 10.65-10.69 vs 10.70 ms; 2: within noise (9.72-9.76 vs 9.74)
STREAM_LINEAR_SILU = True
# bytes of each weight row a program asks into L2 before its dependent-launch wait (0: none, else a
# power of two from 128), so its first tiles are on their way while the kernel before it finishes.
# H100 decode step, 2 sequences: 9.81-9.82 ms vs 9.93-9.96 without (256 B: 9.82-9.85, 1 KB: 9.91,
# 2 KB: 10.18); 16 sequences: 10.72-10.73 vs 10.87-10.90 (backbone_prefetch_h100_s22.json)
STREAM_LINEAR_PREFETCH = 512

# ---------------------------------------------------------------------------------------------
# torch references


def add_rms_norm_reference(x, delta, norm):
    """x (+ delta): [T, hidden]; norm: the model's RMSNorm -> (new residual stream, its norm)."""
    if delta is not None:
        x = x + delta
    return x, norm(x)


def rope_write_kv_reference(q, k, v, cos, sin, k_cache, v_cache, slots):
    """q: [T, H, d]; k, v: [T, KV, d]; cos, sin: [T, d] -> rotated q [T, H, d]; rotated k and v
    stored at slots (int64 [T]) of the caches [num_blocks, block_size, KV, d]."""
    q = apply_rotary(q.transpose(0, 1)[None], cos[None], sin[None])[0].transpose(0, 1)
    k = apply_rotary(k.transpose(0, 1)[None], cos[None], sin[None])[0].transpose(0, 1)
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v
    return q.contiguous()


def silu_mul_reference(gate, up):
    return F.silu(gate) * up


def stream_linear_reference(x, weight, bias=None):
    return F.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    @triton.jit
    def _round_to(v, DTYPE: tl.constexpr):
        """float32 v rounded to DTYPE (nearest, ties to even) and widened back. For bfloat16 with
        integer arithmetic: the compiler may drop a float32 -> bfloat16 -> float32 round trip
        (seen on an H200), and Triton's interpreter truncates instead of rounding."""
        if DTYPE == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return v.to(DTYPE).to(tl.float32)

    @triton.jit
    def _split_sum(
        part_ptr, offsets, bias_ptrs, mask, slice_stride,
        SLICES: tl.constexpr, HAS_BIAS: tl.constexpr, DTYPE: tl.constexpr,
    ):  # fmt: skip
        """A split product's values at offsets of part_ptr (slice 0 of its fp32 partials, slices slice_stride apart)
        as its last slice would store them: summed in slice order from zero, + bias in fp32, converted to DTYPE."""
        summed = tl.zeros(offsets.shape, dtype=tl.float32)
        for s in tl.static_range(SLICES):
            summed += tl.load(part_ptr + s * slice_stride + offsets, mask=mask, other=0.0)
        if HAS_BIAS:
            summed += tl.load(bias_ptrs, mask=mask, other=0.0).to(tl.float32)
        # the conversion the product's store makes (not _round_to): each backend matches its own old path
        return summed.to(DTYPE).to(tl.float32)

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, delta_ptr, bias_ptr, w_ptr, x_out_ptr, h_ptr, D, slice_stride, eps,
        HAS_DELTA: tl.constexpr, SLICES: tl.constexpr, DELTA_BIAS: tl.constexpr, BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        """SLICES > 1: delta_ptr holds a split product's fp32 partials (SplitPartials, slice_stride apart) and
        bias_ptr its bias (DELTA_BIAS), summed here exactly as the product's last slice would sum them."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        await_predecessor(PDL)
        x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
        x32 = x.to(tl.float32)
        if HAS_DELTA:
            if SLICES > 1:
                delta = _split_sum(
                    delta_ptr, row * D + cols, bias_ptr + cols, mask, slice_stride, SLICES, DELTA_BIAS, x.dtype
                )
            else:
                delta = tl.load(delta_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            x32 = _round_to(x32 + delta, x.dtype)  # rounded to the model's dtype, like x + delta
            tl.store(x_out_ptr + row * D + cols, x32.to(x.dtype), mask=mask)
        normed = _round_to(x32 / tl.sqrt(tl.sum(x32 * x32, axis=0) / D + eps), x.dtype)
        h = _round_to(w * normed, x.dtype)
        tl.store(h_ptr + row * D + cols, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_write_kv_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
        stride_q, stride_k, stride_v, stride_cos, slice_stride, H: tl.constexpr, KV: tl.constexpr, DIM: tl.constexpr,
        SLICES: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """SLICES > 1: q, k and v are a joined q/k/v product's fp32 partials (SplitPartials, slice_stride apart)
        and bias_ptr its joined bias (HAS_BIAS), summed here exactly as the product's last slice would sum them."""
        await_predecessor(PDL)
        t = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        i = tl.arange(0, DIM)
        partner = (i + DIM // 2) % DIM  # rotate_half: [-x2, x1]
        dtype = q_out_ptr.dtype.element_ty
        full = i < DIM  # _split_sum's mask: a head spans DIM
        cos = tl.load(cos_ptr + t * stride_cos + i).to(tl.float32)
        sin = tl.load(sin_ptr + t * stride_cos + i).to(tl.float32)
        if head < H:
            src = q_ptr + t * stride_q + head * DIM
            dst = q_out_ptr + (t * H + head) * DIM
        else:
            slot = tl.load(slots_ptr + t)
            src = k_ptr + t * stride_k + (head - H) * DIM
            dst = k_cache_ptr + (slot * KV + head - H) * DIM
            v_src = v_ptr + t * stride_v + (head - H) * DIM
            if SLICES > 1:  # v's heads follow q's and k's in the joined bias
                v = _split_sum(v_src, i, bias_ptr + (head + KV) * DIM + i, full, slice_stride, SLICES, HAS_BIAS, dtype)
            else:
                v = tl.load(v_src + i)
            tl.store(v_cache_ptr + (slot * KV + head - H) * DIM + i, v)
        if SLICES > 1:
            bias = bias_ptr + head * DIM  # k's heads follow q's: a q or k head's bias starts at head * DIM
            x = _split_sum(src, i, bias + i, full, slice_stride, SLICES, HAS_BIAS, dtype)
            rotated = _split_sum(src, partner, bias + partner, full, slice_stride, SLICES, HAS_BIAS, dtype)
        else:
            x = tl.load(src + i).to(tl.float32)
            rotated = tl.load(src + partner).to(tl.float32)
        rotated = tl.where(i < DIM // 2, -rotated, rotated)
        # x * cos + rotate_half(x) * sin with each product rounded, as eager PyTorch computes it
        out = _round_to(x * cos, dtype) + _round_to(rotated * sin, dtype)
        tl.store(dst + i, _round_to(out, dtype).to(dtype))

    @triton.jit
    def _silu_times(g, u, DTYPE: tl.constexpr):
        """SiLU(g) * u for float32 g and u holding DTYPE values, each step rounded to DTYPE as the eager
        module rounds it (silu_mul and the gate/up stream product's epilogue share it)."""
        silu = _round_to(g / (1.0 + tl.exp(-g)), DTYPE)
        return _round_to(silu * u, DTYPE)

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, N, stride_g, stride_u, BLOCK: tl.constexpr, PDL: tl.constexpr):
        await_predecessor(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0)
        u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0)
        out = _silu_times(g.to(tl.float32), u.to(tl.float32), g.dtype)
        tl.store(out_ptr + row * N + cols, out.to(g.dtype), mask=mask)


    @triton.jit
    def _stream_linear_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, count_ptr, M, N, K, K_SLICE, stride_xm, stride_wn, stride_om,
        HAS_BIAS: tl.constexpr, GLU: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, LEAVE_PARTIALS: tl.constexpr, PREFETCH_LINES: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        """out[:M, n-block] = x @ w[n-block].T (+ bias): the weight block is the dot's left operand and
        the rows, padded to ROWS >= 16 with zeros, its right one, so the tensor cores take any M.
        With SPLIT > 1, program (n, s) takes K slice s and the last slice of a block to arrive sums all
        slices' partials (fp32, [SPLIT, ROWS, weight rows] at part_ptr) in slice order, then rearms its
        counter; with LEAVE_PARTIALS each slice only stores its partial (the consumer sums them). GLU: w
        holds 2N rows, gate then up; a block is BLOCK_N // 2 gate rows and the matching up rows, streamed
        as one tile, and out = SiLU(gate) * up rounded as silu_mul rounds it."""
        pid_n = tl.program_id(0)
        i = tl.arange(0, BLOCK_N)
        if GLU:
            rn = pid_n * (BLOCK_N // 2) + i % (BLOCK_N // 2)  # the output column of each weight row
            rw = rn + (i // (BLOCK_N // 2)) * N  # its weight row: gate rows, then the matching up rows
            weight_rows = 2 * N
        else:
            rn = pid_n * BLOCK_N + i
            rw = rn
            weight_rows = N
        rm = tl.arange(0, ROWS)
        rk = tl.arange(0, BLOCK_K)
        w_ok = rn < N
        row_ok = rm[None, :] < M
        k_start = tl.program_id(1) * K_SLICE
        k_end = tl.minimum(k_start + K_SLICE, K)
        if PREFETCH_LINES > 0:  # weights do not depend on the previous kernel: ask L2 for the first lines now
            line = k_start + tl.arange(0, PREFETCH_LINES) * 64  # 128-byte lines of 16-bit weights
            prefetch_l2(w_ptr + tl.where(w_ok, rw, 0)[:, None] * stride_wn + tl.minimum(line, K - 1)[None, :])
        await_predecessor(PDL)
        acc = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            kk = k + rk
            w_mask = w_ok[:, None] & (kk[None, :] < k_end)
            w = tl.load(w_ptr + rw[:, None] * stride_wn + kk[None, :], mask=w_mask, other=0.0)
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + kk[:, None], mask=row_ok & (kk[:, None] < k_end), other=0.0)
            acc = tl.dot(w, xt.to(w.dtype), acc)
        if SPLIT > 1:
            parts = part_ptr + rm[None, :] * weight_rows + rw[:, None]
            part_stride = ROWS * weight_rows
            tl.store(parts + tl.program_id(1) * part_stride, acc, mask=w_ok[:, None] & row_ok)
            if LEAVE_PARTIALS:  # the consumer sums them (SplitPartials)
                return
            # acq_rel: this slice's partial is visible before it counts, the others' before the last reads
            arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
            # broadcast before the &: the interpreter turns a bool tensor & a scalar bool into ints
            row_ok = row_ok & (rm[None, :] * 0 + arrived == SPLIT - 1)
            acc = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                acc += tl.load(parts + s * part_stride, mask=w_ok[:, None] & row_ok, other=0.0, cache_modifier=".cg")
            tl.store(count_ptr + pid_n, 0, mask=arrived == SPLIT - 1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rw, mask=w_ok, other=0.0).to(tl.float32)[:, None]
        if GLU:
            dtype = out_ptr.dtype.element_ty
            gate, up = tl.split(tl.permute(tl.reshape(acc, [2, BLOCK_N // 2, ROWS]), (1, 2, 0)))
            acc = _silu_times(_round_to(gate, dtype), _round_to(up, dtype), dtype)
            rn = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None], out, mask=(rn < N)[:, None] & row_ok)


# ---------------------------------------------------------------------------------------------
# dispatchers: Triton on CUDA (or under TRITON_INTERPRET=1 when forced), the references otherwise


def _pdl_launch(t: torch.Tensor) -> dict:
    pdl = PDL and supports_pdl(t)
    return {"PDL": pdl, "launch_pdl": pdl}


class SplitPartials(NamedTuple):
    """A split stream_linear product left unsummed for its consumer (stream_linear's summed_by): parts fp32
    [SPLIT, ROWS, N] (rows from `rows` on unwritten), bias [N] or None, rows the product's M, dtype its output's."""

    parts: torch.Tensor
    bias: torch.Tensor | None
    rows: int
    dtype: torch.dtype

    def total(self) -> torch.Tensor:
        """The product [rows, N] exactly as the split kernel's last slice stores it: the slices summed in
        slice order in fp32, the bias added in fp32, then rounded to dtype."""
        parts = self.parts[:, : self.rows]
        acc = torch.zeros_like(parts[0])
        for part in parts:
            acc += part
        if self.bias is not None:
            acc += self.bias.float()
        return acc.to(self.dtype)


def add_rms_norm(x, delta, norm, use_triton=None):
    """See add_rms_norm_reference; x, delta contiguous [T, hidden]. delta may be a split product's
    SplitPartials (stream_linear(..., summed_by="add_rms_norm")): summed here, as the product would have."""
    if not runs_triton(x, use_triton):
        return add_rms_norm_reference(x, delta.total() if isinstance(delta, SplitPartials) else delta, norm)
    rows, d = x.shape
    h = torch.empty_like(x)
    x_out = torch.empty_like(x) if delta is not None else x
    if isinstance(delta, SplitPartials):  # delta_ptr reads the partials instead of a delta
        values, bias, slices = delta.parts, delta.bias, delta.parts.shape[0]
    else:
        values, bias, slices = delta if delta is not None else x, None, 0
    _add_rms_norm_kernel[(rows,)](
        x, values, bias if bias is not None else x, norm.weight, x_out, h, d, values.stride(0), norm.eps,
        HAS_DELTA=delta is not None, SLICES=slices, DELTA_BIAS=bias is not None, BLOCK=triton.next_power_of_2(d),
        num_warps=8, **_pdl_launch(x),
    )  # fmt: skip
    return x_out, h


def rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, use_triton=None):
    """See rope_write_kv_reference; q, k, v may be row-strided views (the head dims contiguous)."""
    tokens, heads, dim = q.shape
    if not runs_triton(q, use_triton) or dim & (dim - 1):  # the kernel spans a power-of-two head
        return rope_write_kv_reference(q, k, v, cos, sin, k_cache, v_cache, slots)
    kv_heads = k.shape[1]
    q_out = torch.empty(tokens, heads, dim, device=q.device, dtype=q.dtype)
    _rope_write_kv_kernel[(tokens, heads + kv_heads)](
        q, k, v, q, cos, sin, q_out, k_cache, v_cache, slots, q.stride(0), k.stride(0), v.stride(0), cos.stride(0), 0,
        H=heads, KV=kv_heads, DIM=dim, SLICES=0, HAS_BIAS=False, **_pdl_launch(q),
    )  # fmt: skip
    return q_out


def rope_write_kv_joined(qkv, sizes, head_dim, cos, sin, k_cache, v_cache, slots, use_triton=None):
    """rope_write_kv of a joined q/k/v product: qkv [T, Nq + Nk + Nv] (sizes), heads of head_dim, or the
    product's SplitPartials (stream_linear(..., summed_by="rope_write_kv")), summed in the kernel as the
    product would have. -> rotated q [T, Nq / head_dim, head_dim]."""
    split = isinstance(qkv, SplitPartials)
    if split and (not runs_triton(qkv.parts, use_triton) or head_dim & (head_dim - 1)):
        qkv, split = qkv.total(), False
    if not split:
        q, k, v = (part.view(qkv.shape[0], -1, head_dim) for part in qkv.split(sizes, dim=1))
        return rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, use_triton=use_triton)
    parts, bias = qkv.parts, qkv.bias
    q, k, v = parts.split(sizes, dim=2)  # views into slice 0's rows
    heads, kv_heads = sizes[0] // head_dim, sizes[1] // head_dim
    q_out = torch.empty(qkv.rows, heads, head_dim, device=parts.device, dtype=qkv.dtype)
    _rope_write_kv_kernel[(qkv.rows, heads + kv_heads)](
        q, k, v, bias if bias is not None else parts, cos, sin, q_out, k_cache, v_cache, slots,
        parts.stride(1), parts.stride(1), parts.stride(1), cos.stride(0), parts.stride(0),
        H=heads, KV=kv_heads, DIM=head_dim, SLICES=parts.shape[0], HAS_BIAS=bias is not None, **_pdl_launch(parts),
    )  # fmt: skip
    return q_out


def silu_mul(gate, up, use_triton=None):
    if not runs_triton(gate, use_triton):
        return silu_mul_reference(gate, up)
    rows, n = gate.shape
    out = torch.empty(rows, n, device=gate.device, dtype=gate.dtype)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](
        gate, up, out, n, gate.stride(0), up.stride(0), BLOCK=block, **_pdl_launch(gate)
    )
    return out


_SPLIT_COUNTERS = 4096  # weight blocks a split product may have
_split_counters_by_device: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device) -> torch.Tensor:
    """Arrival counters of split products, zero between launches (each last slice rearms its own).
    Created by the first split product on a device, outside any graph capture (a capture would leave
    them unfilled until its first replay)."""
    if device not in _split_counters_by_device:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("run a split stream_linear once before capturing it in a CUDA graph")
        _split_counters_by_device[device] = torch.zeros(_SPLIT_COUNTERS, device=device, dtype=torch.int32)
    return _split_counters_by_device[device]


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; the interpreter counts as one."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def stream_linear_split(m: int, n: int, k: int, device: torch.device) -> int:
    """K slices for m rows and an [n, k] weight: enough to reach about STREAM_LINEAR_PROGRAMS_PER_SM
    programs per SM, each slice at least STREAM_LINEAR_MIN_SLICE K tiles."""
    block_n, block_k = STREAM_LINEAR_TILE[:2]
    blocks, k_tiles = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    if blocks > _SPLIT_COUNTERS or m > STREAM_LINEAR_SPLIT_MAX_ROWS:
        return 1
    return max(1, min(STREAM_LINEAR_PROGRAMS_PER_SM * _sm_count(device) // blocks, k_tiles // STREAM_LINEAR_MIN_SLICE))


def _streams(x, weight, use_triton) -> bool:
    """Whether stream_linear's kernel takes this product (see stream_linear)."""
    half = weight.dtype in (torch.bfloat16, torch.float16)  # float32 would take the dot's tf32 rounding
    small = weight.numel() < 2**31  # the kernel's offsets are 32-bit
    unit_k = x.stride(1) == 1 and weight.stride(1) == 1  # the kernel steps through K one element at a time
    return runs_triton(x, use_triton) and half and small and unit_k and 0 < x.shape[0] <= STREAM_LINEAR_MAX_ROWS


def _launch_stream_linear(x, weight, bias, glu: bool, leave_partials: bool = False) -> torch.Tensor | SplitPartials:
    """leave_partials: a split product returns its SplitPartials unsummed (for its consumer to sum)."""
    m, k = x.shape
    rows_w = weight.shape[0]
    n = rows_w // 2 if glu else rows_w
    block_n, block_k, warps, stages = STREAM_LINEAR_TILE
    rows = max(16, triton.next_power_of_2(m))
    k_slice = triton.cdiv(triton.cdiv(k, block_k), stream_linear_split(m, rows_w, k, x.device)) * block_k
    split = triton.cdiv(k, k_slice)  # no empty slice
    leave_partials = leave_partials and split > 1
    parts = torch.empty(split, rows, rows_w, device=x.device, dtype=torch.float32) if split > 1 else None
    if leave_partials:  # the kernel stores no output and counts no arrival: parts stands in for both
        out = counters = parts
    else:
        out = torch.empty(m, n, device=x.device, dtype=weight.dtype)
        counters = _split_counters(x.device) if split > 1 else out
        parts = out if parts is None else parts
    prefetch_lines = STREAM_LINEAR_PREFETCH // 128 if x.is_cuda else 0  # the interpreter runs no PTX
    _stream_linear_kernel[(triton.cdiv(rows_w, block_n), split)](
        x, weight, bias if bias is not None else weight, out, parts, counters, m, n, k, k_slice,
        x.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, GLU=glu, ROWS=rows,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split, LEAVE_PARTIALS=leave_partials, PREFETCH_LINES=prefetch_lines,
        num_warps=warps, num_stages=stages, **_pdl_launch(x),
    )  # fmt: skip
    return SplitPartials(parts, bias, m, weight.dtype) if leave_partials else out


def stream_linear(x, weight, bias=None, use_triton=None, summed_by=None):
    """F.linear for at most STREAM_LINEAR_MAX_ROWS rows of 16-bit floats (cuBLAS above, for float32, or
    when it is 0); x [M, K] and weight [N, K] with unit stride in K (cuBLAS otherwise).
    Split products share per-device counters: they must not run on two streams of a device at once.
    summed_by: the result's consumer, "add_rms_norm" (as its delta) or "rope_write_kv" (rope_write_kv_joined's
    qkv); then a split product of up to STREAM_LINEAR_SUM_IN_CONSUMER_MAX_ROWS rows returns its SplitPartials
    instead of [M, N] (anything else must call .total())."""
    if summed_by not in (None, "add_rms_norm", "rope_write_kv"):  # checked first: fails on every backend
        raise ValueError(f"stream_linear: unknown summed_by {summed_by!r}")
    leave_partials = summed_by is not None and x.shape[0] <= STREAM_LINEAR_SUM_IN_CONSUMER_MAX_ROWS
    if not _streams(x, weight, use_triton):
        return stream_linear_reference(x, weight, bias)
    return _launch_stream_linear(x, weight, bias, glu=False, leave_partials=leave_partials)


def stream_linear_silu_mul(x, weight, bias=None, use_triton=None):
    """silu_mul(gate, up) of the two halves of F.linear(x, weight, bias) (the MLP's joined gate and up
    products): one kernel where stream_linear takes x and STREAM_LINEAR_SILU is on, else the two."""
    if not (STREAM_LINEAR_SILU and _streams(x, weight, use_triton)) or weight.shape[0] % 2:
        gate, up = stream_linear(x, weight, bias, use_triton=use_triton).chunk(2, dim=1)
        return silu_mul(gate, up, use_triton=use_triton)
    return _launch_stream_linear(x, weight, bias, glu=True)
