"""The fused decoder-step kernels (Triton under TRITON_INTERPRET=1 on CPU) against the model's own
modules, and the engine with them against the reference generator."""

import pytest
import torch

from kernels import decoder_step
from kernels.decoder_step import (
    SplitPartials,
    add_rms_norm,
    add_rms_norm_reference,
    rope_write_kv,
    rope_write_kv_joined,
    rope_write_kv_reference,
    silu_mul,
    silu_mul_reference,
    stream_linear,
    stream_linear_silu_mul,
)
from model.decoder import RMSNorm
from model.rope import RotaryEmbedding
from tests.test_fused_head import rel

pytest.importorskip("triton")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_the_model_norm(dtype, tol, with_delta):
    norm = RMSNorm(96, 1e-6).to(dtype)
    norm.weight.data.normal_(1, 0.2)
    x = (torch.randn(5, 96) * 3).to(dtype)
    delta = torch.randn(5, 96).to(dtype) if with_delta else None
    x_got, h_got = add_rms_norm(x, delta, norm, use_triton=True)
    x_want, h_want = add_rms_norm_reference(x, delta, norm)
    assert torch.equal(x_got, x_want)  # the residual add rounds exactly as x + delta
    assert rel(h_got, h_want) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_kv_is_bit_identical_to_the_model_rotary_and_cache_write(dtype):
    tokens, heads, kv_heads, dim, blocks, block_size = 6, 4, 2, 32, 5, 4
    rotary = RotaryEmbedding(dim, 10000.0, None, 4096)
    cos, sin = rotary.cos_sin(torch.randint(0, 500, (tokens,)), dtype)
    fused = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)  # strided views, as from a QKV product
    q = fused[:, : heads * dim].view(tokens, heads, dim)
    k = fused[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = fused[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    slots = torch.randperm(blocks * block_size)[:tokens]
    caches = [torch.randn(blocks, block_size, kv_heads, dim).to(dtype) for _ in range(2)]
    caches += [c.clone() for c in caches]
    got = rope_write_kv(q, k, v, cos, sin, caches[0], caches[1], slots, use_triton=True)
    want = rope_write_kv_reference(q, k, v, cos, sin, caches[2], caches[3], slots)
    assert torch.equal(got, want)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_silu_mul_matches_reference(dtype, tol):
    gate, up = torch.randn(3, 2500).to(dtype), torch.randn(3, 2500).to(dtype)
    assert rel(silu_mul(gate, up, use_triton=True), silu_mul_reference(gate, up)) < tol


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_stream_linear_matches_a_float64_product(monkeypatch, rows, with_bias):
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_MAX_ROWS", 4)
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_TILE", (16, 32, 4, 2))
    # float16: the interpreter multiplies bfloat16 tiles wrongly (test_paged_attention says why)
    x, weight = torch.randn(rows, 100).half(), torch.randn(40, 100).half()  # ragged N and K tiles
    bias = torch.randn(40).half() if with_bias else None
    want = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    got = stream_linear(x, weight, bias, use_triton=True)
    assert got.dtype == torch.float16 and rel(got.double(), want) < 1e-3


@pytest.mark.parametrize("rows", [1, 3])
def test_stream_linear_split_k_matches_and_rearms_its_counters(monkeypatch, rows):
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_MAX_ROWS", 4)
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_TILE", (16, 32, 4, 2))
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_PROGRAMS_PER_SM", 12)  # 3 weight blocks x 4 slices
    x, weight, bias = torch.randn(rows, 520).half(), torch.randn(40, 520).half(), torch.randn(40).half()
    assert decoder_step.stream_linear_split(rows, 40, 520, x.device) == 4  # 17 K tiles: slices of 5, 5, 5 and 2
    assert decoder_step.stream_linear_split(17, 40, 520, x.device) == 1  # above STREAM_LINEAR_SPLIT_MAX_ROWS
    want = x.double() @ weight.double().T + bias.double()
    got = stream_linear(x, weight, bias, use_triton=True)
    assert rel(got.double(), want) < 1e-3
    assert torch.equal(stream_linear(x, weight, bias, use_triton=True), got)
    assert not decoder_step._split_counters(x.device).any()


def split_in_four(monkeypatch):
    """Products of up to 16 rows of a [40, 520] weight split into 4 K slices on the interpreter, their
    partials left to add_rms_norm and rope_write_kv."""
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_SUM_IN_CONSUMER_MAX_ROWS", 16)
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_MAX_ROWS", 16)
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_TILE", (16, 32, 4, 2))
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_PROGRAMS_PER_SM", 12)  # 3 weight blocks x 4 slices


def norm_of_width(width):
    norm = RMSNorm(width, 1e-6).half()
    norm.weight.data.normal_(1, 0.2)
    return norm


@pytest.mark.parametrize("rows", [2, 16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_split_partials_summed_in_add_rms_norm_equal_the_summed_product_then_add_rms_norm(monkeypatch, rows, with_bias):
    split_in_four(monkeypatch)
    h, weight = torch.randn(rows, 520).half(), torch.randn(40, 520).half()  # 40: ragged in add_rms_norm's block
    bias = torch.randn(40).half() if with_bias else None
    x, norm = (torch.randn(rows, 40) * 3).half(), norm_of_width(40)
    partials = stream_linear(h, weight, bias, use_triton=True, summed_by="add_rms_norm")
    assert isinstance(partials, SplitPartials) and partials.parts.shape[0] == 4
    x_got, h_got = add_rms_norm(x, partials, norm, use_triton=True)
    x_want, h_want = add_rms_norm(x, stream_linear(h, weight, bias, use_triton=True), norm, use_triton=True)
    assert torch.equal(x_got, x_want) and torch.equal(h_got, h_want)
    assert torch.equal(add_rms_norm(x, partials, norm, use_triton=False)[0], x + partials.total())  # the reference


@pytest.mark.parametrize("with_bias", [True, False])
def test_add_rms_norm_sums_split_partials_in_slice_order_then_adds_the_bias(with_bias):
    rows, width = 2, 40
    parts = torch.randn(3, 16, width)  # rows padded to 16, as a split product leaves them
    parts[:, :, 0] = torch.tensor([2.0**24, 1.0, -(2.0**24)])[:, None]  # summed in slice order 0, in reverse 1
    parts[:, :, 1] = torch.tensor([2.0**24, 0.0, -(2.0**24)])[:, None]  # a bias of 1 added last 1, first 0
    partials = SplitPartials(parts, torch.ones(width).half() if with_bias else None, rows, torch.float16)
    assert partials.total()[:, :2].tolist() == [[float(with_bias)] * 2] * rows
    x, norm = (torch.randn(rows, width) * 3).half(), norm_of_width(width)
    x_got, h_got = add_rms_norm(x, partials, norm, use_triton=True)
    x_want, h_want = add_rms_norm(x, partials.total(), norm, use_triton=True)
    assert torch.equal(x_got, x_want) and torch.equal(h_got, h_want)


@pytest.mark.parametrize("with_bias", [True, False])
def test_split_partials_total_equals_the_product_its_last_slice_would_store(monkeypatch, with_bias):
    split_in_four(monkeypatch)
    h, weight = torch.randn(3, 520).half(), torch.randn(40, 520).half()
    bias = torch.randn(40).half() if with_bias else None
    partials = stream_linear(h, weight, bias, use_triton=True, summed_by="add_rms_norm")
    assert torch.equal(partials.total(), stream_linear(h, weight, bias, use_triton=True))
    assert not decoder_step._split_counters(h.device).any()


@pytest.mark.parametrize("summed_by", ["add_rms_norm", "rope_write_kv"])
def test_stream_linear_summed_by_returns_a_tensor_unsplit_or_above_the_row_limit(monkeypatch, summed_by):
    split_in_four(monkeypatch)
    h, weight = torch.randn(3, 520).half(), torch.randn(40, 520).half()
    summed = stream_linear(h, weight, use_triton=True)
    assert isinstance(stream_linear(h, weight, use_triton=True, summed_by=summed_by), SplitPartials)
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_SUM_IN_CONSUMER_MAX_ROWS", 2)  # 3 rows: the counters sum
    assert torch.equal(stream_linear(h, weight, use_triton=True, summed_by=summed_by), summed)
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_SUM_IN_CONSUMER_MAX_ROWS", 16)
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_PROGRAMS_PER_SM", 0)  # no split
    assert isinstance(stream_linear(h, weight, use_triton=True, summed_by=summed_by), torch.Tensor)
    with pytest.raises(ValueError, match="summed_by"):
        stream_linear(h, weight, use_triton=False, summed_by="silu_mul")


HEADS, KV_HEADS, DIM = 4, 2, 16
QKV_SIZES = [HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM]  # a [128, K] joined q/k/v weight


def rope_inputs(rows):
    """cos, sin of random positions, cache slots and two pairs of equal (k, v) paged caches [5, 4, KV, DIM]."""
    cos, sin = RotaryEmbedding(DIM, 10000.0, None, 4096).cos_sin(torch.randint(0, 500, (rows,)), torch.float16)
    slots = torch.randperm(5 * 4)[:rows]
    caches = [torch.randn(5, 4, KV_HEADS, DIM).half() for _ in range(2)]
    return cos, sin, slots, caches + [c.clone() for c in caches]


@pytest.mark.parametrize("rows", [2, 16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_split_partials_summed_in_rope_write_kv_equal_the_summed_product_then_rope_write_kv(
    monkeypatch, rows, with_bias
):
    split_in_four(monkeypatch)
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_PROGRAMS_PER_SM", 32)  # 8 weight blocks x 4 slices
    h, weight = torch.randn(rows, 520).half(), (torch.randn(128, 520) / 520**0.5).half()
    bias = torch.randn(128).half() if with_bias else None
    cos, sin, slots, caches = rope_inputs(rows)
    partials = stream_linear(h, weight, bias, use_triton=True, summed_by="rope_write_kv")
    assert isinstance(partials, SplitPartials) and partials.parts.shape[0] == 4
    got = rope_write_kv_joined(partials, QKV_SIZES, DIM, cos, sin, caches[0], caches[1], slots, use_triton=True)
    q, k, v = (t.view(rows, -1, DIM) for t in stream_linear(h, weight, bias, use_triton=True).split(QKV_SIZES, dim=1))
    want = rope_write_kv(q, k, v, cos, sin, caches[2], caches[3], slots, use_triton=True)
    assert torch.equal(got, want) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    reference = rope_write_kv_joined(partials, QKV_SIZES, DIM, cos, sin, caches[2], caches[3], slots, use_triton=False)
    assert torch.equal(reference, want) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("with_bias", [True, False])
def test_rope_write_kv_sums_split_partials_in_slice_order_then_adds_the_bias(with_bias):
    rows, width = 2, sum(QKV_SIZES)
    parts = torch.empty(3, 16, width)  # rows padded to 16, as a split product leaves them
    parts[:, :, 0::2] = torch.tensor([2.0**24, 1.0, -(2.0**24)])[:, None, None]  # in slice order 0, in reverse 1
    parts[:, :, 1::2] = torch.tensor([2.0**24, 0.0, -(2.0**24)])[:, None, None]  # a bias of 1 added last 1, first 0
    partials = SplitPartials(parts, torch.ones(width).half() if with_bias else None, rows, torch.float16)
    assert partials.total().tolist() == [[float(with_bias)] * width] * rows  # q, k and v columns alike
    cos, sin, slots, caches = rope_inputs(rows)
    got = rope_write_kv_joined(partials, QKV_SIZES, DIM, cos, sin, caches[0], caches[1], slots, use_triton=True)
    want = rope_write_kv_joined(
        partials.total(), QKV_SIZES, DIM, cos, sin, caches[2], caches[3], slots, use_triton=True
    )
    assert torch.equal(got, want) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("programs_per_sm", [0, 12])
def test_stream_linear_silu_mul_equals_the_product_then_silu_mul(monkeypatch, rows, programs_per_sm):
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_MAX_ROWS", 4)
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_TILE", (16, 32, 4, 2))
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_PROGRAMS_PER_SM", programs_per_sm)  # 12: 4 K slices
    # 20 outputs: blocks of 8 gate rows and their 8 up rows, the last block ragged
    x, weight, bias = torch.randn(rows, 520).half(), torch.randn(40, 520).half(), torch.randn(40).half()
    got = stream_linear_silu_mul(x, weight, bias, use_triton=True)
    gate, up = stream_linear(x, weight, bias, use_triton=True).chunk(2, dim=1)
    two_kernels = silu_mul(gate, up, use_triton=True)
    # bit-identical on the GPU (bench/gpu_check.py); the interpreter's numpy products may round a
    # weight row differently with the other rows of its tile, so one float16 step is allowed here
    assert got.shape == (rows, 20) and rel(got, two_kernels) < 1e-3
    gate, up = (x.double() @ weight.double().T + bias.double()).chunk(2, dim=1)
    assert rel(got.double(), silu_mul_reference(gate, up)) < 2e-3
    assert not decoder_step._split_counters(x.device).any()
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_SILU", False)
    assert torch.equal(stream_linear_silu_mul(x, weight, bias, use_triton=True), two_kernels)


def test_stream_linear_leaves_more_rows_float32_and_strided_k_to_torch(monkeypatch):
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_MAX_ROWS", 4)
    cases = [
        (torch.randn(5, 64).bfloat16(), torch.randn(32, 64).bfloat16()),
        (torch.randn(2, 64), torch.randn(32, 64)),
        (torch.randn(64, 2).half().T, torch.randn(32, 64).half()),  # x strided along K
    ]
    for x, weight in cases:
        assert torch.equal(stream_linear(x, weight, use_triton=True), torch.nn.functional.linear(x, weight))


def test_engine_with_fused_backbone_matches_the_reference_generator():
    from model.bundle import load_bundle
    from server.engine.engine import EngineConfig
    from server.engine.events import EngineRequest
    from tests.test_engine import assert_tokens_close_to_reference, edit, t2i

    specs = [EngineRequest("cfg", t2i(n=2, seed=2, num_steps=2)), EngineRequest("edit", edit("red", seed=3, num_steps=2))]
    assert_tokens_close_to_reference(load_bundle("tiny", seed=0), specs, EngineConfig(fused_backbone=True, max_batched_tokens=24))


def test_fused_decode_step_with_the_split_sums_in_add_rms_norm_and_rope_write_kv_equals_the_summed_products(
    monkeypatch,
):
    from model.bundle import load_bundle
    from server.engine import model_runner
    from server.engine.model_runner import ModelRunner

    # float16 (the interpreter's bfloat16 products are wrong); q/k/v [256, 128] splits in 2, o [128, 128] in 4,
    # down [128, 352] in 6
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_TILE", (32, 32, 4, 2))
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_MIN_SLICE", 1)
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_PROGRAMS_PER_SM", 24)  # 24 programs over the weight blocks
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_SUM_IN_CONSUMER_MAX_ROWS", 2)
    bundle = load_bundle("tiny", dtype=torch.float16, seed=0)
    runner = ModelRunner(bundle, 8, 4, attention_backend="reference", use_graphs=False, fused_kernels=True)
    hidden = runner.model.config.hidden_size
    deltas, qkvs = [], []

    def recorded_add_rms_norm(x, delta, norm, use_triton=None):
        deltas.append(type(delta))
        return add_rms_norm(x, delta, norm, use_triton=use_triton)

    def recorded_rope_write_kv_joined(qkv, *args, use_triton=None):
        qkvs.append(type(qkv))
        return rope_write_kv_joined(qkv, *args, use_triton=use_triton)

    monkeypatch.setattr(model_runner, "add_rms_norm", recorded_add_rms_norm)
    monkeypatch.setattr(model_runner, "rope_write_kv_joined", recorded_rope_write_kv_joined)
    torch.manual_seed(0)
    int32 = torch.int32
    # two sequences decoding positions 5 and 2 of block tables [0, 1] and [3]
    step = (torch.randn(2, hidden).half(), torch.tensor([5, 2]), torch.tensor([5, 14]),
            torch.tensor([[0, 1], [3, 0]], dtype=int32), torch.tensor([6, 3], dtype=int32),
            torch.tensor([0, 1, 2], dtype=int32), torch.tensor([0, 1]))  # fmt: skip
    summed_in_consumers = runner.forward(*step)
    caches = [c.clone() for c in runner.k_cache + runner.v_cache]
    layers = len(runner.model.layers)
    assert deltas.count(SplitPartials) == 2 * layers - 1  # o of each layer, down of all but the last
    assert qkvs == [SplitPartials] * layers
    monkeypatch.setattr(decoder_step, "STREAM_LINEAR_SUM_IN_CONSUMER_MAX_ROWS", 0)
    assert torch.equal(runner.forward(*step), summed_in_consumers)
    assert qkvs[layers:] == [torch.Tensor] * layers
    assert all(torch.equal(a, b) for a, b in zip(runner.k_cache + runner.v_cache, caches))
