"""Host lists to device tensors without stalling the GPU queue.

A plain `torch.tensor(values, device="cuda")` (or `.copy_` from ordinary host memory) waits for
the device to finish everything queued before it, so the host could never prepare step k+1 while
step k runs. Copies from pinned memory are queued behind the GPU work instead; the caching
pinned allocator keeps each buffer until its copy has run.
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """values (list, nested lists or tensor on the host) -> tensor on device, queued without a sync."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device=device, dtype=dtype)
    return host.to(dtype).pin_memory().to(device, non_blocking=True)


class StaticInput:
    """A device tensor that a captured graph reads, rewritten from host values only when they
    change: every upload is a copy the GPU runs between graph replays."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.values = None

    def set(self, values: list) -> None:
        """values: (nested) list of the tensor's shape, or of its number of elements."""
        if values == self.values:
            return
        host = torch.tensor(values, dtype=self.tensor.dtype).view_as(self.tensor)
        self.tensor.copy_(host.pin_memory() if self.tensor.is_cuda else host, non_blocking=True)
        self.values = values
