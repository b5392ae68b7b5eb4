"""The batched engine against the reference generator: same images, bit for bit, on CPU float32."""

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from model.bundle import load_bundle
from model.reference import GenerationRequest
from model.sampling import published_defaults
from server.engine.engine import BatchedEngine, EngineConfig
from server.engine.events import EngineRequest, ImageDone, ImagePreview, RequestDone, RequestFailed


@pytest.fixture(scope="module")
def bundle():
    return load_bundle("tiny", seed=0)


@pytest.fixture(scope="module")
def reference(bundle):
    cache = {}
    generator = bundle.reference_generator()

    def render(request):
        key = repr(request)
        if key not in cache:
            cache[key] = generator.generate(request).pixels.numpy()
        return cache[key]

    return render


class Collector:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]


def run(engine, arrivals, abort_at=None, max_steps=5000):
    """Feed {step: [EngineRequest]} to the engine, abort {step: [id]}, step until idle."""
    abort_at = abort_at or {}
    step = 0
    while step < max_steps:
        for spec in arrivals.get(step, []):
            engine.add_request(spec)
        for request_id in abort_at.get(step, []):
            engine.abort(request_id)
        if not engine.has_work() and step > max(list(arrivals) + list(abort_at) + [0]):
            return
        engine.step()
        step += 1
    raise AssertionError("engine did not finish")


def t2i(prompt="a red circle", width=32, height=32, n=1, seed=0, **params):
    base = published_defaults("nextstep-1", edit=False)
    sampling = replace(base, num_steps=params.pop("num_steps", 3), **params)
    return GenerationRequest(prompt=prompt, width=width, height=height, params=sampling, n=n, seed=seed)


def edit(color, prompt="<image>make the square blue", width=32, height=32, n=1, seed=0, **params):
    base = published_defaults("nextstep-1", edit=True)
    sampling = replace(base, num_steps=params.pop("num_steps", 3), **params)
    image = Image.new("RGB", (40, 40), color)
    image.paste((255, 255, 255), (10, 10, 30, 30))
    return GenerationRequest(prompt=prompt, width=width, height=height, params=sampling, n=n, seed=seed, image=image)


def images_by_request(collector):
    out = {}
    for event in collector.of(ImageDone):
        out.setdefault(event.request_id, {})[event.image_index] = event.pixels
    return out


def assert_matches_reference(collector, specs, reference):
    done = images_by_request(collector)
    for spec in specs:
        expected = reference(spec.request)
        assert sorted(done[spec.request_id]) == list(range(spec.request.n)), spec.request_id
        for i in range(spec.request.n):
            np.testing.assert_array_equal(done[spec.request_id][i], expected[i], err_msg=f"{spec.request_id}[{i}]")


def assert_tokens_close_to_reference(bundle, specs, config, tolerance=1e-4):
    """Run specs through an engine with config; every image's tokens within tolerance (relative)
    of the reference generator's (for the Triton paths, whose rounding differs from the reference)."""
    engine = BatchedEngine(bundle, lambda e: None, config)
    tokens = {}
    accept = engine._accept_token

    def record(image, token):
        accept(image, token)
        if image.done:
            tokens[(image.request.request_id, image.index)] = torch.stack(image.tokens)

    engine._accept_token = record
    for spec in specs:
        engine.add_request(spec)
    while engine.has_work():
        engine.step()
    generator = bundle.reference_generator()
    for spec in specs:
        want = generator.generate(spec.request).tokens
        for i in range(spec.request.n):
            got = tokens[(spec.request_id, i)]
            assert ((got - want[i]).norm() / want[i].norm()).item() < tolerance, spec.request_id


def assert_all_blocks_free(engine):
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert all(count == 0 for count in engine.blocks.ref_counts)


def test_one_request_equals_the_reference(bundle, reference):
    events = Collector()
    engine = BatchedEngine(bundle, events)
    spec = EngineRequest("a", t2i(n=2, seed=5))
    run(engine, {0: [spec]})
    assert_matches_reference(events, [spec], reference)
    assert [e.request_id for e in events.of(RequestDone)] == ["a"]
    assert_all_blocks_free(engine)


