"""Fused flow-matching head step: Triton kernels, each next to the torch reference it is tested against.

Per sampling step the head becomes: one GEMM for every block's adaLN modulation at once (they
depend only on y = t_emb + cond_emb, never on x), then per residual block a LayerNorm+modulate
kernel and two GEMMs whose epilogues fuse bias+SiLU and bias+gate*u+residual, then the final
layer, then one kernel that combines the guidance branches, applies the sampler update and draws
the step's noise in-kernel with the same Philox counters as model.noise.token_noise. Up to
FEW_ROWS rows (one or two images) few_rows_linear does the products with each LayerNorm inside,
and unless an image rescales its guidance the update runs in the final layer's epilogue.

Shapes: rows R = slots * B (slot-major: all images' cond rows, then their uncond rows, ...),
D = head width, token_dim = 64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import runs_triton, supports_pdl

try:
    import triton
    import triton.language as tl
    from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float

    from kernels.dispatch import await_predecessor
except ImportError:  # the references still work without triton
    triton = None

# tile and pipeline of the GEMM kernel by row count (the best of bench/head_bench.py --sweep on an
# H200, bench/results/head_sweep2_h200_2026-11-29.json); LINEAR_CONFIG, when set, overrides them
TINY_M_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}
SMALL_M_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
LARGE_M_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
TINY_M = 16  # rows up to which TINY_M_CONFIG is used
LARGE_M = 256  # rows above which LARGE_M_CONFIG is used
LINEAR_CONFIG: dict = {}  # may also set BLOCK_M
# The adaLN GEMM (every block's modulation at once: 55% of the head's weights and FLOPs) has no
# epilogue to fuse, so it may run on cuBLAS instead of the Triton kernel.
MODULATION_GEMMS = ("triton", "cublas")
MODULATION_GEMM = "cublas"  # H200: 18.5 vs 21.6 ms per token at 256 rows, 24.4 vs 31.3 at 512
# From this many rows the residual blocks' products run on cuBLAS too, SiLU and the gated residual
# (with the next LayerNorm) as row kernels: more launches, but cuBLAS's larger tiles re-read the
# rows less than the Triton kernel's small ones. H200, ms per token (bench/results/
# head_residual_ln_h200_s11.json, head_cublas_threshold_h200_s11.json): 512 rows 20.2 vs 22.9,
# 256 rows 15.1 vs 16.1, 192 rows 14.3 vs 15.2; 128 rows 12.9 vs 12.5 (Triton ahead).
CUBLAS_BLOCKS_MIN_ROWS = 192

# The adaLN modulations depend on the step's time and the token's condition only, never on x, so
# they are computed for several steps in one GEMM of about this many rows (weights read once per
# chunk, not once per step); 0 computes them step by step.
MODULATION_CHUNK_ROWS = 4096
LN_EPS = 1e-6  # the head's LayerNorms
# Up to FEW_ROWS rows (a few images) a head step is a chain of ~40 dependent kernels that each
# stream a few MB of weights: FusedHead then uses few_rows_linear, with the LayerNorms inside.
# H200, ms per token, 50 steps (bench/results/head_few_rows*_s12.json): 2 rows 4.72 vs 9.53 with the
# tiled kernels, 4 rows 7.22 vs 9.59; 8 rows 16.4 vs 10.2 (the products grow with the rows).
FEW_ROWS = 4
FEW_ROWS_TILE = (8, 4)  # (weight rows per program, warps): best at 2 and 4 rows, head_few_rows_tiles_h200_s13.json
# Programmatic dependent launch (sm90+) for few_rows_linear and the update between them: a kernel is
# launched while its predecessor runs and loads its weights before waiting for the predecessor's output.
PDL = True
# warps per row of the LayerNorm kernel; H200, ms per token vs 4 warps: 512 rows 20.28 vs 20.40, 2 rows 9.40 vs 9.56
LN_NUM_WARPS = 8
# Beyond FEW_ROWS, the head's Triton kernels (products, LayerNorms, the guided update and, on the
# cuBLAS path, SiLU as a Triton kernel) as programmatic dependents too: each starts while the kernel
# before it ends, and the row kernels read all but its output before waiting. Off until timed on a
# GPU (written in session 27, no device then).
MANY_ROWS_PDL = False

EPILOGUE_BIAS = 0
EPILOGUE_BIAS_SILU = 1
EPILOGUE_GATED_RESIDUAL = 2  # out = residual + gate * (x @ W^T + b)
EPILOGUE_GUIDED_UPDATE = 3  # few_rows_final_update: the product is v, the output the sampler's next x

# ---------------------------------------------------------------------------------------------
# torch references


def linear_reference(x, weight, bias, epilogue=EPILOGUE_BIAS, gate=None, residual=None, rows=None):
    """x: [X, K]; weight: [N, K]; bias: [N]; gate, residual: [M, N] (strided views allowed) -> [M, N].

    rows: M when it exceeds X (output row r reads input row r % X: x repeated without a copy).
    """
    if rows is not None:
        x = x[torch.arange(rows, device=x.device) % x.shape[0]]
    x = x.to(weight.dtype)  # float32 input rounds to the weights' dtype first, as a cast would
    out = (x.float() @ weight.float().t() + bias.float())
    if epilogue == EPILOGUE_BIAS_SILU:
        out = F.silu(out)
    elif epilogue == EPILOGUE_GATED_RESIDUAL:
        out = residual.float() + gate.float() * out
    return out.to(weight.dtype)


def few_rows_linear_reference(x, weight, bias, epilogue=EPILOGUE_BIAS, gate=None, residual=None, rows=None, norm=None):
    """linear_reference of x, or of ln_modulate_reference(x, *norm) when norm = (shift, scale,
    LayerNorm weight or None, LayerNorm bias or None) is given."""
    if norm is not None:
        x = ln_modulate_reference(x, *norm)
    return linear_reference(x, weight, bias, epilogue, gate, residual, rows)


def ln_modulate_reference(h, shift, scale, weight=None, bias=None, eps=LN_EPS):
    """LayerNorm(h) (affine when weight is given) * (1 + scale) + shift. h, shift, scale: [M, D] -> [M, D]."""
    normed = F.layer_norm(h.float(), h.shape[-1:], None if weight is None else weight.float(),
                          None if bias is None else bias.float(), eps)
    return (normed * (1 + scale.float()) + shift.float()).to(h.dtype)


def residual_ln_modulate_reference(h, gate, y, shift, scale, weight=None, bias=None, eps=LN_EPS):
    """(h + gate * y, in h's dtype) and ln_modulate_reference of it. h, gate, y: [M, D]."""
    h = (h.float() + gate.float() * y.float()).to(h.dtype)
    return h, ln_modulate_reference(h, shift, scale, weight, bias, eps)


def guided_update_reference(v, x, cfg, cfg_img, rescale, noise, a, b, c):
    """Guidance combine, optional rescale and x_new = a x + b v_guided + c z, in float32.

    v: [slots, B, D] (slots 2: cond, uncond; 3: cond, uncond_image, uncond_none); x, noise: [B, D];
    cfg, cfg_img: [B]; rescale: bool [B]; a, b, c: floats. Returns [B, D] float32.
    """
    v = v.float()
    if v.shape[0] == 2:
        guided = v[1] + cfg[:, None] * (v[0] - v[1])
    else:
        guided = v[2] + cfg_img[:, None] * (v[1] - v[2]) + cfg[:, None] * (v[0] - v[1])
    ratio = v[0].norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + 1e-6)
    guided = guided * torch.where(rescale[:, None], ratio.clamp(max=1.0), torch.ones_like(ratio))
    return a * x.float() + b * guided + c * noise.float()


