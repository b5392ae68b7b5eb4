"""The official openai SDK, pointed at a live server, generates, edits, streams and sees OpenAI errors."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

FAST = {"num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def client(start_server):
    with start_server(max_pixels=64 * 64, api_keys=("sk-test",)) as live:
        yield openai.OpenAI(base_url=f"{live.url}/v1", api_key="sk-test", max_retries=0, timeout=60)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def source_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (10, 200, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sdk_lists_the_model(client):
    assert [model.id for model in client.models.list()] == ["nextstep-tiny"]


def test_sdk_generates_images(client):
    result = client.images.generate(model="nextstep-tiny", prompt="a red circle", n=2, size="32x32", extra_body=FAST)
    assert len(result.data) == 2
    assert all(decode(item.b64_json).size == (32, 32) for item in result.data)
    assert result.usage.output_tokens == 8 and result.usage.input_tokens > 0


def test_sdk_generates_a_url(client):
    result = client.images.generate(prompt="a red circle", size="32x32", response_format="url", extra_body=FAST)
    assert result.data[0].url.startswith("http://127.0.0.1")


def test_sdk_edits_an_image(client):
    result = client.images.edit(
        image=("in.png", source_png(), "image/png"), prompt="make it red", size="32x32", output_format="webp",
        extra_body=FAST,
    )  # fmt: skip
    assert decode(result.data[0].b64_json).format == "WEBP"
    assert result.usage.input_tokens_details.image_tokens == 4


def test_sdk_streams_partial_and_completed_images(client):
    stream = client.images.generate(prompt="a red circle", size="32x32", stream=True, partial_images=2, extra_body=FAST)
    events = list(stream)
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    assert decode(events[-1].b64_json).size == (32, 32) and events[-1].usage.output_tokens == 4


def test_sdk_streams_an_edit(client):
    stream = client.images.edit(
        image=("in.png", source_png(), "image/png"), prompt="make it red", size="32x32", stream=True,
        partial_images=1, extra_body=FAST,
    )  # fmt: skip
    assert [event.type for event in stream] == ["image_edit.partial_image", "image_edit.completed"]


def test_sdk_raises_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="a red circle", size="30x30")
    assert bad.value.code == "invalid_value" and bad.value.param == "size"
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="a red circle")
    with pytest.raises(openai.BadRequestError):
        client.images.edit(image=("in.png", source_png(), "image/png"), prompt="x", mask=("m.png", source_png()))
    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="wrong").models.list()


def test_sdk_extra_body_reaches_the_server_for_edits_too(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.edit(
            image=("in.png", source_png(), "image/png"), prompt="x", extra_body={"num_inference_steps": 0}
        )
    assert bad.value.param == "num_inference_steps"
