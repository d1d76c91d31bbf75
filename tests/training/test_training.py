import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fewstep.training.config import TrainConfig, load_config
from fewstep.training.loop import lr_at, train
from fewstep.training.stages import make_recipe
from tests.helpers import tiny_config, tiny_distill


def _losses(path):
    return [json.loads(line)["loss"] for line in open(path / "metrics.jsonl")]


def test_teacher_loss_falls_on_a_tiny_run(tiny_ae, tmp_path):
    cfg = tiny_config(tmp_path, stage="teacher", autoencoder=str(tiny_ae), max_steps=60, warmup_steps=5, lr=1e-2)
    train(cfg, make_recipe(cfg), quiet=True)
    losses = _losses(tmp_path)
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # from v = 0 (loss ≈ E‖ε − x0‖² ≈ 2) towards the conditional mean; 0.85 leaves room for noise
    assert last < 0.85 * first, (first, last)
    assert (tmp_path / "export" / "card.json").exists()


def test_autoencoder_and_classifier_losses_fall(tmp_path):
    for stage, ratio in (("autoencoder", 0.9), ("classifier", 0.7)):
        cfg = tiny_config(tmp_path / stage, stage=stage, max_steps=60, warmup_steps=2, lr=1e-2, batch_size=32)
        train(cfg, make_recipe(cfg), quiet=True)
        losses = _losses(tmp_path / stage)
        assert sum(losses[-10:]) < ratio * sum(losses[:10]), (stage, losses[:10], losses[-10:])


class _Interrupt:
    """Wraps a recipe and stops the run (as Ctrl-C would) when it asks for batch ``at``."""

    def __init__(self, recipe, at):
        self.recipe, self.at, self.module, self.batches = recipe, at, recipe.module, 0

    def setup(self, ctx):
        self.recipe.setup(ctx)

    def make_batch(self, g):
        if self.batches == self.at:
            raise KeyboardInterrupt
        self.batches += 1
        return self.recipe.make_batch(g)

    def prepare(self, batch, device):
        return self.recipe.prepare(batch, device)

    def train_step(self, batch):
        return self.recipe.train_step(batch)

    def export(self, *a):
        return self.recipe.export(*a)


def test_resume_continues_exactly(tiny_ae, tmp_path):
    kw = dict(stage="teacher", autoencoder=str(tiny_ae), max_steps=8, ckpt_every=4)
    straight = tiny_config(tmp_path / "a", **kw)
    train(straight, make_recipe(straight), quiet=True)
    broken = tiny_config(tmp_path / "b", **kw)
    with pytest.raises(KeyboardInterrupt):
        train(broken, _Interrupt(make_recipe(broken), at=5), quiet=True)
    info = train(broken, make_recipe(broken), quiet=True)  # resumes from the step-4 state
    assert info.step == 8
    a = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    for k in a["module"]:
        assert torch.equal(a["module"][k], b["module"][k]), k


def _ddp_worker(rank, world, init_file, cfg):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        train(cfg, make_recipe(cfg), quiet=True)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tiny_ae, tmp_path):
    kw = dict(stage="teacher", autoencoder=str(tiny_ae), max_steps=3, batch_size=8, max_minutes=30.0)
    single = tiny_config(tmp_path / "single", **kw)
    torch.set_num_threads(1)
    try:
        train(single, make_recipe(single), quiet=True)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    double = tiny_config(tmp_path / "ddp", **kw)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), double), nprocs=2, join=True)
    a = torch.load(tmp_path / "single" / "state.pt", weights_only=True)["module"]
    b = torch.load(tmp_path / "ddp" / "state.pt", weights_only=True)["module"]
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst
    changed = max(float((a[k] - make_recipe(single).module.state_dict()[k]).abs().max()) for k in a)
    assert changed > 1e-3  # the runs did train


