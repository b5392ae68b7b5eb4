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
    def _modulated_norm(h_ptr, mod_ptr, ln_w, ln_b, k, kmask, shift_col, D: tl.constexpr, eps, AFFINE: tl.constexpr):
        """LayerNorm(h row) * (1 + scale) + shift over the row's D columns, rounded to h's dtype."""
        h = tl.load(h_ptr + k, mask=kmask, other=0.0, cache_modifier=".cg").to(tl.float32)
        mean = tl.sum(h, axis=0) / D
        centered = tl.where(kmask, h - mean, 0.0)
        normed = centered / tl.sqrt(tl.sum(centered * centered, axis=0) / D + eps)
        if AFFINE:
            normed = normed * ln_w + ln_b
        shift = tl.load(mod_ptr + shift_col + k, mask=kmask, other=0.0).to(tl.float32)
        scale = tl.load(mod_ptr + shift_col + D + k, mask=kmask, other=0.0).to(tl.float32)
        return (normed * (1.0 + scale) + shift).to(h_ptr.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _head_velocity_kernel(
        x_ptr, mod_ptr, w_in_ptr, b_in_ptr, w_ptr, b_ptr, ln_w_ptr, ln_b_ptr, w_out_ptr, b_out_ptr,
        h_ptr, u_ptr, v_ptr, sync_ptr, X_ROWS, stride_mod, eps, first_phase, last_phase,
        ROWS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, TOKEN_DIM: tl.constexpr,
        DEPTH: tl.constexpr, BLOCK_N: tl.constexpr, GRID_SYNC: tl.constexpr,
    ):  # fmt: skip
        # phases: 0 input projection; 1 + 2j block j's first product (LayerNorm, modulate, SiLU);
        # 2 + 2j its second (bias, gate, residual into h); 2 DEPTH + 1 the final layer
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < D
        k = tl.arange(0, BLOCK_D)
        kmask = k < D
        dtype = h_ptr.dtype.element_ty
        for phase in range(first_phase, last_phase):
            if phase == 0:
                kin = tl.arange(0, TOKEN_DIM)
                w = tl.load(w_in_ptr + cols[:, None] * TOKEN_DIM + kin[None, :], mask=cmask[:, None], other=0.0)
                bias = tl.load(b_in_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                for r in tl.static_range(ROWS):  # row r reads x's row r % X_ROWS (x repeated per guidance slot)
                    xr = tl.load(x_ptr + (r % X_ROWS) * TOKEN_DIM + kin).to(dtype).to(tl.float32)
                    acc = tl.sum(w.to(tl.float32) * xr[None, :], axis=1) + bias
                    tl.store(h_ptr + r * D + cols, acc.to(dtype), mask=cmask)
            elif phase <= 2 * DEPTH:
                layer = phase - 1
                j = layer // 2
                # this phase's weights are requested before waiting for the previous phase
                w = tl.load(w_ptr + layer * D * D + cols[:, None] * D + k[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
                bias = tl.load(b_ptr + layer * D + cols, mask=cmask, other=0.0).to(tl.float32)
                if GRID_SYNC:
                    _grid_barrier(sync_ptr, programs)
                if layer % 2 == 0:
                    ln_w = tl.load(ln_w_ptr + j * D + k, mask=kmask, other=0.0).to(tl.float32)
                    ln_b = tl.load(ln_b_ptr + j * D + k, mask=kmask, other=0.0).to(tl.float32)
                    for r in tl.static_range(ROWS):
                        ur = _modulated_norm(h_ptr + r * D, mod_ptr + r * stride_mod, ln_w, ln_b, k, kmask, 3 * D * j, D, eps, True)
                        acc = tl.sum(w.to(tl.float32) * ur[None, :], axis=1) + bias
                        acc = acc / (1.0 + tl.exp(-acc))
                        tl.store(u_ptr + r * D + cols, acc.to(dtype), mask=cmask)
                else:
                    for r in tl.static_range(ROWS):
                        ur = tl.load(u_ptr + r * D + k, mask=kmask, other=0.0, cache_modifier=".cg").to(tl.float32)
                        acc = tl.sum(w.to(tl.float32) * ur[None, :], axis=1) + bias
                        gate = tl.load(mod_ptr + r * stride_mod + 3 * D * j + 2 * D + cols, mask=cmask, other=0.0)
                        res = tl.load(h_ptr + r * D + cols, mask=cmask, other=0.0, cache_modifier=".cg")
                        tl.store(h_ptr + r * D + cols, (res.to(tl.float32) + gate.to(tl.float32) * acc).to(dtype), mask=cmask)
            else:
                if GRID_SYNC:
                    _grid_barrier(sync_ptr, programs)
                if pid * BLOCK_N < TOKEN_DIM:
                    omask = cols < TOKEN_DIM
                    w = tl.load(w_out_ptr + cols[:, None] * D + k[None, :], mask=omask[:, None] & kmask[None, :], other=0.0)
                    bias = tl.load(b_out_ptr + cols, mask=omask, other=0.0).to(tl.float32)
                    for r in tl.static_range(ROWS):
                        ur = _modulated_norm(h_ptr + r * D, mod_ptr + r * stride_mod, 0.0, 0.0, k, kmask, 3 * D * DEPTH, D, eps, False)
                        acc = tl.sum(w.to(tl.float32) * ur[None, :], axis=1) + bias
                        tl.store(v_ptr + r * TOKEN_DIM + cols, acc.to(dtype), mask=omask)


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
        programs = triton.cdiv(max(d, token_dim), BLOCK_N)
        phases = 2 * self.depth + 2
        grid_sync = resident_at_once(x.device, programs)
        for first, last in [(0, phases)] if grid_sync else [(p, p + 1) for p in range(phases)]:
            _head_velocity_kernel[(programs,)](
                x, mod, net.input_proj.weight, net.input_proj.bias, self.weight, self.bias, self.ln_weight,
                self.ln_bias, net.final_layer.linear.weight, net.final_layer.linear.bias, h, u, v, self.sync,
                x.shape[0], mod.stride(0), eps, first, last,
                ROWS=rows, D=d, BLOCK_D=triton.next_power_of_2(d), TOKEN_DIM=token_dim, DEPTH=self.depth,
                BLOCK_N=BLOCK_N, GRID_SYNC=grid_sync, num_warps=NUM_WARPS,
            )  # fmt: skip
        return v


def resident_at_once(device: torch.device, programs: int) -> bool:
    """Whether a launch of `programs` programs can wait on each other: a GPU with a multiprocessor for each."""
    return device.type == "cuda" and programs <= torch.cuda.get_device_properties(device).multi_processor_count
