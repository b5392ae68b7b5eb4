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
