"""The official openai client against /v1/images/generations, unchanged."""

import base64
import io

import openai
import pytest
from PIL import Image


@pytest.fixture()
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def test_openai_client_gets_images(client):
    result = client.images.generate(model="tiny-student", prompt="a red 7 on black", n=2, size="32x32",
                                    response_format="b64_json", quality="low")
    assert len(result.data) == 2
    for item in result.data:
        assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size == (32, 32)
    assert result.size == "32x32" and result.output_format == "png" and result.quality == "low"


def test_quality_maps_to_steps_and_teacher(live, client):
    raw = client.images.with_raw_response.generate(prompt="a red 7 on black", quality="high")
    assert raw.headers["x-served-by"] == "tiny-student" and raw.headers["x-steps"] == "4"
    raw = client.images.with_raw_response.generate(prompt="a red 7 on black", quality="teacher")
    assert raw.headers["x-served-by"] == "tiny-teacher" and raw.headers["x-fallback-reason"] == "teacher_requested"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "1024x1024"}, "size"),
        ({"response_format": "url"}, "response_format"),
        ({"n": 50}, "n"),
        ({"model": "dall-e-3"}, "model"),
    ],
)
def test_openai_errors_have_openai_shape(client, kwargs, param):
    with pytest.raises(openai.APIStatusError) as info:
        client.images.generate(prompt="a red 7 on black", **kwargs)
    err = info.value.body if isinstance(info.value.body, dict) else {}
    err = err.get("error", err)
    assert err["param"] == param and err["message"] and err["type"]
    assert info.value.status_code in (400, 404)
