"""Small building blocks shared by the decoder and the head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# CPU BLAS switches kernels below about six rows, which changes rounding; computing at least this
# many rows makes a row's result independent of how many rows share the call, so a batched engine
# reproduces the one-request reference bit for bit on CPU.
MIN_CPU_ROWS = 8


class Linear(nn.Linear):
    """nn.Linear whose per-row result on CPU does not depend on the batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if x.device.type != "cpu" or rows >= MIN_CPU_ROWS or rows == 0:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        padded = torch.cat([flat, flat.new_zeros(MIN_CPU_ROWS - rows, x.shape[-1])])
        return F.linear(padded, self.weight, self.bias)[:rows].reshape(*x.shape[:-1], -1)