# ---------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    @triton.jit
    def _linear_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, gate_ptr, res_ptr,
        M, N, K, X_ROWS, stride_xm, stride_wn, stride_om, stride_gm, stride_rm,
        EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        await_predecessor(PDL)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        row_ok = rm < M
        x_rows = x_ptr + (rm % X_ROWS)[:, None] * stride_xm  # output row r reads input row r % X_ROWS
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            xmask = row_ok[:, None] & (kk[None, :] < K)
            xt = tl.load(x_rows + kk[None, :], mask=xmask, other=0.0).to(w_ptr.dtype.element_ty)
            wt = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
            acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        mask = row_ok[:, None] & (rn[None, :] < N)
        if EPILOGUE == 1:
            acc = _silu(acc)
        if EPILOGUE == 2:
            gate = tl.load(gate_ptr + rm[:, None] * stride_gm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
            res = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
            acc = res + gate * acc
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu(x):
        return x / (1.0 + tl.exp(-x))

    @triton.jit
    def _normalize(x, mask, D, eps, AXIS: tl.constexpr):
        """x's rows (along AXIS; D valid entries where mask) to zero mean and unit variance."""
        centered = tl.where(mask, x - tl.sum(x, axis=AXIS, keep_dims=True) / D, 0.0)
        return centered / tl.sqrt(tl.sum(centered * centered, axis=AXIS, keep_dims=True) / D + eps)

    @triton.jit
    def _few_rows_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, gate_ptr, res_ptr, shift_ptr, scale_ptr, ln_w_ptr, ln_b_ptr,
        M, N, K, X_ROWS, stride_xm, stride_wn, stride_om, stride_gm, stride_rm, stride_mod, eps,
        sample_ptr, cfg_ptr, cfg_img_ptr, seed_ptr, image_ptr, token_ptr, step, a, b, c,
        EPILOGUE: tl.constexpr, NORM: tl.constexpr, AFFINE: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, SLOTS: tl.constexpr, IMAGES: tl.constexpr,
    ):  # fmt: skip
        """few_rows_linear: a program holds BLOCK_N whole weight rows (K <= BLOCK_K) and multiplies
        every input row (M <= ROWS) by them at once, normalizing the rows first when NORM.

        EPILOGUE_GUIDED_UPDATE: the rows are SLOTS guidance branches of M / SLOTS images (at most
        IMAGES) and the product their velocity v; each program then applies guided_update to its
        columns of the images' samples (sample_ptr, [images, N] float32) and writes those to out."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        k_ok = rk < K
        # the weights never depend on earlier kernels: requested before waiting for them
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if AFFINE:
            ln_w = tl.load(ln_w_ptr + rk, mask=k_ok, other=1.0).to(tl.float32)
            ln_b = tl.load(ln_b_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
        rm = tl.arange(0, ROWS)
        row_mask = (rm[:, None] < M) & k_ok[None, :]
        out_mask = (rm[:, None] < M) & n_ok[None, :]
        if EPILOGUE == 3:  # the samples and the step's noise ahead of the wait, as in _guided_update_kernel
            images = M // SLOTS
            im = tl.arange(0, IMAGES)
            sample_mask = (im[:, None] < images) & n_ok[None, :]
            sample = tl.load(sample_ptr + im[:, None] * N + rn[None, :], sample_mask, 0.0, cache_modifier=".cg")
            z = _token_noise_columns(seed_ptr, image_ptr, token_ptr, im, images, rn, step)
            cfg = tl.load(cfg_ptr + im, mask=im < images, other=0.0)[:, None]
            cfg_img = tl.load(cfg_img_ptr + im, mask=im < images, other=0.0)[:, None]
        await_predecessor(PDL)
        x = tl.load(x_ptr + (rm % X_ROWS)[:, None] * stride_xm + rk[None, :], mask=row_mask, other=0.0)
        x = x.to(tl.float32)
        if EPILOGUE == 2:  # requested with x, not after the reduction
            gate = tl.load(gate_ptr + rm[:, None] * stride_gm + rn[None, :], mask=out_mask, other=0.0)
            res = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=out_mask, other=0.0)
        if NORM:  # LayerNorm (affine when AFFINE) and adaLN modulate, as ln_modulate
            shift = tl.load(shift_ptr + rm[:, None] * stride_mod + rk[None, :], mask=row_mask, other=0.0)
            scale = tl.load(scale_ptr + rm[:, None] * stride_mod + rk[None, :], mask=row_mask, other=0.0)
            x = _normalize(x, row_mask, K, eps, AXIS=1)
            if AFFINE:
                x = x * ln_w[None, :] + ln_b[None, :]
            x = x * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
        x = x.to(w_ptr.dtype.element_ty).to(tl.float32)  # rounded as the unfused kernels store it
        acc = tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2) + bias[None, :]
        if EPILOGUE == 1:
            acc = _silu(acc)
        if EPILOGUE == 2:
            acc = res.to(tl.float32) + gate.to(tl.float32) * acc
        if EPILOGUE == 3:
            v = acc.to(w_ptr.dtype.element_ty).to(tl.float32)  # v as the unfused path stores it
            cond = _rows_of(v, rm, im)
            u1 = _rows_of(v, rm, im + images)
            if SLOTS == 2:
                guided = u1 + cfg * (cond - u1)
            else:
                u2 = _rows_of(v, rm, im + 2 * images)
                guided = u2 + cfg_img * (u1 - u2) + cfg * (cond - u1)
            tl.store(out_ptr + im[:, None] * N + rn[None, :], a * sample + b * guided + c * z, mask=sample_mask)
        else:
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _rows_of(v, rm, rows):
        """v's rows `rows` ([R] indices into v's [ROWS, C] rows rm) as an [R, C] tensor."""
        return tl.sum(tl.where(rm[None, :, None] == rows[:, None, None], v[None, :, :], 0.0), axis=1)

    @triton.jit
    def _token_noise_columns(seed_ptr, image_ptr, token_ptr, im, images, cols, step):
        """model.noise.token_noise of images im (< images) at step, columns cols: [len(im), len(cols)].
        Column 4j + m is normal m of philox counter j, as model.noise.philox_normal4 lays them out."""
        ok = im < images
        zero = ((im[:, None] + cols[None, :]) * 0).to(tl.uint32)  # broadcasts every counter to the tile
        seed = tl.load(seed_ptr + im, mask=ok, other=0)[:, None] + zero.to(tl.int64)
        token = (tl.load(token_ptr + im, mask=ok, other=0) & 0xFFFFFFFF).to(tl.uint32)[:, None] + zero
        image = (tl.load(image_ptr + im, mask=ok, other=0) & 0xFFFFFFFF).to(tl.uint32)[:, None] + zero
        counter = (cols // 4).to(tl.uint32)[None, :] + zero
        i0, i1, i2, i3 = tl.philox(seed, counter, token, (zero.to(tl.int32) + step).to(tl.uint32), image)
        n0, n1 = pair_uniform_to_normal(uint_to_uniform_float(i0), uint_to_uniform_float(i1))
        n2, n3 = pair_uniform_to_normal(uint_to_uniform_float(i2), uint_to_uniform_float(i3))
        m = (cols % 4)[None, :]
        return tl.where(m == 0, n0, tl.where(m == 1, n1, tl.where(m == 2, n2, n3)))

    @triton.jit
    def _ln_modulate_kernel(
        h_ptr, gate_ptr, y_ptr, h_out_ptr, shift_ptr, scale_ptr, w_ptr, b_ptr, out_ptr, D, stride_h, stride_g,
        stride_y, stride_mod, stride_o, eps,
        AFFINE: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """ln_modulate, or residual_ln_modulate with RESIDUAL. Only the input the previous kernel may
        write (h, or y with RESIDUAL) is read after the dependent-launch wait, the rest before it (from
        L2, .cg: L1 may hold stale lines until the wait)."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        shift = tl.load(shift_ptr + row * stride_mod + cols, mask=mask, other=0.0, cache_modifier=".cg")
        scale = tl.load(scale_ptr + row * stride_mod + cols, mask=mask, other=0.0, cache_modifier=".cg")
        if AFFINE:
            ln_w = tl.load(w_ptr + cols, mask=mask, other=1.0).to(tl.float32)
            ln_b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            gate = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0, cache_modifier=".cg")
        await_predecessor(PDL)
        if RESIDUAL:  # h + gate * y first, rounded as it is stored (the LayerNorm sees the stored value)
            y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
            h = (h + gate.to(tl.float32) * y).to(h_out_ptr.dtype.element_ty)
            tl.store(h_out_ptr + row * D + cols, h, mask=mask)
            h = h.to(tl.float32)
        else:
            h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        normed = _normalize(h, mask, D, eps, AXIS=0)
        if AFFINE:
            normed = normed * ln_w + ln_b
        out = normed * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_kernel(x_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """x = SiLU(x) in place, x flat with n entries."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        await_predecessor(PDL)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + offs, _silu(x).to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _guided_update_kernel(
        v_ptr, x_ptr, out_ptr, cfg_ptr, cfg_img_ptr, rescale_ptr, seed_ptr, image_ptr, token_ptr,
        B, step, a, b, c,
        SLOTS: tl.constexpr, HAS_V: tl.constexpr, DIM: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, DIM)
        offs = cols[None, :]  # the row as a [1, DIM] tile
        z = _token_noise_columns(seed_ptr, image_ptr, token_ptr, row + tl.arange(0, 1), B, cols, step)
        if HAS_V:
            # All but v comes from earlier launches (x: the previous update; complete before this one
            # launched, see await_predecessor) and is read before the wait, while the noise is drawn:
            # off the chain of dependent launches. x from L2 (.cg): L1 may hold stale lines until the wait.
            x = tl.load(x_ptr + row * DIM + offs, cache_modifier=".cg")
            cfg = tl.load(cfg_ptr + row)
            cfg_img = tl.load(cfg_img_ptr + row)
            rescale = tl.load(rescale_ptr + row)
        await_predecessor(PDL)
        if HAS_V:
            cond = tl.load(v_ptr + row * DIM + offs).to(tl.float32)
            u1 = tl.load(v_ptr + (B + row) * DIM + offs).to(tl.float32)
            if SLOTS == 2:
                guided = u1 + cfg * (cond - u1)
            else:
                u2 = tl.load(v_ptr + (2 * B + row) * DIM + offs).to(tl.float32)
                guided = u2 + cfg_img * (u1 - u2) + cfg * (cond - u1)
            if rescale != 0:
                cond_norm = tl.sqrt(tl.sum(tl.sum(cond * cond, axis=1), axis=0))
                guided_norm = tl.sqrt(tl.sum(tl.sum(guided * guided, axis=1), axis=0))
                guided = guided * tl.minimum(cond_norm / (guided_norm + 1e-6), 1.0)
            new = a * x + b * guided + c * z
        else:
            new = c * z
        tl.store(out_ptr + row * DIM + offs, new)


# ---------------------------------------------------------------------------------------------
# dispatchers: Triton on CUDA (or under TRITON_INTERPRET=1 when forced), the references otherwise


def _pdl(t: torch.Tensor) -> bool:
    return PDL and supports_pdl(t)


def _many_rows_pdl(t: torch.Tensor) -> bool:
    return MANY_ROWS_PDL and supports_pdl(t)


def _few_rows(rows: int) -> bool:
    """Whether FusedHead evaluates this many rows with few_rows_linear (guided_update, launched
    between those kernels, then launches as their dependent too)."""
    return rows <= FEW_ROWS


def linear(x, weight, bias, epilogue=EPILOGUE_BIAS, gate=None, residual=None, rows=None, use_triton=None):
    """See linear_reference; x, weight row-major with unit stride in the last dim."""
    if not runs_triton(x, use_triton):
        return linear_reference(x, weight, bias, epilogue, gate, residual, rows)
    x_rows, k = x.shape
    m = rows or x_rows
    n = weight.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=weight.dtype)
    gate_t = gate if gate is not None else out
    res_t = residual if residual is not None else out
    precision = "ieee" if weight.dtype == torch.float32 else "tf32"  # float32 stays float32 (no tf32 rounding)
    config = LINEAR_CONFIG or (TINY_M_CONFIG if m <= TINY_M else SMALL_M_CONFIG if m <= LARGE_M else LARGE_M_CONFIG)
    block_m = config.get("BLOCK_M") or (64 if m > 32 else (32 if m > 16 else 16))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, config["BLOCK_N"]))
    pdl = _many_rows_pdl(x)
    _linear_kernel[grid](
        x, weight, bias, out, gate_t, res_t, m, n, k, x_rows,
        x.stride(0), weight.stride(0), out.stride(0), gate_t.stride(0), res_t.stride(0),
        EPILOGUE=epilogue, BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        PRECISION=precision, PDL=pdl, num_warps=config["num_warps"], num_stages=config["num_stages"], launch_pdl=pdl,
    )  # fmt: skip
    return out


def few_rows_linear(x, weight, bias, epilogue=EPILOGUE_BIAS, gate=None, residual=None, rows=None, norm=None,
                    use_triton=None):
    """See few_rows_linear_reference; for at most FEW_ROWS rows (weights streamed once, no tensor
    cores). The LayerNorm of norm runs inside, so a residual block is two kernels, not three."""
    if not runs_triton(x, use_triton):
        return few_rows_linear_reference(x, weight, bias, epilogue, gate, residual, rows, norm)
    m = rows or x.shape[0]
    if m > FEW_ROWS:
        raise ValueError(f"few_rows_linear takes at most {FEW_ROWS} rows, got {m}")
    out = torch.empty(m, weight.shape[0], device=x.device, dtype=weight.dtype)
    gate_t = gate if gate is not None else out
    res_t = residual if residual is not None else out
    _launch_few_rows(x, weight, bias, out, epilogue, gate_t, res_t, m, norm, None)
    return out


def few_rows_final_update(h, weight, bias, norm, x, slots, cfg, cfg_img, seed, image, token, step, a, b, c,
                          use_triton=None):  # fmt: skip
    """guided_update(few_rows_linear(h, weight, bias, norm=norm).view(slots, B, -1), x, ..., rescale
    off) with the update in the product's epilogue: one launch fewer per sampling step. h: [slots *
    B, K] (at most FEW_ROWS rows); x: [B, token_dim] float32; the rest as guided_update."""
    if not runs_triton(x, use_triton):
        v = few_rows_linear(h, weight, bias, norm=norm, use_triton=False).view(slots, x.shape[0], -1)
        no_rescale = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return guided_update(v, x, cfg, cfg_img, no_rescale, seed, image, token, step, a, b, c, use_triton=False)
    if h.shape[0] > FEW_ROWS or h.shape[0] != slots * x.shape[0]:
        raise ValueError(f"few_rows_final_update takes {slots} x {x.shape[0]} <= {FEW_ROWS} rows, got {h.shape[0]}")
    out = torch.empty_like(x)
    update = (x, cfg, cfg_img, seed, image, token, step, a, b, c, slots)
    _launch_few_rows(h, weight, bias, out, EPILOGUE_GUIDED_UPDATE, out, out, h.shape[0], norm, update)
    return out


def _launch_few_rows(x, weight, bias, out, epilogue, gate, res, m, norm, update):
    x_rows, k = x.shape
    n = weight.shape[0]
    shift, scale, ln_weight, ln_bias = norm if norm is not None else (out, out, None, None)
    affine = ln_weight is not None
    no_update = (out,) * 6 + (0, 0.0, 0.0, 0.0, 1)
    sample, cfg, cfg_img, seed, image, token, step, a, b, c, slots = update or no_update
    pdl = _pdl(x)
    block_n, warps = FEW_ROWS_TILE
    _few_rows_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias, out, gate, res, shift, scale, ln_weight if affine else bias, ln_bias if affine else bias,
        m, n, k, x_rows, x.stride(0), weight.stride(0), out.stride(0), gate.stride(0), res.stride(0),
        shift.stride(0), LN_EPS, sample, cfg, cfg_img, seed, image, token, step, float(a), float(b), float(c),
        EPILOGUE=epilogue, NORM=norm is not None, AFFINE=affine, ROWS=triton.next_power_of_2(m),
        BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(k), PDL=pdl, SLOTS=slots,
        IMAGES=triton.next_power_of_2(max(1, m // slots)), num_warps=warps, launch_pdl=pdl,
    )  # fmt: skip


def ln_modulate(h, shift, scale, weight=None, bias=None, eps=LN_EPS, use_triton=None):
    """See ln_modulate_reference; shift and scale may be column slices of one modulation tensor.
    With MANY_ROWS_PDL only h may be the previous kernel's output (the rest is read before waiting for it)."""
    if not runs_triton(h, use_triton):
        return ln_modulate_reference(h, shift, scale, weight, bias, eps)
    return _launch_ln_modulate(h, None, None, shift, scale, weight, bias, eps)[1]


