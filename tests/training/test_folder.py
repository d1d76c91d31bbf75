"""Your own data (training/folder.py): a folder of captioned images trains an autoencoder and a teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.models.pipeline import TextToImage
from fewstep.training.data import load_data, sample_batch, vocabulary
from tests.helpers import run_stage


def make_folder(root, n=40, sidecar=True):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        shape = "square" if i % 2 else "stripe"
        img = np.zeros((48, 64, 3), np.uint8)  # not square, not 32: cropped and resized at load
        img[10:30, 20:40] = rng.integers(0, 255, 3) if shape == "square" else 0
        img[:, ::8] = 255 if shape == "stripe" else img[:, ::8]
        Image.fromarray(img).save(root / f"img{i:03d}.png")
        caption = f"a {shape} number {i % 3}"
        if sidecar:
            (root / f"img{i:03d}.txt").write_text(caption)
        rows.append({"file_name": f"img{i:03d}.png", "text": caption})
    if not sidecar:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


@pytest.mark.parametrize("sidecar", [True, False], ids=["txt-sidecars", "metadata-jsonl"])
def test_folder_loads_splits_and_samples(tmp_path, sidecar):
    root = make_folder(tmp_path / "imgs", sidecar=sidecar)
    train, valid = load_data(f"folder:{root}", "train"), load_data(f"folder:{root}", "valid")
    assert len(train) == 38 and len(valid) == 2  # every 20th image held out
    assert train.images.shape == (38, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.captions[0] == "a stripe number 0"
    assert set(vocabulary(train)) == {"a", "number", "square", "stripe", "0", "1", "2"}
    b = sample_batch(train, 5, torch.Generator().manual_seed(0))
    assert b.images.shape == (5, 3, 32, 32) and b.images.min() >= -1 and b.images.max() <= 1
    assert all(c in train.captions for c in b.captions)


def test_folder_errors_name_the_problem(tmp_path):
    root = make_folder(tmp_path / "imgs", n=3)
    (root / "img001.txt").unlink()
    with pytest.raises(ValueError, match=r"img001.png: no caption; add img001.txt"):
        load_data(f"folder:{root}")
    with pytest.raises(ValueError, match="does not exist"):
        load_data(f"folder:{tmp_path / 'nope'}")
    (root / "metadata.jsonl").write_text('{"file_name": "img000.png"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: expected"):
        load_data(f"folder:{root}")


def test_teacher_trains_on_a_folder_and_samples(tmp_path):
    root = make_folder(tmp_path / "imgs")
    data = f"folder:{root}"
    ae = run_stage(tmp_path / "ae", stage="autoencoder", name="my-ae", data=data, max_steps=2)
    teacher = run_stage(
        tmp_path / "teacher", stage="teacher", name="my-teacher", data=data, autoencoder=str(ae), max_steps=2
    )
    model = TextToImage.load(teacher)
    ids, _ = model.tokenizer.encode(["a square number 1"])
    assert (ids != model.tokenizer.index["[UNK]"]).all()  # its own words are in the vocabulary
    assert model.card.data["captions"] == "folder"
    images = model.generate(["a square number 1"], [0], steps=2)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
