"""Tensors in, tensors out: one batched backbone step over a paged KV cache, and the VAE.

The runner owns the KV cache ([num_blocks, block_size, kv_heads, head_dim] per layer) and runs
the model's own modules over a flat batch of positions from many sequences (prefill chunks and
decodes mixed). It makes no scheduling decisions.
"""

from __future__ import annotations

import torch

from kernels.decoder_step import add_rms_norm, rope_write_kv_joined, stream_linear, stream_linear_silu_mul
from kernels.paged_attention import paged_attention, write_kv
from model.bundle import ModelBundle
from model.rope import apply_rotary

from .scheduler import Chunk
from .transfer import StaticInput, to_device


class ModelRunner:
    def __init__(
        self,
        bundle: ModelBundle,
        num_blocks: int,
        block_size: int,
        attention_backend: str | None = None,
        use_graphs: bool = True,
        fused_kernels: bool | None = None,
    ):
        self.bundle = bundle
        self.model = bundle.model
        self.generator = bundle.reference_generator()
        config = self.model.config
        self.block_size = block_size
        self.attention_backend = attention_backend
        # Triton kernels for the glue between matrix products on GPU (forced on CPU: TRITON_INTERPRET
        # tests); the model's own modules otherwise, which keeps CPU results bit-exact
        self.fused_kernels = self.model.device.type == "cuda" if fused_kernels is None else fused_kernels
        self.projections = [FusedProjections(layer) for layer in self.model.layers] if self.fused_kernels else None
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        device, dtype = self.model.device, self.model.dtype
        # one block more than the block manager hands out: padding rows of a decode graph write there
        shape = (num_blocks + 1, *shape[1:])
        self.scratch_block = num_blocks
        self.k_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.decode_graphs = DecodeGraphs(self) if device.type == "cuda" and use_graphs else None

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
            ids = to_device(text_ids, torch.int64, model.device)
            embeds[to_device(text_rows, torch.int64, model.device)] = model.embed_tokens(ids)
        if image_tokens:
            tokens = torch.stack([t.to(model.device) for t in image_tokens]).to(model.dtype)
            embeds[to_device(image_rows, torch.int64, model.device)] = model.image_in_projector(tokens)
        return embeds

    @torch.inference_mode()
    def backbone(self, chunks: list[Chunk]) -> torch.Tensor:
        """Run every chunk's positions through the decoder; K/V land in the paged cache.

        Returns the final normed hidden state of each chunk's last position, [len(chunks), hidden].
        Steps where every chunk is one position (pure decode) replay a CUDA graph on GPU.
        """
        device, bs = self.model.device, self.block_size
        lengths = [c.end - c.start for c in chunks]
        positions = [p for c in chunks for p in range(c.start, c.end)]
        slots = [c.branch.block_table[p // bs] * bs + p % bs for c in chunks for p in range(c.start, c.end)]
        tables = [c.branch.block_table for c in chunks]
        seq_lens = [c.end for c in chunks]
        x = self._embed(chunks)
        if self.decode_graphs is not None and max(lengths) == 1 and len(chunks) <= DECODE_BUCKETS[-1]:
            return self.decode_graphs.run(x, positions, slots, tables, seq_lens)
        width = max(len(t) for t in tables)
        starts = torch.tensor([0, *lengths]).cumsum(0)
        return self.forward(
            x,
            to_device(positions, torch.int64, device),
            to_device(slots, torch.int64, device),
            to_device([t + [0] * (width - len(t)) for t in tables], torch.int32, device),
            to_device(seq_lens, torch.int32, device),
            to_device(starts, torch.int32, device),
            to_device(starts[1:] - 1, torch.int64, device),
        )

    def forward(self, x, positions, slots, tables, seq_lens, starts, last_rows) -> torch.Tensor:
        """The decoder over packed positions, all metadata on the device (no host sync: capturable).

        x: [T, hidden] input embeddings; positions, slots: int64 [T]; tables: int32 [S, width];
        seq_lens: int32 [S]; starts: int32 [S + 1] query offsets; last_rows: int64 [S].
        Returns the final normed hidden states at last_rows, [S, hidden].
        """
        model = self.model
        if self.fused_kernels:
            return self._forward_fused(x, positions, slots, tables, seq_lens, starts, last_rows)
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
        return model.norm(x[last_rows])

    def _forward_fused(self, x, positions, slots, tables, seq_lens, starts, last_rows) -> torch.Tensor:
        """forward() with the glue fused (kernels.decoder_step): one kernel each for residual add +
        RMSNorm, rotary embedding + cache write, and SiLU * up; products of a few rows (decode steps
        of a few images) as stream_linear weight streams."""
        model, use = self.model, self.fused_kernels
        cos, sin = model.rotary.cos_sin(positions, x.dtype)
        total = x.shape[0]
        layers = model.layers
        x, h = add_rms_norm(x, None, layers[0].input_layernorm, use_triton=use)
        for i, (layer, proj) in enumerate(zip(layers, self.projections)):
            attn, d = layer.self_attn, layer.self_attn.head_dim
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            qkv = proj.qkv(h, use)
            q = rope_write_kv_joined(qkv, proj.qkv_sizes, d, cos, sin, k_cache, v_cache, slots, use_triton=use)
            out = paged_attention(q, k_cache, v_cache, tables, seq_lens, starts, backend=self.attention_backend)
            o_proj, down = attn.o_proj, layer.mlp.down_proj
            o = stream_linear(out.view(total, -1), o_proj.weight, o_proj.bias, use_triton=use, summed_by="add_rms_norm")
            x, h = add_rms_norm(x, o, layer.post_attention_layernorm, use_triton=use)
            # the last layer's delta is added to x directly, not by add_rms_norm
            summed_by = "add_rms_norm" if i + 1 < len(layers) else None
            gated = proj.gate_up_silu(h, use)
            delta = stream_linear(gated, down.weight, down.bias, use_triton=use, summed_by=summed_by)
            if summed_by:
                x, h = add_rms_norm(x, delta, layers[i + 1].input_layernorm, use_triton=use)
            else:
                x = x + delta
        return model.norm(x[last_rows])

    def warm_up_decode(self, num_seqs: int, max_len: int) -> None:
        """Capture now every decode graph that batches of up to num_seqs sequences replay up to
        max_len positions (one per batch bucket and block-table width), so none is captured while
        a batch waits."""
        if self.decode_graphs is not None:
            self.decode_graphs.warm_up(num_seqs, -(-max_len // self.block_size))

    def decode_image(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """tokens [N, token_dim] -> uint8 [H, W, 3], exactly as the reference decodes."""
        return self.generator.decode(tokens[None], grid_h, grid_w)[0]


class FusedProjections:
    """One weight matrix for a layer's q, k, v projections and one for gate and up: two larger
    matrix products instead of five. The layer's own parameters become views into these matrices
    (the reference generator keeps working on them), so no memory is duplicated."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv_weight, self.qkv_bias = self._join([attn.q_proj, attn.k_proj, attn.v_proj])
        self.qkv_sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        self.gate_up_weight, self.gate_up_bias = self._join([mlp.gate_proj, mlp.up_proj])

    @staticmethod
    def _join(linears):
        weight = torch.cat([m.weight.detach() for m in linears])
        has_bias = linears[0].bias is not None
        bias = torch.cat([m.bias.detach() for m in linears]) if has_bias else None
        start = 0
        for m in linears:
            end = start + m.out_features
            m.weight = torch.nn.Parameter(weight[start:end], requires_grad=False)
            if has_bias:
                m.bias = torch.nn.Parameter(bias[start:end], requires_grad=False)
            start = end
        return weight, bias

    def qkv(self, h, use_triton=None):
        """The joined q/k/v product [T, sum(qkv_sizes)], or its SplitPartials: for rope_write_kv_joined."""
        return stream_linear(h, self.qkv_weight, self.qkv_bias, use_triton=use_triton, summed_by="rope_write_kv")

    def gate_up_silu(self, h, use_triton=None):
        """The MLP's SiLU(gate) * up."""
        return stream_linear_silu_mul(h, self.gate_up_weight, self.gate_up_bias, use_triton=use_triton)


DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 384, 512)


class DecodeGraphs:
    """CUDA graphs of a pure-decode backbone step, by (sequences bucket, block-table width bucket).

    Padding rows decode one position in the runner's scratch block, so they never touch a real
    sequence's cache; their outputs are dropped.
    """

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict, dict, torch.Tensor]] = {}
        self.pool = None

    @staticmethod
    def _bucket(value: int, sizes) -> int:
        return next(s for s in sizes if s >= value)

    @staticmethod
    def _width(blocks: int) -> int:
        return 1 << blocks.bit_length()  # powers of two: few graphs, any length

    def warm_up(self, num_seqs: int, max_blocks: int) -> None:
        largest = self._bucket(min(num_seqs, DECODE_BUCKETS[-1]), DECODE_BUCKETS)
        for batch in DECODE_BUCKETS[: DECODE_BUCKETS.index(largest) + 1]:
            for width in sorted({self._width(blocks) for blocks in range(1, max_blocks + 1)}):
                self._graph(batch, width)

    def _graph(self, batch: int, width: int):
        key = (batch, width)
        if key not in self.graphs:
            self.graphs[key] = self._capture(batch, width)
        return self.graphs[key]

    def run(self, x, positions, slots, tables, seq_lens) -> torch.Tensor:
        n = x.shape[0]
        batch = self._bucket(n, DECODE_BUCKETS)
        width = self._width(max(len(t) for t in tables))
        graph, inputs, uploads, out = self._graph(batch, width)
        runner, pad = self.runner, batch - n
        scratch = runner.scratch_block
        inputs["x"][:n].copy_(x)
        uploads["positions"].set(positions + [0] * pad)
        uploads["slots"].set(slots + [scratch * runner.block_size] * pad)
        uploads["tables"].set([t + [scratch] * (width - len(t)) for t in tables] + [[scratch] * width] * pad)
        uploads["seq_lens"].set(seq_lens + [1] * pad)
        graph.replay()
        return out[:n].clone()

    def _capture(self, batch: int, width: int):
        runner = self.runner
        model, device = runner.model, runner.model.device
        scratch = runner.scratch_block
        inputs = {
            "x": torch.zeros(batch, model.config.hidden_size, device=device, dtype=model.dtype),
            "positions": torch.zeros(batch, dtype=torch.int64, device=device),
            "slots": torch.full((batch,), scratch * runner.block_size, dtype=torch.int64, device=device),
            "tables": torch.full((batch, width), scratch, dtype=torch.int32, device=device),
            "seq_lens": torch.ones(batch, dtype=torch.int32, device=device),
        }
        # kept in `inputs`: the graph reads these addresses on every replay, they must outlive the capture
        inputs["starts"] = torch.arange(batch + 1, dtype=torch.int32, device=device)
        inputs["last_rows"] = torch.arange(batch, device=device)

        def step():
            return runner.forward(**inputs)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # compile kernels and warm the allocator outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = step()
        self.pool = graph.pool()
        uploads = {name: StaticInput(inputs[name]) for name in ("positions", "slots", "tables", "seq_lens")}
        return graph, inputs, uploads, out
