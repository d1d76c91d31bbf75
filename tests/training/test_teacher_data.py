"""The teacher-data cache: keyed by everything that determines the samples, stored as safetensors."""

import pytest
import torch

from fewstep.models.pipeline import TextToImage
from fewstep.training.distill import teacher_data
from fewstep.training.distill.teacher_data import SampleKey, teacher_samples


@pytest.fixture
def counted(monkeypatch):
    """Counts the teacher ODE solves, so a test can tell a cache hit from a regeneration."""
    calls = []
    real = teacher_data.sample_euler

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_data, "sample_euler", spy)
    return calls


def test_same_key_reads_the_cache_and_any_change_regenerates(tiny_teacher, tmp_path, counted):
    teacher = TextToImage.load(tiny_teacher)
    base = dict(n=6, steps=2, guidance=2.0, directory=tmp_path, data="synthetic", seed=0)
    first = teacher_samples(teacher, **base)
    assert len(counted) == 1 and len(first) == 6
    [path] = tmp_path.glob("teacher-samples-*.safetensors")
    again = teacher_samples(teacher, **base)
    assert len(counted) == 1, "same key: read from the cache"
    assert torch.equal(again.latents, first.latents) and again.captions == first.captions
    for change in ({"n": 4}, {"steps": 3}, {"guidance": 1.0}, {"seed": 1}):
        out = teacher_samples(teacher, **{**base, **change})
        assert len(out) == change.get("n", 6)
    assert len(counted) == 5, "each changed key regenerated"
    assert len(list(tmp_path.glob("teacher-samples-*.safetensors"))) == 5  # nothing overwritten
    assert not torch.equal(teacher_samples(teacher, **{**base, "seed": 1}).noise, first.noise)
    assert path.exists()


def test_another_teacher_or_data_is_another_key(tiny_teacher, tmp_path):
    teacher = TextToImage.load(tiny_teacher)
    key = SampleKey(teacher.weights_sha256(), 2, 2.0, 0, "synthetic", 6)
    assert SampleKey("0" * 64, 2, 2.0, 0, "synthetic", 6).digest() != key.digest()
    assert SampleKey(teacher.weights_sha256(), 2, 2.0, 0, "digits", 6).digest() != key.digest()
    assert SampleKey(teacher.weights_sha256(), 2, 2.0, 0, "synthetic", 6, (16, 8, 8)).digest() != key.digest()


def test_a_file_under_the_name_but_for_another_key_is_regenerated(tiny_teacher, tmp_path, counted):
    teacher = TextToImage.load(tiny_teacher)
    kw = dict(n=4, steps=2, guidance=2.0, directory=tmp_path, data="synthetic", seed=0)
    teacher_samples(teacher, **kw)
    [path] = tmp_path.glob("teacher-samples-*.safetensors")
    other = SampleKey(teacher.weights_sha256(), 3, 2.0, 0, "synthetic", 4, tuple(teacher.latent_shape))
    other.path(tmp_path).rename(path) if other.path(tmp_path).exists() else None
    teacher_samples(teacher, **{**kw, "steps": 3})
    other.path(tmp_path).replace(path)  # the steps-3 file now sits under the steps-2 name
    teacher_samples(teacher, **kw)
    assert len(counted) == 3, "the stored key did not match: regenerated, not trusted"
