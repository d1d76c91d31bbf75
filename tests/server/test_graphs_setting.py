"""cpu_graphs (server/api.py, models/graphs.py): on a CPU the served models run as frozen graphs, traced by the
warm-up, and serve the same images as eager."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.serving import make_settings, serve_app

REQUEST = {"prompt": "a red 7 on black", "steps": 1, "n": 2, "seed": 7}


async def _served(models_dir, graphs: bool):
    async with serve_app(make_settings(models_dir, cpu_graphs=graphs)) as c:
        model = c.engine.registry.models["tiny-student"].model
        traced = len(model.transformer.graphs) if model.uses_graphs else None  # after the warm-up, before requests
        r = await c.post("/v1/generate", json=REQUEST)
    assert r.status_code == 200, r.text
    pixels = [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(i["b64"]))), dtype=np.int16) for i in r.json()["images"]
    ]
    return model.uses_graphs, traced, pixels


@pytest.mark.anyio
async def test_cpu_graphs_serve_the_same_images_as_eager_and_are_traced_by_the_warm_up(models_dir):
    on, traced, with_graphs = await _served(models_dir, True)
    off, _, eager = await _served(models_dir, False)
    assert on and not off
    assert traced == 1  # the warm-up traced the student's transformer before any request
    for a, b in zip(with_graphs, eager, strict=True):
        assert np.abs(a - b).max() <= 1  # within 1/255
