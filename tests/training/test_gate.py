"""The quality gate's pieces (training/gate.py): thresholds and AUC by hand, a critic that learns a separable
labelling, and `fewstep train-gate` + `fewstep calibrate-gate` on a tiny student writing the student's card."""

import subprocess
import sys

import pytest
import torch

from fewstep.models.checkpoint import read_card
from fewstep.models.critic import Critic, load_critic
from fewstep.training.gate import Samples, auc, thresholds, train_critic
from tests.serving import build_models_dir


def test_thresholds_send_the_asked_share_per_step_count():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0, 0.05, 0.95])
    steps = torch.tensor([1] * 10 + [2] * 2)
    got = thresholds(scores, steps, rate=0.2)
    # 1 step: ten scores, the 2 lowest (0.1, 0.2) go: midway to the third (0.3); 2 steps: ceil(0.4) = 1 goes
    assert got == pytest.approx({1: (0.2 + 0.3) / 2, 2: (0.05 + 0.95) / 2})
    assert int((scores[:10] < got[1]).sum()) == 2


def test_auc_by_hand():
    right = torch.tensor([True, True, False, False])
    assert auc(torch.tensor([0.9, 0.4, 0.5, 0.1]), right) == 0.75  # pairs: (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1)
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), right) == 0.5
    assert auc(torch.tensor([0.5, 0.6]), torch.tensor([True, True])) is None


def test_the_critic_learns_a_labelling_it_can_see():
    g = torch.Generator().manual_seed(0)
    n = 600
    images = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1  # small: the critic pools to 4×4 whatever the size
    pooled = torch.randn(n, 16, generator=g)
    # "right" when the image's red mean agrees in sign with the prompt embedding's first coordinate
    right = (images[:, 0].mean((1, 2)) > 0) == (pooled[:, 0] > 0)
    images[:, 0] += torch.where(images[:, 0].mean((1, 2)) > 0, 0.5, -0.5).view(-1, 1, 1)  # make it visible
    flipped = pooled.clone()
    flipped[:, 0] = -flipped[:, 0]  # the "prompt" with the attribute the image shows changed: a hard negative
    samples = Samples(images, pooled, right, torch.ones(n), flipped)
    critic, report = train_critic(samples, iters=200, batch_size=64, lr=3e-3, progress=False)
    assert report["val_auc"] > 0.9, report
    assert isinstance(critic, Critic)


def test_train_gate_and_calibrate_gate_write_the_students_card(tiny_teacher, tiny_classifier, tmp_path):
    root = build_models_dir(tmp_path / "models", tiny_teacher)
    run = [sys.executable, "-m", "fewstep.cli"]
    common = ["--model", str(root / "tiny-student"), "--classifier", str(tiny_classifier), "--steps", "1,2"]
    r = subprocess.run([*run, "train-gate", *common, "--n", "40", "--iters", "5"], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    critic_card = read_card(root / "tiny-student-gate")
    assert critic_card.role == "gate" and critic_card.training["samples"] == 80
    load_critic(root / "tiny-student-gate")
    r = subprocess.run([*run, "calibrate-gate", *common, "--n", "40", "--rate", "0.25"], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    gate = read_card(root / "tiny-student").gate
    assert gate.name == "tiny-student-gate" and gate.rate == 0.25 and set(gate.thresholds) == {"1", "2"}
    assert gate.sha256 == critic_card.files["critic.safetensors"].sha256
    for m in gate.measured.values():  # ceil(0.25 * 40) = 10 of 40 sent on, unless scores tie
        assert 0.2 <= m["sent"] <= 0.3
    again = subprocess.run([*run, "train-gate", *common, "--n", "40", "--iters", "5"], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert again.returncode != 0 and "already exists" in again.stderr  # nothing saved is overwritten silently
