"""Tensors in, tensors out: one batched backbone step over a paged KV cache, and the VAE.

The runner owns the KV cache ([num_blocks, block_size, kv_heads, head_dim] per layer) and runs
the model's own modules over a flat batch of positions from many sequences (prefill chunks and
decodes mixed). It makes no scheduling decisions.
"""

from __future__ import annotations

import torch

from kernels.paged_attention import paged_attention, write_kv
from model.bundle import ModelBundle
from model.rope import apply_rotary

from .scheduler import Chunk


class ModelRunner:
    def __init__(self, bundle: ModelBundle, num_blocks: int, block_size: int, attention_backend: str | None = None):
        self.bundle = bundle
        self.model = bundle.model
        self.generator = bundle.reference_generator()
        config = self.model.config
        self.block_size = block_size
        self.attention_backend = attention_backend
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        device, dtype = self.model.device, self.model.dtype
        self.k_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]

    @staticmethod
    def kv_bytes_per_block(bundle: ModelBundle, block_size: int) -> int:
        config = bundle.config
        element = torch.finfo(bundle.model.dtype).bits // 8
        return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * element

    def _embed(self, chunks: list[Chunk]) -> torch.Tensor:
        """Input embeddings [T, hidden] of every chunk's positions, concatenated.

        Text positions take embed_tokens; image placeholders (the edit's input latent) and
        generated tokens take image_in_projector; each kind is one batched call.
        """
        model = self.model
        text_ids, text_rows, image_tokens, image_rows = [], [], [], []
        row = 0
        for chunk in chunks:
            branch, image = chunk.branch, chunk.image
            for p in range(chunk.start, chunk.end):
                if p >= branch.prompt_len:
                    image_tokens.append(image.tokens[p - branch.prompt_len])
                    image_rows.append(row)
                elif p in branch.placeholder_rows:
                    image_tokens.append(image.request.input_tokens[branch.placeholder_rows[p]])
                    image_rows.append(row)
                else:
                    text_ids.append(branch.prompt.token_ids[p])
                    text_rows.append(row)
                row += 1
        embeds = torch.empty(row, model.config.hidden_size, device=model.device, dtype=model.dtype)
        if text_ids:
            ids = torch.tensor(text_ids, device=model.device)
            embeds[torch.tensor(text_rows, device=model.device)] = model.embed_tokens(ids)
        if image_tokens:
            tokens = torch.stack([t.to(model.device) for t in image_tokens]).to(model.dtype)
            embeds[torch.tensor(image_rows, device=model.device)] = model.image_in_projector(tokens)
        return embeds

    @torch.inference_mode()
    def backbone(self, chunks: list[Chunk]) -> torch.Tensor:
        """Run every chunk's positions through the decoder; K/V land in the paged cache.

        Returns the final normed hidden state of each chunk's last position, [len(chunks), hidden].
        """
        model, device = self.model, self.model.device
        lengths = [c.end - c.start for c in chunks]
        positions = torch.cat([torch.arange(c.start, c.end) for c in chunks]).to(device)
        bs = self.block_size
        slots = torch.tensor(
            [c.branch.block_table[p // bs] * bs + p % bs for c in chunks for p in range(c.start, c.end)],
            dtype=torch.int64,
        ).to(device)
        max_blocks = max(len(c.branch.block_table) for c in chunks)
        tables = torch.tensor(
            [c.branch.block_table + [0] * (max_blocks - len(c.branch.block_table)) for c in chunks], dtype=torch.int32
        ).to(device)
        seq_lens = torch.tensor([c.end for c in chunks], dtype=torch.int32).to(device)
        starts = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(torch.int32).to(device)

        x = self._embed(chunks)
        cos, sin = model.rotary.cos_sin(positions[None], x.dtype)
        total = x.shape[0]
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(total, attn.num_heads, attn.head_dim)
            k = attn.k_proj(h).view(total, attn.num_kv_heads, attn.head_dim)
            v = attn.v_proj(h).view(total, attn.num_kv_heads, attn.head_dim)
            # rotary in the model's own [1, heads, T, d] layout
            q = apply_rotary(q.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
            k = apply_rotary(k.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
            write_kv(self.k_cache[i], self.v_cache[i], k.contiguous(), v.contiguous(), slots)
            out = paged_attention(
                q.contiguous(), self.k_cache[i], self.v_cache[i], tables, seq_lens, starts, backend=self.attention_backend
            )
            x = x + attn.o_proj(out.reshape(total, attn.num_heads * attn.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last_rows = starts[1:].long() - 1
        return model.norm(x[last_rows])

    def decode_image(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """tokens [N, token_dim] -> uint8 [H, W, 3], exactly as the reference decodes."""
        return self.generator.decode(tokens[None], grid_h, grid_w)[0]
