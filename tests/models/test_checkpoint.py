import json
import shutil
import subprocess
import sys

import pytest
import torch

from fewstep.models.checkpoint import CheckpointError, read_card
from fewstep.models.pipeline import TRANSFORMER, TextToImage


def test_round_trip_is_exact(tiny_teacher, tmp_path):
    model = TextToImage.load(tiny_teacher)
    copy = tmp_path / "copy"
    model.save(copy, model.card.model_dump(exclude={"files", "model"}), dtype="float32")
    again = TextToImage.load(copy)
    for name, module in model.modules().items():
        a, b = module.state_dict(), again.modules()[name].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert again.card.sampling == model.card.sampling
    assert again.tokenizer.vocab == model.tokenizer.vocab


def test_fp16_export_stores_half_weights(tiny_teacher, tmp_path):
    model = TextToImage.load(tiny_teacher)
    model.save(tmp_path / "half", model.card.model_dump(exclude={"files", "model"}), dtype="float16")
    half = TextToImage.load(tmp_path / "half")
    w = model.transformer.img_in.weight
    assert torch.equal(half.transformer.img_in.weight, w.half().float())
    assert (tmp_path / "half" / TRANSFORMER).stat().st_size < (tiny_teacher / TRANSFORMER).stat().st_size


def test_card_records_provenance(tiny_teacher):
    card = read_card(tiny_teacher)
    assert card.role == "teacher" and card.sampling.any_steps
    assert card.sampling.timesteps["4"] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert card.training["method"] == "rectified-flow" and card.training["steps"] == 3
    assert set(card.files) == {
        "transformer.safetensors",
        "text_encoder.safetensors",
        "autoencoder.safetensors",
        "tokenizer.json",
    }


def test_saving_never_overwrites_silently(tiny_teacher, tmp_path):
    model = TextToImage.load(tiny_teacher)
    card = model.card.model_dump(exclude={"files", "model"})
    model.save(tmp_path / "m", card)
    with pytest.raises(CheckpointError, match="already exists"):
        model.save(tmp_path / "m", card)
    model.save(tmp_path / "m", card, overwrite=True)


def _broken(src, tmp_path, name="broken"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "transformer.safetensors").unlink(), r"transformer\.safetensors: missing"),
        (lambda d: (d / "card.json").unlink(), r"card\.json: missing"),
        (lambda d: (d / "card.json").write_text("{not json"), r"card\.json: not valid JSON"),
        (lambda d: _truncate(d / "text_encoder.safetensors"), r"text_encoder\.safetensors: \d+ bytes, the card says"),
        (lambda d: _flip_byte(d / "autoencoder.safetensors"), r"autoencoder\.safetensors: sha256 does not match"),
        (
            lambda d: _edit_card(d, lambda c: c["model"]["transformer"].update(hidden_size=64, axes_dim=[8, 12, 12])),
            r"transformer\.safetensors: .*shape",
        ),
        (lambda d: _edit_card(d, lambda c: c.update(role="painter")), r"card\.json: role"),
        (lambda d: _edit_card(d, lambda c: c["model"].update(colour=1)), r"card\.json: model"),
    ],
)
def test_broken_checkpoints_give_one_clear_error(tiny_teacher, tmp_path, damage, message):
    d = _broken(tiny_teacher, tmp_path)
    damage(d)
    with pytest.raises(CheckpointError, match=message):
        TextToImage.load(d)


def test_cli_reports_a_broken_checkpoint_without_a_traceback(tiny_teacher, tmp_path):
    d = _broken(tiny_teacher, tmp_path)
    _truncate(d / "transformer.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red 7 on black\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fewstep.cli",
            "sample",
            "--model",
            str(d),
            "--prompts-file",
            str(prompts),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "transformer.safetensors" in r.stderr and "Traceback" not in r.stderr


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_card(d, fn):
    card = json.loads((d / "card.json").read_text())
    fn(card)
    (d / "card.json").write_text(json.dumps(card))