def residual_ln_modulate(h, gate, y, shift, scale, weight=None, bias=None, eps=LN_EPS, use_triton=None):
    """See residual_ln_modulate_reference: a residual block's output and the next LayerNorm in one pass.
    With MANY_ROWS_PDL only y may be the previous kernel's output (the rest is read before waiting for it)."""
    if not runs_triton(h, use_triton):
        return residual_ln_modulate_reference(h, gate, y, shift, scale, weight, bias, eps)
    return _launch_ln_modulate(h, gate, y, shift, scale, weight, bias, eps)


def _launch_ln_modulate(h, gate, y, shift, scale, weight, bias, eps):
    rows, d = h.shape
    out = torch.empty_like(h)
    residual = gate is not None
    h_out = torch.empty_like(h) if residual else out
    affine = weight is not None
    pdl = _many_rows_pdl(h)
    _ln_modulate_kernel[(rows,)](
        h, gate if residual else h, y if residual else h, h_out, shift, scale, weight if affine else h,
        bias if affine else h, out, d, h.stride(0), gate.stride(0) if residual else 0, y.stride(0) if residual else 0,
        shift.stride(0), out.stride(0), eps,
        AFFINE=affine, RESIDUAL=residual, BLOCK_D=triton.next_power_of_2(d), PDL=pdl,
        num_warps=LN_NUM_WARPS, launch_pdl=pdl,
    )  # fmt: skip
    return h_out, out