def test_random_mix_with_arrivals_aborts_and_preemption_equals_the_reference(bundle, reference):
    rng = random.Random(1234)
    samplers = ["legacy-sde", "sde", "cps", "ode"]
    specs, arrivals = [], {}
    for r in range(9):
        sampler = rng.choice(samplers)
        params = dict(
            sampler=sampler,
            num_steps=rng.choice([2, 3, 4]),
            guidance_scale=rng.choice([1.0, 3.0, 7.5]),
            guidance_schedule=rng.choice(["constant", "linear"]),
            timesteps_shift=rng.choice([1.0, 3.2]),
            use_norm=rng.choice([True, False]),
            rescale_guidance=rng.choice([True, False]),
        )
        width, height = rng.choice([(16, 16), (32, 16), (16, 48), (32, 32), (64, 32)])
        n = rng.choice([1, 2, 3])
        if r % 3 == 2:
            params["image_guidance_scale"] = rng.choice([1.0, 2.0])
            request = edit(rng.choice(["red", "green"]), width=width, height=height, n=n, seed=r, **params)
        else:
            request = t2i(rng.choice(["a red circle", "two blue squares at the top"]), width, height, n, r, **params)
        spec = EngineRequest(f"r{r}", request, partial_images=rng.choice([0, 1, 2]))
        specs.append(spec)
        arrivals.setdefault(rng.choice([0, 0, 1, 3, 6, 10]), []).append(spec)
    # two large requests up front fill the cache, so later growth has to preempt
    for name, seed in (("big0", 100), ("big1", 101), ("aborted", 102)):
        spec = EngineRequest(name, t2i(width=64, height=64, n=3, seed=seed))
        specs.append(spec)
        arrivals[0].insert(0, spec)

    events = Collector()
    # a small cache and a small token budget force chunked prefill and preemption
    engine = BatchedEngine(bundle, events, EngineConfig(block_size=4, num_blocks=28, max_batched_tokens=24))
    preempted = []
    original = engine.scheduler._preempt
    engine.scheduler._preempt = lambda image, step: (preempted.append(image), original(image, step))
    run(engine, arrivals, abort_at={3: ["aborted"]})

    assert preempted, "the test must exercise preemption"
    finished = [s for s in specs if s.request_id != "aborted"]
    assert_matches_reference(events, finished, reference)
    assert "aborted" not in {e.request_id for e in events.of(ImageDone)}
    assert {e.request_id for e in events.of(RequestDone)} == {s.request_id for s in finished}
    assert not events.of(RequestFailed)
    assert_all_blocks_free(engine)


def test_full_size_and_non_square_images_equal_the_reference(bundle, reference):
    """512x512 (1024 tokens) next to 512x256, unguided and 2 steps to keep the CPU time down."""
    events = Collector()
    engine = BatchedEngine(bundle, events)
    specs = [
        EngineRequest("square", t2i(width=512, height=512, num_steps=2, guidance_scale=1.0, seed=9)),
        EngineRequest("wide", t2i(width=512, height=256, num_steps=2, guidance_scale=1.0, seed=10)),
    ]
    run(engine, {0: specs[:1], 5: specs[1:]})
    assert_matches_reference(events, specs, reference)
    assert_all_blocks_free(engine)


def test_every_guidance_mode_equals_the_reference(bundle, reference):
    """One batch mixing unguided, guided with rescale and a linear schedule, 3-branch edits and ode."""
    events = Collector()
    engine = BatchedEngine(bundle, events)
    specs = [
        EngineRequest("plain", t2i(guidance_scale=1.0, seed=1)),
        EngineRequest("cfg", t2i(n=2, rescale_guidance=True, guidance_schedule="linear", seed=2)),
        EngineRequest("edit", edit("red", n=2, seed=3)),
        EngineRequest("ode", t2i(sampler="ode", use_norm=False, seed=4)),
    ]
    run(engine, {0: specs[:2], 1: specs[2:]})
    assert_matches_reference(events, specs, reference)


def test_images_of_one_request_share_prompt_blocks(bundle, reference):
    events = Collector()
    engine = BatchedEngine(bundle, events, EngineConfig(block_size=4, num_blocks=256))
    spec = EngineRequest("shared", t2i(prompt="two blue squares at the top of a yellow picture", n=4))
    run(engine, {0: [spec]})
    assert engine.blocks.hit_rate() > 0.5
    assert_matches_reference(events, [spec], reference)


