"""The flow-matching head's velocity for a few rows in one persistent launch.

For one or two images a head evaluation is ~26 dependent products of a few rows each: launched one
by one they are bound by launch latency, not by the 113 MB of weights they read. Here each program
owns BLOCK_N output columns of every layer and the layers are separated by a grid-wide barrier, so
a step costs one launch; each program loads its slice of the next layer's weights before it waits
at the barrier. Every program recomputes the LayerNorm of the (few) full rows it needs.

The rounding follows FusedHead's per-layer kernels (outputs in the head's dtype, float32 sums), so
FusedHead.velocity's other paths are the reference. Under TRITON_INTERPRET=1 programs run one after
another and cannot wait for each other: there the layers run as one launch each, without barriers.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_N = 16  # output columns per program: 96 programs at width 1536 (all resident on an H200)
NUM_WARPS = 8
PRODUCT_TILE = 8192  # rows x BLOCK_N x BLOCK_K products accumulated per step of K (32 float32 per thread)

if triton is not None:

    @triton.jit
    def _grid_barrier(sync_ptr, programs):
        """Wait until every program of the launch has arrived (all must be resident at once).

        sync_ptr: [arrivals, generation]; the last to arrive rearms the count and bumps the
        generation the others spin on, so the pair is ready for the next barrier and launch."""
        tl.debug_barrier()  # this program's writes are issued before it arrives
        generation = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
        if tl.atomic_add(sync_ptr, 1, sem="acq_rel") == programs - 1:
            tl.atomic_xchg(sync_ptr, 0, sem="relaxed")
            tl.atomic_add(sync_ptr + 1, 1, sem="release")
        else:
            seen = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
            while seen == generation:
                seen = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
        tl.debug_barrier()

    @triton.jit
    def _row_stats(stats_ptr, r, rmask, D: tl.constexpr, BLOCK_N: tl.constexpr, PARTS: tl.constexpr, eps):
        """Mean and 1/std of each row of h from the per-column-block partials its producers left
        (mean and sum of squared deviations of BLOCK_N columns each), combined like Chan et al."""
        p = tl.arange(0, triton.next_power_of_2(PARTS))
        pmask = rmask[:, None] & (p < PARTS)[None, :]
        part = stats_ptr + (r[:, None] * PARTS + p[None, :]) * 2
        part_mean = tl.load(part, mask=pmask, other=0.0, cache_modifier=".cg")
        part_m2 = tl.load(part + 1, mask=pmask, other=0.0, cache_modifier=".cg")
        count = tl.where(pmask, tl.minimum(D - p * BLOCK_N, BLOCK_N), 0).to(tl.float32)
        mean = tl.sum(count * part_mean, axis=1) / D
        deviation = part_mean - mean[:, None]
        m2 = tl.sum(part_m2 + count * deviation * deviation, axis=1)
        return mean, 1.0 / tl.sqrt(m2 / D + eps)

    @triton.jit
    def _store_rows(out_ptr, stats_ptr, acc, r, cols, rmask, cmask, pid, D: tl.constexpr, BLOCK_N: tl.constexpr,
                    PARTS: tl.constexpr):  # fmt: skip
        """Store h's columns of this program, rounded to h's dtype, and their partial row statistics."""
        mask = rmask[:, None] & cmask[None, :]
        value = tl.where(mask, acc.to(out_ptr.dtype.element_ty).to(tl.float32), 0.0)
        tl.store(out_ptr + r[:, None] * D + cols[None, :], value.to(out_ptr.dtype.element_ty), mask=mask)
        count = tl.maximum(tl.minimum(D - pid * BLOCK_N, BLOCK_N), 1).to(tl.float32)
        mean = tl.sum(value, axis=1) / count
        deviation = tl.where(mask, value - mean[:, None], 0.0)
        part = stats_ptr + (r * PARTS + pid) * 2
        part_ok = rmask & (r * 0 + pid < PARTS)  # a program past the last column block has none
        tl.store(part, mean, mask=part_ok)
        tl.store(part + 1, tl.sum(deviation * deviation, axis=1), mask=part_ok)

    @triton.jit
    def _product(
        in_ptr, w_ptr, mod_ptr, ln_w_ptr, ln_b_ptr, stride_mod, shift_col, mean, rstd, r, cols, rmask, nmask,
        D: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr, AFFINE: tl.constexpr,
    ):  # fmt: skip
        """[rows, BLOCK_N] = input rows (or LayerNorm(rows) * (1 + scale) + shift, rounded to the rows'
        dtype) @ w[cols]^T, in float32. Products are summed per lane over K and reduced once at the end."""
        r3 = r[:, None, None]
        n3 = cols[None, :, None]
        rmask3 = rmask[:, None, None]
        kk = tl.arange(0, BLOCK_K)[None, None, :]
        acc = tl.zeros((r.shape[0], cols.shape[0], BLOCK_K), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + kk
            kmask = k < D
            w = tl.load(w_ptr + n3 * D + k, mask=nmask[None, :, None] & kmask, other=0.0).to(tl.float32)
            m = rmask3 & kmask
            u = tl.load(in_ptr + r3 * D + k, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
            if NORM:
                u = (u - mean[:, None, None]) * rstd[:, None, None]
                if AFFINE:
                    u = u * tl.load(ln_w_ptr + k, mask=kmask, other=0.0).to(tl.float32)
                    u = u + tl.load(ln_b_ptr + k, mask=kmask, other=0.0).to(tl.float32)
                shift = tl.load(mod_ptr + r3 * stride_mod + shift_col + k, mask=m, other=0.0).to(tl.float32)
                scale = tl.load(mod_ptr + r3 * stride_mod + shift_col + D + k, mask=m, other=0.0).to(tl.float32)
                u = tl.where(m, (u * (1.0 + scale) + shift).to(in_ptr.dtype.element_ty).to(tl.float32), 0.0)
            acc += u * w
        return tl.sum(acc, axis=2)

    @triton.jit
    def _head_velocity_kernel(
        x_ptr, mod_ptr, w_in_ptr, b_in_ptr, w_ptr, b_ptr, ln_w_ptr, ln_b_ptr, w_out_ptr, b_out_ptr,
        h_ptr, u_ptr, v_ptr, stats_ptr, sync_ptr, X_ROWS, stride_mod, eps, first_phase, last_phase,
        ROWS: tl.constexpr, D: tl.constexpr, TOKEN_DIM: tl.constexpr, DEPTH: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GRID_SYNC: tl.constexpr,
    ):  # fmt: skip
        # phases: 0 input projection; 1 + 2j block j's first product (LayerNorm, modulate, SiLU);
        # 2 + 2j its second (bias, gate, residual into h); 2 DEPTH + 1 the final layer
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        PARTS: tl.constexpr = (D + BLOCK_N - 1) // BLOCK_N
        r = tl.arange(0, triton.next_power_of_2(ROWS))
        rmask = r < ROWS
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < D
        for phase in range(first_phase, last_phase):
            if phase > first_phase and GRID_SYNC:
                _grid_barrier(sync_ptr, programs)  # the previous phase's outputs are complete
            if phase == 0:
                k = tl.arange(0, TOKEN_DIM)
                x = tl.load(x_ptr + (r % X_ROWS)[:, None] * TOKEN_DIM + k[None, :], mask=rmask[:, None], other=0.0)
                x = x.to(w_in_ptr.dtype.element_ty).to(tl.float32)  # rounded as the per-layer GEMM's input
                w = tl.load(w_in_ptr + cols[:, None] * TOKEN_DIM + k[None, :], mask=cmask[:, None], other=0.0)
                acc = tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
                acc += tl.load(b_in_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                _store_rows(h_ptr, stats_ptr, acc, r, cols, rmask, cmask, pid, D, BLOCK_N, PARTS)
            elif phase <= 2 * DEPTH:
                layer = phase - 1
                j = layer // 2
                bias = tl.load(b_ptr + layer * D + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                if layer % 2 == 0:
                    mean, rstd = _row_stats(stats_ptr, r, rmask, D, BLOCK_N, PARTS, eps)
                    acc = _product(h_ptr, w_ptr + layer * D * D, mod_ptr, ln_w_ptr + j * D, ln_b_ptr + j * D,
                                   stride_mod, 3 * D * j, mean, rstd, r, cols, rmask, cmask, D, BLOCK_K, True, True)  # fmt: skip
                    acc += bias
                    acc = acc / (1.0 + tl.exp(-acc))
                    mask = rmask[:, None] & cmask[None, :]
                    tl.store(u_ptr + r[:, None] * D + cols[None, :], acc.to(u_ptr.dtype.element_ty), mask=mask)
                else:
                    acc = _product(u_ptr, w_ptr + layer * D * D, mod_ptr, ln_w_ptr, ln_b_ptr, stride_mod, 0, 0.0, 0.0,
                                   r, cols, rmask, cmask, D, BLOCK_K, False, False)  # fmt: skip
                    mask = rmask[:, None] & cmask[None, :]
                    gate = tl.load(mod_ptr + r[:, None] * stride_mod + 3 * D * j + 2 * D + cols[None, :], mask=mask, other=0.0)
                    res = tl.load(h_ptr + r[:, None] * D + cols[None, :], mask=mask, other=0.0, cache_modifier=".cg")
                    acc = res.to(tl.float32) + gate.to(tl.float32) * (acc + bias)
                    _store_rows(h_ptr, stats_ptr, acc, r, cols, rmask, cmask, pid, D, BLOCK_N, PARTS)
            elif pid * BLOCK_N < TOKEN_DIM:
                omask = cols < TOKEN_DIM
                mean, rstd = _row_stats(stats_ptr, r, rmask, D, BLOCK_N, PARTS, eps)
                acc = _product(h_ptr, w_out_ptr, mod_ptr, ln_w_ptr, ln_b_ptr, stride_mod, 3 * D * DEPTH, mean, rstd,
                               r, cols, rmask, omask, D, BLOCK_K, True, False)  # fmt: skip
                acc += tl.load(b_out_ptr + cols, mask=omask, other=0.0).to(tl.float32)[None, :]
                mask = rmask[:, None] & omask[None, :]
                tl.store(v_ptr + r[:, None] * TOKEN_DIM + cols[None, :], acc.to(v_ptr.dtype.element_ty), mask=mask)


class HeadStepWeights:
    """The residual blocks' product weights of a FlowMatchingNet as one [2 depth, D, D] tensor (the
    modules' parameters become views of it: no extra memory) and the LayerNorm affines stacked."""

    def __init__(self, net):
        blocks = net.res_blocks
        products = [lin for block in blocks for lin in (block.mlp[0], block.mlp[2])]
        self.weight = torch.stack([lin.weight.detach() for lin in products])
        self.bias = torch.stack([lin.bias.detach() for lin in products])
        for i, lin in enumerate(products):
            lin.weight.data, lin.bias.data = self.weight[i], self.bias[i]
        self.ln_weight = torch.stack([block.in_ln.weight.detach() for block in blocks])
        self.ln_bias = torch.stack([block.in_ln.bias.detach() for block in blocks])
        self.net = net
        self.depth = len(blocks)
        self.sync = torch.zeros(2, dtype=torch.int32, device=self.weight.device)  # the grid barrier's state

    def velocity(self, x: torch.Tensor, mod: torch.Tensor, eps: float) -> torch.Tensor:
        """x: [B, token_dim] float32, mod: [R, (3 depth + 2) D] -> [R, token_dim] (see FusedHead.velocity)."""
        net = self.net
        rows, d = mod.shape[0], self.weight.shape[-1]
        token_dim = net.input_proj.weight.shape[1]
        h = torch.empty(rows, d, device=x.device, dtype=self.weight.dtype)
        u, v = torch.empty_like(h), torch.empty(rows, token_dim, device=x.device, dtype=h.dtype)
        stats = torch.empty(rows, triton.cdiv(d, BLOCK_N), 2, device=x.device, dtype=torch.float32)
        programs = triton.cdiv(max(d, token_dim), BLOCK_N)
        block_k = max(16, min(256, PRODUCT_TILE // (triton.next_power_of_2(rows) * BLOCK_N)))
        phases = 2 * self.depth + 2
        grid_sync = resident_at_once(x.device, programs)
        for first, last in [(0, phases)] if grid_sync else [(p, p + 1) for p in range(phases)]:
            _head_velocity_kernel[(programs,)](
                x, mod, net.input_proj.weight, net.input_proj.bias, self.weight, self.bias, self.ln_weight,
                self.ln_bias, net.final_layer.linear.weight, net.final_layer.linear.bias, h, u, v, stats, self.sync,
                x.shape[0], mod.stride(0), eps, first, last,
                ROWS=rows, D=d, TOKEN_DIM=token_dim, DEPTH=self.depth, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
                GRID_SYNC=grid_sync, num_warps=NUM_WARPS,
            )  # fmt: skip
        return v


def resident_at_once(device: torch.device, programs: int) -> bool:
    """Whether a launch of `programs` programs can wait on each other: a GPU with a multiprocessor for each."""
    return device.type == "cuda" and programs <= torch.cuda.get_device_properties(device).multi_processor_count