def silu_(x: torch.Tensor, use_triton=None) -> torch.Tensor:
    """x = SiLU(x) in place (x contiguous); returns x. Triton only with MANY_ROWS_PDL: launching as
    a programmatic dependent (sm90+) is its one gain over torch's kernel."""
    if not (MANY_ROWS_PDL and runs_triton(x, use_triton)):
        return F.silu(x, inplace=True)
    pdl = _many_rows_pdl(x)
    block = 1024
    _silu_kernel[(triton.cdiv(x.numel(), block),)](x, x.numel(), BLOCK=block, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return x


def guided_update(v, x, cfg, cfg_img, rescale, seed, image, token, step, a, b, c, use_triton=None):
    """x_new = a x + b guided(v) + c z with z = token_noise(seed, image, token, step) drawn in-kernel.

    v: [slots, B, D] or None (then x_new = c z: the initial noise); x: [B, D] float32; cfg, cfg_img:
    float32 [B]; rescale: bool [B]; seed, image, token: int64 [B]. Returns float32 [B, D].
    """
    if not runs_triton(x, use_triton):
        from model.noise import philox_normal4

        blocks = torch.arange(x.shape[1] // 4, dtype=torch.int64, device=x.device)[None]
        step_t = torch.full_like(token, step)
        z = philox_normal4(blocks, token[:, None], step_t[:, None], image[:, None], seed[:, None]).reshape(x.shape)
        if v is None:
            return c * z
        return guided_update_reference(v, x, cfg, cfg_img, rescale, z, a, b, c)
    rows, dim = x.shape
    out = torch.empty(rows, dim, device=x.device, dtype=torch.float32)
    slots = v.shape[0] if v is not None else 2
    pdl = _pdl(x) if _few_rows(slots * rows) else _many_rows_pdl(x)
    _guided_update_kernel[(rows,)](
        v if v is not None else x, x, out, cfg, cfg_img, rescale, seed, image, token,
        rows, step, float(a), float(b), float(c),
        SLOTS=slots, HAS_V=v is not None, DIM=dim, PDL=pdl, launch_pdl=pdl,
    )  # fmt: skip
    return out


class FusedHead:
    """The head's weights arranged for the fused step (all adaLN projections in one matrix).

    modulations() and velocity() together evaluate FlowMatchingNet like net(x, t, c), given each
    step's time embedding and the token's condition embedding (constant over rows or over steps,
    so callers compute them once).
    """

    def __init__(self, net, use_triton: bool | None = None):
        self.net = net
        self.use_triton = use_triton
        self.width = net.input_proj.weight.shape[0]
        modulations = [block.adaLN_modulation[1] for block in net.res_blocks] + [net.final_layer.adaLN_modulation[1]]
        self.mod_weight = torch.cat([m.weight for m in modulations]).contiguous()
        self.mod_bias = torch.cat([m.bias for m in modulations]).contiguous()

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """t: [S] -> [S, D] (t_emb of each step's time; the same for every row)."""
        return self.net.time_embed(t)

    def cond_embedding(self, c: torch.Tensor) -> torch.Tensor:
        """c: [R, hidden] -> [R, D]."""
        return self.net.cond_embed(c.to(self.mod_weight.dtype))

    def modulations(self, t_emb: torch.Tensor, cond_emb: torch.Tensor) -> torch.Tensor:
        """t_emb: [S, D] (S steps), cond_emb: [R, D] -> every block's adaLN output [S, R, (3 depth + 2) D]."""
        y = F.silu(t_emb[:, None] + cond_emb[None]).reshape(-1, self.width)
        if MODULATION_GEMM == "cublas" and runs_triton(y, self.use_triton):
            mod = torch.addmm(self.mod_bias, y, self.mod_weight.t())
        else:
            mod = linear(y, self.mod_weight, self.mod_bias, use_triton=self.use_triton)
        return mod.view(t_emb.shape[0], cond_emb.shape[0], -1)

    def velocity(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """x: [B, token_dim] float32, mod: [R, ...] one step's modulations (R a multiple of B: row r
        is x's row r % B under condition r) -> velocity [R, token_dim] in the head's dtype."""
        net, use = self.net, self.use_triton
        rows = mod.shape[0]
        if _few_rows(rows) and runs_triton(x, use):
            return self._velocity_few_rows(x, mod)
        h = linear(x, net.input_proj.weight, net.input_proj.bias, rows=rows, use_triton=use)
        on_cublas = rows >= CUBLAS_BLOCKS_MIN_ROWS and runs_triton(x, use)
        u = self._blocks_on_cublas(h, mod) if on_cublas else self._blocks_on_triton(h, mod)
        return linear(u, net.final_layer.linear.weight, net.final_layer.linear.bias, use_triton=use)

    def _modulation(self, mod: torch.Tensor, j: int) -> tuple[torch.Tensor, ...]:
        """Block j's shift, scale and gate columns of one step's modulations (j = depth: the final
        layer's shift and scale)."""
        d = self.width
        return mod[:, 3 * d * j :].split(d, dim=1)[:3]

    def sampling_step(self, x, mod, slots, scales, counters, step, a, b, c, rescale: bool) -> torch.Tensor:
        """One sampler step: guided_update(velocity(x, mod) as [slots, B, D], x, *scales, *counters,
        step, a, b, c). For a few rows without rescaling (each column's update then stands alone) the
        update runs in the final layer's epilogue, one launch fewer."""
        use = self.use_triton
        if _few_rows(mod.shape[0]) and not rescale and runs_triton(x, use):
            cfg, cfg_img, _ = scales
            return few_rows_final_update(
                *self._final_layer_few_rows(x, mod), x, slots, cfg, cfg_img, *counters, step, a, b, c, use_triton=use
            )
        v = self.velocity(x, mod).view(slots, x.shape[0], -1)
        return guided_update(v, x, *scales, *counters, step, a, b, c, use_triton=use)

    def _velocity_few_rows(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """velocity() as few_rows_linear kernels: two per residual block, each LayerNorm inside."""
        h, weight, bias, norm = self._final_layer_few_rows(x, mod)
        return few_rows_linear(h, weight, bias, norm=norm, use_triton=self.use_triton)

    def _final_layer_few_rows(self, x: torch.Tensor, mod: torch.Tensor) -> tuple:
        """The input projection and residual blocks as few_rows_linear kernels -> the final layer's
        input h, weight, bias and norm (its LayerNorm + modulate, for few_rows_linear's norm)."""
        net, use = self.net, self.use_triton
        h = few_rows_linear(x, net.input_proj.weight, net.input_proj.bias, rows=mod.shape[0], use_triton=use)
        for j, block in enumerate(net.res_blocks):
            shift, scale, gate = self._modulation(mod, j)
            first, second = block.mlp[0], block.mlp[2]
            norm = (shift, scale, block.in_ln.weight, block.in_ln.bias)
            u = few_rows_linear(h, first.weight, first.bias, EPILOGUE_BIAS_SILU, norm=norm, use_triton=use)
            h = few_rows_linear(u, second.weight, second.bias, EPILOGUE_GATED_RESIDUAL, gate, h, use_triton=use)
        shift, scale = self._modulation(mod, len(net.res_blocks))[:2]
        final = net.final_layer.linear
        return h, final.weight, final.bias, (shift, scale, None, None)

    def _blocks_on_triton(self, h: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """The residual blocks with SiLU and the gated residual in the GEMMs' epilogues; returns the
        final layer's modulated input."""
        use = self.use_triton
        blocks = self.net.res_blocks
        for j, block in enumerate(blocks):
            shift, scale, gate = self._modulation(mod, j)
            first, second = block.mlp[0], block.mlp[2]
            u = ln_modulate(h, shift, scale, block.in_ln.weight, block.in_ln.bias, use_triton=use)
            u = linear(u, first.weight, first.bias, EPILOGUE_BIAS_SILU, use_triton=use)
            h = linear(u, second.weight, second.bias, EPILOGUE_GATED_RESIDUAL, gate, h, use_triton=use)
        shift, scale = self._modulation(mod, len(blocks))
        return ln_modulate(h, shift, scale, use_triton=use)

    def _blocks_on_cublas(self, h: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """The residual blocks' products on cuBLAS; each block's gated residual and the next LayerNorm
        + modulate in one row kernel. Returns the final layer's modulated input."""
        use = self.use_triton
        blocks = self.net.res_blocks
        shift, scale, _ = self._modulation(mod, 0)
        u = ln_modulate(h, shift, scale, blocks[0].in_ln.weight, blocks[0].in_ln.bias, use_triton=use)
        for j, block in enumerate(blocks):
            first, second = block.mlp[0], block.mlp[2]
            u = silu_(torch.addmm(first.bias, u, first.weight.t()), use_triton=use)
            y = torch.addmm(second.bias, u, second.weight.t())
            gate = self._modulation(mod, j)[2]
            shift, scale = self._modulation(mod, j + 1)[:2]
            # the next block's LayerNorm is affine; the final layer's is not
            norm = blocks[j + 1].in_ln if j + 1 < len(blocks) else None
            weight, bias = (norm.weight, norm.bias) if norm is not None else (None, None)
            h, u = residual_ln_modulate(h, gate, y, shift, scale, weight, bias, use_triton=use)
        return u
