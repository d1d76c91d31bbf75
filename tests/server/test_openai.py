"""The official openai client against /v1/images/generations, unchanged: in-process through httpx's
ASGITransport, and once against a real uvicorn server."""

import base64
import io

import httpx
import openai
import pytest
from PIL import Image


def _check_images(result, n: int) -> None:
    assert len(result.data) == n
    for item in result.data:
        assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size == (32, 32)
    assert result.size == "32x32" and result.output_format == "png" and result.quality == "low"


@pytest.fixture()
async def client(api):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app), timeout=60)
    async with openai.AsyncOpenAI(
        base_url="http://fewstep.test/v1", api_key="unused", max_retries=0, http_client=http
    ) as c:
        yield c


@pytest.mark.anyio
async def test_openai_client_gets_images(client):
    result = await client.images.generate(
        model="tiny-student", prompt="a red 7 on black", n=2, size="32x32", response_format="b64_json", quality="low"
    )
    _check_images(result, 2)


@pytest.mark.slow
def test_openai_client_gets_images_from_a_real_server(live):
    with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0) as client:
        result = client.images.generate(
            model="tiny-student",
            prompt="a red 7 on black",
            n=2,
            size="32x32",
            response_format="b64_json",
            quality="low",
        )
        _check_images(result, 2)
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(prompt="a red 7 on black", size="1024x1024")
    err = info.value.body if isinstance(info.value.body, dict) else {}
    assert err.get("error", err)["param"] == "size" and info.value.status_code == 400


@pytest.mark.anyio
async def test_quality_maps_to_steps_and_teacher(client):
    raw = await client.images.with_raw_response.generate(prompt="a red 7 on black", quality="high")
    assert raw.headers["x-served-by"] == "tiny-student" and raw.headers["x-steps"] == "4"
    raw = await client.images.with_raw_response.generate(prompt="a red 7 on black", quality="teacher")
    assert raw.headers["x-served-by"] == "tiny-teacher" and raw.headers["x-fallback-reason"] == "teacher_requested"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "1024x1024"}, "size"),
        ({"response_format": "url"}, "response_format"),
        ({"n": 50}, "n"),
        ({"model": "dall-e-3"}, "model"),
    ],
)
async def test_openai_errors_have_openai_shape(client, kwargs, param):
    with pytest.raises(openai.APIStatusError) as info:
        await client.images.generate(prompt="a red 7 on black", **kwargs)
    err = info.value.body if isinstance(info.value.body, dict) else {}
    err = err.get("error", err)
    assert err["param"] == param and err["message"] and err["type"]
    assert info.value.status_code in (400, 404)