def test_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: teacher\nlr: 0.001\nbetas: [0.9, 0.95]\n")
    cfg = load_config(TrainConfig, path, ["lr=3e-4", "max_steps=7", "ema_warmup=false", "autoencoder=none"])
    assert cfg.lr == 3e-4 and cfg.max_steps == 7 and cfg.ema_warmup is False and cfg.betas == (0.9, 0.95)
    assert cfg.autoencoder is None
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(TrainConfig, path, ["learning_rate=1"])
    with pytest.raises(ValueError, match="max_steps: expected int"):
        load_config(TrainConfig, path, ["max_steps=ten"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(TrainConfig, path, ["lr"])


def test_lr_warms_up_then_decays_by_steps_or_by_the_clock():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.55)
    assert lr_at(cfg, 110) == pytest.approx(0.1)
    timed = TrainConfig(lr=1.0, warmup_steps=10, max_steps=10_000, max_minutes=1.0, min_lr_ratio=0.1)
    assert lr_at(timed, 20, seconds=60.0) == pytest.approx(0.1)


def test_nested_sections_and_none_means_inherit(tmp_path):
    from fewstep.training.distill.config import DistillConfig

    path = tmp_path / "d.yaml"
    path.write_text("method: dmd2\nlr: 0.001\ndmd2:\n  fake_updates: 3\n")
    cfg = load_config(DistillConfig, path, ["dmd2.gan_weight=0.01", "consistency.student_steps=1,2"])
    assert cfg.dmd2.fake_updates == 3 and cfg.dmd2.gan_weight == 0.01 and cfg.dmd2.fake_lr is None
    assert cfg.consistency.student_steps == (1, 2) and cfg.teacher_guidance is None and cfg.max_minutes is None
    assert cfg.settings is cfg.dmd2
    with pytest.raises(ValueError, match=r"unknown config keys \['dmd2.fake_steps'\]"):
        load_config(DistillConfig, path, ["dmd2.fake_steps=2"])
    with pytest.raises(ValueError, match="dmd2.fake_updates: expected int"):
        load_config(DistillConfig, path, ["dmd2.fake_updates=many"])


def test_auxiliary_networks_resume_and_export(tiny_teacher, tmp_path):
    """DMD2's fake score is an Auxiliary: its weights and optimiser are in the run state and it is exported."""
    from fewstep.training.distill.methods import distill

    cfg = tiny_distill(tmp_path, tiny_teacher, method="dmd2", batch_size=2, dmd2={"fake_updates": 1})
    distill(cfg)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert set(state["aux"]) == {"fake_score"} and state["aux"]["fake_score"]["opt"]["state"]
    assert (tmp_path / "auxiliary" / "fake_score.safetensors").exists()
    # resuming a finished run loads the auxiliary's state and trains no further
    info = distill(cfg)
    assert info == [tmp_path / "export"]


def test_dmd2_batches_shard_along_the_batch(tiny_teacher):
    """Every tensor of a DMD2 batch has the batch first, so two DDP ranks each get half of every update's draws."""
    from fewstep.training.distill.common import load_teacher
    from fewstep.training.distill.dmd2 import DMD2Recipe
    from fewstep.training.loop import shard

    cfg = tiny_distill("unused", tiny_teacher, method="dmd2", dmd2={"fake_updates": 3, "generator_steps": 4})
    batch = DMD2Recipe(cfg, load_teacher(cfg.teacher)).make_batch(torch.Generator().manual_seed(0))
    half = shard(batch, rank=1, world=2)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            assert value.shape[0] == 4 and half[key].shape[0] == 2, key
    assert half["fake_t"].shape == (2, 3) and half["sim_noise"].shape[1] == 5  # 4 steps: 5 grid points


def test_set_rejects_a_value_then_a_section_and_takes_a_scalar_tuple():
    from fewstep.training.distill.config import DistillConfig

    with pytest.raises(ValueError, match="was set to a value"):
        load_config(DistillConfig, None, ["consistency=1", "consistency.grid_steps=2"])
    assert load_config(DistillConfig, None, ["consistency.student_steps=4"]).consistency.student_steps == (4,)
