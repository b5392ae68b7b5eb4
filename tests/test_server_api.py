"""The HTTP API against a live server: every request field, every error path, the ops endpoints.

Images are 32x32 (2x2 tokens) with 2 sampling steps, so each request renders in milliseconds.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace

import httpx
import numpy as np
import pytest
from PIL import Image

from model.reference import GenerationRequest
from model.sampling import published_defaults

FAST = {"size": "32x32", "num_inference_steps": 2, "seed": 11}


@pytest.fixture(scope="module")
def server(start_server):
    with start_server(max_pixels=64 * 64, max_steps=60, max_prompt_tokens=64, default_size="32x32") as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def generate(client, **fields):
    return client.post("/v1/images/generations", json={"prompt": "a red circle", **FAST, **fields})


def edit(client, image: bytes | None = None, files=None, **fields):
    data = {"prompt": "make it blue", **FAST, **fields}
    files = files if files is not None else [("image", ("in.png", image or png_bytes(), "image/png"))]
    return client.post("/v1/images/edits", data={k: str(v) for k, v in data.items()}, files=files)


def png_bytes(size=(40, 24), color=(200, 30, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def assert_error(response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def reference_pixels(bundle, prompt, width, height, steps, seed, n=1, image=None, **params) -> np.ndarray:
    defaults = published_defaults(bundle.config.family, edit=image is not None)
    request = GenerationRequest(
        prompt=prompt, width=width, height=height, params=replace(defaults, num_steps=steps, **params),
        n=n, seed=seed, image=image,
    )  # fmt: skip
    return bundle.reference_generator().generate(request).pixels.numpy()


# generations


def test_generation_returns_n_png_images_of_the_requested_size(client):
    response = generate(client, n=2, size="48x32")
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == 2
    for item in body["data"]:
        image = decode(item["b64_json"])
        assert image.format == "PNG" and image.size == (48, 32)
        assert item["url"] is None
    assert body["size"] == "48x32" and body["output_format"] == "png"
    assert body["background"] == "opaque" and body["quality"] == "auto"
    assert isinstance(body["created"], int)


def test_generation_usage_counts_prompt_and_image_tokens(client):
    usage = generate(client, n=3, size="64x32").json()["usage"]
    assert usage["output_tokens"] == 3 * (64 // 16) * (32 // 16)
    assert usage["output_tokens_details"] == {"image_tokens": usage["output_tokens"], "text_tokens": 0}
    assert usage["input_tokens"] == usage["input_tokens_details"]["text_tokens"] > 0
    assert usage["input_tokens_details"]["image_tokens"] == 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_generation_matches_the_reference_generator(client, tiny_bundle):
    body = generate(client, prompt="a cat", n=2, seed=5, num_inference_steps=3).json()
    expected = reference_pixels(tiny_bundle, "a cat", 32, 32, steps=3, seed=5, n=2)
    for i, item in enumerate(body["data"]):
        assert np.array_equal(np.asarray(decode(item["b64_json"])), expected[i])


def test_sampling_extensions_reach_the_sampler(client, tiny_bundle):
    fields = {"guidance_scale": 3.0, "timesteps_shift": 2.0, "sampler": "ode", "guidance_schedule": "linear"}
    body = generate(client, prompt="a dog", seed=3, num_inference_steps=3, negative_prompt="blurry", **fields).json()
    defaults = published_defaults(tiny_bundle.config.family, edit=False)
    params = replace(defaults, num_steps=3, **fields)
    request = GenerationRequest("a dog", 32, 32, params, seed=3, negative_prompt="blurry")
    expected = tiny_bundle.reference_generator().generate(request).pixels.numpy()[0]
    assert np.array_equal(np.asarray(decode(body["data"][0]["b64_json"])), expected)


def test_same_seed_same_image_and_different_seed_different_image(client):
    a, b, c = (generate(client, seed=s).json()["data"][0]["b64_json"] for s in (1, 1, 2))
    assert a == b and a != c


def test_size_auto_and_missing_size_use_the_default_size(client):
    for fields in ({"size": "auto"}, {"size": None}):
        body = client.post("/v1/images/generations", json={"prompt": "x", "num_inference_steps": 2, **fields}).json()
        assert decode(body["data"][0]["b64_json"]).size == (32, 32)


@pytest.mark.parametrize("quality, steps", [("low", 25), ("medium", 38), ("high", 50)])
def test_quality_picks_a_fraction_of_the_published_steps(client, quality, steps):
    by_quality = client.post(
        "/v1/images/generations", json={"prompt": "q", "size": "32x32", "seed": 4, "quality": quality}
    )
    by_steps = generate(client, prompt="q", seed=4, num_inference_steps=steps)
    assert by_quality.json()["data"][0]["b64_json"] == by_steps.json()["data"][0]["b64_json"]
    assert by_quality.json()["quality"] == quality


@pytest.mark.parametrize("output_format, pil_format", [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_format_sets_the_file_format(client, output_format, pil_format):
    body = generate(client, output_format=output_format).json()
    assert body["output_format"] == output_format
    assert decode(body["data"][0]["b64_json"]).format == pil_format


def test_output_compression_trades_jpeg_size_for_quality(client):
    sizes = [
        len(
            base64.b64decode(generate(client, output_format="jpeg", output_compression=c).json()["data"][0]["b64_json"])
        )
        for c in (10, 100)
    ]
    assert sizes[0] < sizes[1]


def test_url_response_format_serves_the_image_for_download(client):
    body = generate(client, response_format="url").json()
    item = body["data"][0]
    assert item["b64_json"] is None and item["url"].startswith(str(client.base_url))
    download = client.get(item["url"])
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(download.content)).size == (32, 32)


def test_unknown_or_expired_image_url_is_404(client):
    assert_error(client.get("/v1/images/files/0123456789abcdef"), 404, code="file_not_found")


def test_openai_fields_without_effect_are_accepted(client):
    response = generate(client, user="u-1", moderation="low", style="vivid", background="opaque",
                        safety_identifier="s", model="nextstep-tiny")  # fmt: skip
    assert response.status_code == 200, response.text


def test_stream_sends_partial_images_then_one_completed_event_per_image(client):
    response = generate(client, n=2, stream=True, partial_images=2)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    partial = [data for name, data in events if name == "image_generation.partial_image"]
    completed = [data for name, data in events if name == "image_generation.completed"]
    assert sorted((d["image_index"], d["partial_image_index"]) for d in partial) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [d["image_index"] for d in completed] == [0, 1]
    assert [name for name, _ in events][-2:] == ["image_generation.completed"] * 2
    for data in partial + completed:
        assert data["type"] in ("image_generation.partial_image", "image_generation.completed")
        assert decode(data["b64_json"]).size == (32, 32)
        assert data["size"] == "32x32" and data["output_format"] == "png" and isinstance(data["created_at"], int)
    assert completed[0]["usage"]["output_tokens"] == 4


def test_stream_without_partial_images_sends_only_completed(client):
    events = sse_events(generate(client, stream=True, partial_images=0).text)
    assert [name for name, _ in events] == ["image_generation.completed"]


def test_partial_images_without_stream_returns_plain_json(client):
    assert len(generate(client, partial_images=3).json()["data"]) == 1


# generation errors


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"n": "many"}, "n"),
        ({"size": "big"}, "size"),
        ({"size": "33x32"}, "size"),
        ({"size": "0x32"}, "size"),
        ({"size": "128x128"}, "size"),
        ({"response_format": "gif"}, "response_format"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": 101}, "output_compression"),
        ({"output_compression": -1}, "output_compression"),
        ({"background": "transparent"}, "background"),
        ({"background": "green"}, "background"),
        ({"quality": "ultra"}, "quality"),
        ({"partial_images": 4}, "partial_images"),
        ({"stream": "maybe"}, "stream"),
        ({"moderation": "high"}, "moderation"),
        ({"style": "bold"}, "style"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"image_guidance_scale": -0.5}, "image_guidance_scale"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 61}, "num_inference_steps"),
        ({"num_inference_steps": 1, "sampler": "legacy-sde"}, "num_inference_steps"),
        ({"sampler": "euler"}, "sampler"),
        ({"timesteps_shift": 0}, "timesteps_shift"),
        ({"guidance_schedule": "cosine"}, "guidance_schedule"),
        ({"negative_prompt": "no <image> here"}, "prompt"),
        ({"prompt": "draw <image>"}, "prompt"),
    ],
)
def test_invalid_field_is_a_400_naming_the_field(client, fields, param):
    error = assert_error(generate(client, **fields), 400, param=param)
    assert error["type"] == "invalid_request_error"


def test_missing_prompt_is_400(client):
    assert_error(client.post("/v1/images/generations", json={"size": "32x32"}), 400, param="prompt")


def test_unknown_field_is_rejected_as_openai_does(client):
    assert_error(generate(client, colour="red"), 400, param="colour", code="unknown_parameter")


def test_prompt_over_the_token_limit_is_400(client):
    assert_error(generate(client, prompt="word " * 200), 400, param="prompt", code="prompt_too_long")


def test_unknown_model_is_404_model_not_found(client):
    assert_error(generate(client, model="dall-e-3"), 404, param="model", code="model_not_found")


def test_body_that_is_not_json_or_not_an_object_is_400(client):
    headers = {"content-type": "application/json"}
    assert_error(client.post("/v1/images/generations", content=b"{nope", headers=headers), 400, code="invalid_json")
    assert_error(client.post("/v1/images/generations", content=b"[1, 2]", headers=headers), 400)


def test_oversized_body_is_413(client, server):
    big = b'{"prompt": "' + b"a" * (21 * 2**20) + b'"}'
    response = client.post("/v1/images/generations", content=big, headers={"content-type": "application/json"})
    assert_error(response, 413, code="request_too_large")


def test_unknown_route_and_wrong_method_get_error_bodies(client):
    assert_error(client.get("/v1/nothing"), 404, code="not_found")
    assert_error(client.get("/v1/images/generations"), 405, code="method_not_allowed")


# edits


def test_edit_returns_an_image_matching_the_reference_edit(client, tiny_bundle):
    source = png_bytes()
    response = edit(client, image=source, prompt="<image>make it blue", seed=9, num_inference_steps=3)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference_pixels(tiny_bundle, "<image>make it blue", 32, 32, 3, 9, image=Image.open(io.BytesIO(source)))
    assert np.array_equal(np.asarray(decode(body["data"][0]["b64_json"])), expected[0])
    assert body["usage"]["input_tokens_details"]["image_tokens"] == 4


def test_edit_prompt_without_image_marker_gets_one_in_front(client):
    with_marker = edit(client, prompt="<image>make it blue").json()["data"][0]["b64_json"]
    without = edit(client, prompt="make it blue").json()["data"][0]["b64_json"]
    assert with_marker == without


def test_edit_accepts_jpeg_and_webp_uploads_and_image_array_field(client):
    for fmt, mime in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        assert edit(client, image=png_bytes(fmt=fmt)).status_code == 200
    files = [("image[]", ("in.png", png_bytes(), "image/png"))]
    assert edit(client, files=files).status_code == 200


def test_edit_stream_uses_image_edit_event_names(client):
    events = sse_events(edit(client, stream="true", partial_images=1).text)
    assert [name for name, _ in events] == ["image_edit.partial_image", "image_edit.completed"]


@pytest.mark.parametrize(
    "files, param, code",
    [
        ([], "image", "missing_image"),
        ([("image", ("a.png", png_bytes(), "image/png")), ("image[]", ("b.png", png_bytes(), "image/png"))],
         "image", "too_many_images"),
        ([("image", ("a.png", png_bytes(), "image/png")), ("mask", ("m.png", png_bytes(), "image/png"))],
         "mask", "unsupported_parameter"),
        ([("image", ("a.txt", b"not an image", "image/png"))], "image", "invalid_image"),
        ([("image", ("a.gif", png_bytes(fmt="GIF"), "image/gif"))], "image", "invalid_image"),
        ([("image", ("a.png", png_bytes(size=(5000, 5000)), "image/png"))], "image", "invalid_image"),
        ([("image", ("a.png", png_bytes(), "image/png")), ("extra", ("x.png", b"x", "image/png"))],
         "extra", "unknown_parameter"),
    ],
)  # fmt: skip
def test_edit_with_bad_files_is_400(client, files, param, code):
    assert_error(edit(client, files=files), 400, param=param, code=code)


def test_edit_with_bad_fields_is_400(client):
    assert_error(edit(client, n=0), 400, param="n")
    assert_error(edit(client, prompt="<image> and <image>"), 400, param="prompt")
    assert_error(edit(client, colour="red"), 400, param="colour", code="unknown_parameter")
    assert_error(edit(client, background="transparent"), 400, param="background")


def test_edit_that_is_not_multipart_is_400(client):
    response = client.post("/v1/images/edits", json={"prompt": "x"})
    assert_error(response, 400, code="invalid_content_type")


def test_edit_upload_over_the_byte_limit_is_413(start_server):
    with start_server(max_upload_bytes=2000) as live, httpx.Client(base_url=live.url) as http:
        noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        noisy.save(buffer, format="PNG")
        assert_error(edit(http, image=buffer.getvalue()), 413, param="image", code="image_too_large")


# ops endpoints


def test_models_lists_the_served_model(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["nextstep-tiny"]
    assert client.get("/v1/models/nextstep-tiny").json()["id"] == "nextstep-tiny"
    assert_error(client.get("/v1/models/gpt-image-1"), 404, code="model_not_found")


def test_health_ready_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "nextstep:request_success_total" in metrics.text
    assert 'nextstep:http_requests_total{method="POST",route="/v1/images/generations",status="200"}' in metrics.text
    assert "nextstep:e2e_request_latency_seconds_bucket" in metrics.text


def test_openapi_schema_documents_both_image_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "multipart/form-data" in paths["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert "application/json" in paths["/v1/images/generations"]["post"]["requestBody"]["content"]


# auth


def test_api_keys_guard_the_v1_routes_only(start_server):
    with start_server(api_keys=("k1", "k2")) as live, httpx.Client(base_url=live.url) as http:
        assert_error(http.get("/v1/models"), 401, code="missing_api_key")
        assert_error(http.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, code="invalid_api_key")
        assert_error(http.get("/v1/models", headers={"Authorization": "Basic k1"}), 401)
        for key in ("k1", "k2"):
            assert http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
