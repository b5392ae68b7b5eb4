"""Teacher-forced training batches in the inference prompt layout.

A training sequence is one guidance branch's prompt (model.prompts.build_prompt_branches, exactly
what the reference generator feeds) followed by the output image's tokens 0..N-2 as inputs. The
head condition for output token k is the hidden state at the prompt's last position (boi) for k = 0,
else at the position holding token k-1. Sequences are right-padded: attention is causal.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from model.prompts import PromptSequence


@dataclass
class Batch:
    token_ids: torch.Tensor  # [B, T] int64
    image_mask: torch.Tensor  # [B, T] bool: positions embedded by image_in_projector
    image_values: torch.Tensor  # [B, T, token_dim]: the image token at those positions, 0 elsewhere
    condition_positions: torch.Tensor  # [B, N] int64: position whose hidden state conditions output token k
    targets: torch.Tensor  # [B, N, token_dim]: output image tokens

    def to(self, device: torch.device) -> Batch:
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


def collate(
    prompts: list[PromptSequence],
    outputs: torch.Tensor,
    inputs: list[torch.Tensor | None],
    pad_id: int,
) -> Batch:
    """prompts: one branch prompt per example; outputs: [B, N, token_dim] output image tokens;
    inputs: per example the edit input's tokens [P, token_dim] for its prompt's image_positions (or None)."""
    b, n, dim = outputs.shape
    if len(prompts) != b or len(inputs) != b:
        raise ValueError(f"collate: {len(prompts)} prompts and {len(inputs)} inputs for {b} output images")
    lengths = [len(p.token_ids) + n - 1 for p in prompts]
    t = max(lengths)
    token_ids = torch.full((b, t), pad_id, dtype=torch.long)
    image_mask = torch.zeros(b, t, dtype=torch.bool)
    image_values = torch.zeros(b, t, dim)
    condition_positions = torch.zeros(b, n, dtype=torch.long)
    for row, (prompt, image) in enumerate(zip(prompts, inputs)):
        start = len(prompt.token_ids)
        token_ids[row, :start] = torch.tensor(prompt.token_ids)
        if prompt.image_positions:
            if image is None or image.shape != (len(prompt.image_positions), dim):
                raise ValueError("collate: an edit prompt needs its input image's tokens")
            positions = torch.tensor(prompt.image_positions)
            image_mask[row, positions] = True
            image_values[row, positions] = image
        image_mask[row, start : start + n - 1] = True
        image_values[row, start : start + n - 1] = outputs[row, : n - 1]
        condition_positions[row] = torch.arange(start - 1, start + n - 1)
    return Batch(token_ids, image_mask, image_values, condition_positions, outputs)
