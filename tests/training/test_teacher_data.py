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


def test_guided_trajectories_follow_the_teachers_own_cfg_sampler_and_are_cached(tiny_teacher, tmp_path):
    """Each trajectory's states equal the pipeline's CFG Euler sampler (models/pipeline.velocity_fn, another code
    path) run from its first state at its own scale, up to every grid point; the same key reads the file."""
    from fewstep.models.sampling import sample_euler
    from fewstep.training.distill.teacher_data import guided_trajectories

    teacher = TextToImage.load(tiny_teacher)
    base = dict(n=3, steps=4, guidance=(1.0, 4.0), directory=tmp_path, data="synthetic", seed=0, batch_size=2)
    traj = guided_trajectories(teacher, **base)
    assert traj.states.shape == (3, 4, *teacher.latent_shape) and traj.grid.tolist() == teacher.grid(4)
    assert ((traj.w >= 1.0) & (traj.w <= 4.0)).all() and len(set(traj.w.tolist())) == 3
    for i in range(3):
        fn = teacher.velocity_fn(teacher.encode_text([traj.captions[i]]), float(traj.w[i]))
        for k in range(1, 4):
            x = sample_euler(fn, traj.states[i : i + 1, 0], teacher.grid(4)[: k + 1])
            torch.testing.assert_close(x[0], traj.states[i, k], rtol=1e-4, atol=1e-5)
    [path] = tmp_path.glob("teacher-trajectories-*.safetensors")
    stamp = path.stat().st_mtime_ns
    again = guided_trajectories(teacher, **base)
    assert torch.equal(again.states, traj.states) and again.captions == traj.captions
    assert path.stat().st_mtime_ns == stamp  # read, not rewritten
    other = guided_trajectories(teacher, **{**base, "guidance": (2.0, 2.0)})
    assert (other.w == 2.0).all() and len(list(tmp_path.glob("teacher-trajectories-*"))) == 2
    draw = traj.draw(5, torch.Generator().manual_seed(0))
    assert draw["x_t"].shape == (5, *teacher.latent_shape) and set(draw["t"].tolist()) <= set(teacher.grid(4)[:-1])