def test_edits_of_different_images_never_share_placeholder_blocks(bundle, reference):
    events = Collector()
    engine = BatchedEngine(bundle, events, EngineConfig(block_size=4, num_blocks=256))
    red, green = EngineRequest("red", edit("red")), EngineRequest("green", edit("green"))
    run(engine, {0: [red], 2: [green]})
    assert_matches_reference(events, [red, green], reference)


def test_previews_arrive_in_order_before_the_image(bundle):
    events = Collector()
    engine = BatchedEngine(bundle, events)
    run(engine, {0: [EngineRequest("p", t2i(width=64, height=32), partial_images=3)]})
    previews = events.of(ImagePreview)
    assert [p.preview_index for p in previews] == [0, 1, 2]
    assert [p.tokens_done for p in previews] == [2, 4, 6]
    assert all(p.pixels.shape == (32, 64, 3) for p in previews)
    assert isinstance(events.events[-2], ImageDone)


def test_abort_frees_every_block_at_once(bundle):
    events = Collector()
    engine = BatchedEngine(bundle, events, EngineConfig(block_size=4, num_blocks=64))
    engine.add_request(EngineRequest("x", t2i(n=3, width=64, height=64)))
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    engine.abort("x")
    assert_all_blocks_free(engine)
    assert not engine.has_work()
    assert not events.of(ImageDone)


@pytest.mark.parametrize(
    "request_,match",
    [
        (replace(t2i(), width=24), "multiple of 16"),
        (t2i(width=512, height=512), "KV blocks"),
        (replace(t2i(), prompt="two <image> markers <image>"), "<image>"),
    ],
)
def test_bad_requests_fail_alone(bundle, reference, request_, match):
    events = Collector()
    engine = BatchedEngine(bundle, events, EngineConfig(block_size=4, num_blocks=64))
    good = EngineRequest("good", t2i(seed=3))
    run(engine, {0: [EngineRequest("bad", request_), good]})
    failures = events.of(RequestFailed)
    assert [f.request_id for f in failures] == ["bad"] and failures[0].client_error
    assert match in failures[0].message
    assert_matches_reference(events, [good], reference)


def test_decode_warm_up_covers_every_batch_and_table_width_it_is_asked_for(monkeypatch):
    from server.engine.model_runner import DECODE_BUCKETS, DecodeGraphs

    captured = []
    monkeypatch.setattr(DecodeGraphs, "_capture", lambda self, batch, width: captured.append((batch, width)))
    graphs = DecodeGraphs(runner=None)
    graphs.warm_up(num_seqs=6, max_blocks=5)
    assert sorted(captured) == [(b, w) for b in (1, 2, 4, 8) for w in (2, 4, 8)]
    for seqs in range(1, 7):  # what run() looks up for any such batch: never a new capture
        for blocks in range(1, 6):
            graphs._graph(graphs._bucket(seqs, DECODE_BUCKETS), graphs._width(blocks))
    assert len(captured) == 12


def test_head_warm_up_captures_the_keys_default_requests_use(bundle, monkeypatch):
    from server.engine.graphed_head import GraphedHeadSampler, GraphKey, bucket_for

    captured = []
    monkeypatch.setattr(GraphedHeadSampler, "_capture", lambda self, key, batch: captured.append(key))
    sampler = GraphedHeadSampler(bundle.model, use_graphs=True, fused=False)
    params = bundle.sampling_defaults.params(edit=False)
    sampler.warm_up(params, max_images=5)
    assert [k.bucket for k in captured] == [1, 2, 4, 8]
    for n in range(1, 6):  # sample()'s key for n text-guided images with these settings
        key = GraphKey(params.sampler, params.num_steps, params.timesteps_shift, 2, params.rescale_guidance, bucket_for(n))
        assert key in sampler.graphs


def test_static_input_uploads_only_changed_values():
    from server.engine.transfer import StaticInput

    column = StaticInput(torch.zeros(3, 1, dtype=torch.int64))
    column.set([1, 2, 3])
    assert column.tensor[:, 0].tolist() == [1, 2, 3]
    column.tensor.fill_(9)  # a write the upload cache cannot see: equal values are not uploaded again
    column.set([1, 2, 3])
    assert column.tensor[:, 0].tolist() == [9, 9, 9]
    column.set([1, 2, 4])
    assert column.tensor[:, 0].tolist() == [1, 2, 4]
