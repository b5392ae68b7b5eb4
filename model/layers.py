"""Small building blocks shared by the decoder and the head.

On CPU, BLAS picks its kernel (and so its rounding) from the matrix sizes: a row's result
changes with how many rows share the call. The batched engine must reproduce the one-request
reference bit for bit, so on CPU every matrix product here runs as torch.mm calls over fixed
blocks of CPU_ROW_BLOCK rows (zero-padded), one matrix at a time. GPUs take the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CPU_ROW_BLOCK = 8


def _fixed_block_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: [M, K] @ b: [K, N] -> [M, N], computed in zero-padded blocks of CPU_ROW_BLOCK rows."""
    rows = a.shape[0]
    padded = torch.cat([a, a.new_zeros((-rows) % CPU_ROW_BLOCK, a.shape[1])])
    blocks = [torch.mm(padded[i : i + CPU_ROW_BLOCK], b) for i in range(0, padded.shape[0], CPU_ROW_BLOCK)]
    return torch.cat(blocks)[:rows]


def batch_invariant_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: [..., M, K] @ b: [..., K, N] (same leading dims) -> [..., M, N]; row results never depend on M."""
    if a.device.type != "cpu":
        return a @ b
    lead = a.shape[:-2]
    a3 = a.reshape(-1, *a.shape[-2:])
    b3 = b.reshape(-1, *b.shape[-2:])
    out = torch.stack([_fixed_block_mm(x, y) for x, y in zip(a3, b3)])
    return out.reshape(*lead, a.shape[-2], b.shape[-1])


class Linear(nn.Linear):
    """nn.Linear whose per-row result on CPU does not depend on the batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.numel() == 0:
            return F.linear(x, self.weight, self.bias)
        flat = _fixed_block_mm(x.reshape(-1, x.shape[-1]), self.weight.t())
        if self.bias is not None:
            flat = flat + self.bias
        return flat.reshape(*x.shape[:-1], -1)
