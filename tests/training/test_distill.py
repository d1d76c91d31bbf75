"""Every distillation method end to end on the tiny teacher, and every loss against hand-computed values."""

import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from fewstep.errors import UsageError
from fewstep.models.checkpoint import read_card
from fewstep.models.flow import CONSISTENCY_FORMS, consistency_coefficients, consistency_function
from fewstep.models.pipeline import TextToImage
from fewstep.training.config import LOOP_FIELDS
from fewstep.training.distill.common import velocity
from fewstep.training.distill.config import DistillConfig
from fewstep.training.distill.losses import (
    dmd_gradient,
    dmd_loss,
    hinge_discriminator,
    hinge_generator,
    progressive_velocity_target,
    pseudo_huber,
)
from fewstep.training.distill.methods import distill
from fewstep.training.recipe import Context
from tests.helpers import tiny_distill

ZOO = Path(__file__).resolve().parents[2] / "zoo"


@pytest.mark.parametrize(
    ("method", "changes", "expect_steps"),
    [
        ("progressive", {}, [[2], [1]]),
        ("consistency", {}, [[1, 2, 4]]),
        ("reflow", {}, [[1, 2, 4, 8], [1, 2, 4]]),
        ("dmd2", {}, [[1]]),
        ("dmd2", {"dmd2": {"generator_steps": 4, "fake_updates": 2}}, [[4]]),
        ("ladd", {}, [[1, 2, 4]]),
        ("guidance", {"guidance": {"student_steps": [4]}}, [[4]]),
    ],
)
def test_method_yields_loadable_students(tiny_teacher, tmp_path, method, changes, expect_steps):
    students = distill(tiny_distill(tmp_path, tiny_teacher, method=method, **changes))
    assert [read_card(s).sampling.supported_steps() for s in students] == expect_steps
    teacher_card = read_card(tiny_teacher)
    for path in students:
        card = read_card(path)
        assert card.role == "student" and card.training["method"] == method
        # the card records the loop's settings and this method's section only, no other method's knobs
        assert set(card.training["loop"]) == set(LOOP_FIELDS)
        section = {f.name for f in fields(getattr(DistillConfig(), method))}
        assert set(card.training["settings"]) == {"teacher", "teacher_guidance", *section}
        assert card.teacher.name == teacher_card.name
        assert card.teacher.sha256 == teacher_card.files["transformer.safetensors"].sha256
        student = TextToImage.load(path)
        for steps in card.sampling.supported_steps():
            images = student.generate(["a red 7 on black", "two in blue on a white background"], [1, 2], steps=steps)
            assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
        # any count up to 8 samples on the uniform grid; which counts it serves is what its card lists or measured
        assert 3 not in card.serves_steps() and student.supports(3) and not student.supports(9)
        with pytest.raises(ValueError, match="supports steps"):
            student.generate(["a red 7 on black"], [1], steps=9)


def test_a_progressive_round_halves_the_step_count(tiny_teacher, tmp_path):
    students = distill(
        tiny_distill(tmp_path, tiny_teacher, method="progressive", max_steps=3, sets=["progressive.start_steps=8"])
    )
    cards = [read_card(s) for s in students]
    assert [c.training["resolved"]["round_teacher_steps"] for c in cards] == [8, 4, 2]
    assert [c.sampling.default_steps for c in cards] == [4, 2, 1]
    assert cards[0].sampling.timesteps["4"] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_consistency_function_is_the_identity_at_the_boundary():
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for form in CONSISTENCY_FORMS:
        assert torch.equal(consistency_function(x, v, torch.zeros(3), form=form), x)
        c_skip, c_out = consistency_coefficients(torch.tensor([0.0]), form=form)
        assert (c_skip.item(), c_out.item()) == (1.0, 0.0)


def test_consistency_student_starts_as_the_teachers_x0_estimate():
    """LCM's c_out -> 1: away from t = 0, f(x, t) is the network's own x0 estimate x − t·v, so a student
    initialised from the teacher starts where the teacher is (Luo et al. 2023). EDM's raw-output c_out -> σd
    would start it at half scale."""
    x, v = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([1 / 32, 0.25, 0.5, 1.0])
    x0_hat = x - t.view(-1, 1, 1, 1) * v
    f = consistency_function(x, v, t, sigma_data=0.5, scale=1000.0)
    assert (f - x0_hat).abs().max() < 1e-3 * x0_hat.abs().max()
    c_skip, c_out = consistency_coefficients(torch.tensor([0.5]))
    assert float(c_out) == pytest.approx(500 / math.sqrt(500**2 + 0.25))
    assert float(c_skip) == pytest.approx(0.25 / (500**2 + 0.25))


def test_students_saved_with_the_edm_scaling_sample_exactly_as_before(tmp_path):
    """A card that names the old form ("consistency": no zoo student has it since issue 13, but users' may) keeps
    c_out = σd·s / sqrt(s² + σd²): its denoiser is the EDM-form consistency function of the same velocity."""
    import shutil

    from fewstep.models.checkpoint import update_card

    shutil.copytree(ZOO / "digits-consistency", tmp_path / "old")
    update_card(tmp_path / "old", parameterization="consistency")
    model = TextToImage.load(tmp_path / "old")
    assert model.card.parameterization == "consistency"
    g = torch.Generator().manual_seed(0)
    x, v, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1.0, 0.5])
    x0 = model.denoiser(lambda x_, t_: v)(x, t)
    c_skip, c_out = consistency_coefficients(
        t, model.sampling.sigma_data, model.sampling.boundary_scale, form="consistency"
    )
    expected = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * (x - t.view(-1, 1, 1, 1) * v)
    torch.testing.assert_close(x0, expected)
    _, c_out = consistency_coefficients(torch.tensor([0.5]), form="consistency")
    assert float(c_out) == pytest.approx(0.5 * 500 / math.sqrt(500**2 + 0.25))
    with pytest.raises(ValueError, match="unknown consistency parameterisation"):
        consistency_coefficients(torch.tensor([0.5]), form="edm")


def test_pseudo_huber_by_hand():
    diff = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert float(pseudo_huber(diff, c=1.0)) == pytest.approx(((math.sqrt(26) - 1) + 0.0) / 2)


def test_progressive_target_by_hand():
    # teacher lands at 0.5 from 1.0 over t: 1 -> 0.5; one student step of -0.5 needs v = 1
    x_t, x_target = torch.tensor([[1.0]]), torch.tensor([[0.5]])
    v = progressive_velocity_target(x_t, x_target, torch.tensor([1.0]), torch.tensor([0.5]))
    assert v.item() == pytest.approx(1.0)


def test_dmd_gradient_and_loss_by_hand():
    x = torch.tensor([[1.0, 1.0]], requires_grad=True)
    x0_real, x0_fake = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5, 1.0]])
    grad = dmd_gradient(x.detach(), x0_real, x0_fake)
    # p_real = [1, 1], p_fake = [0.5, 0], mean|p_real| = 1
    assert grad.tolist() == [[0.5, 1.0]]
    loss = dmd_loss(x, grad)
    assert float(loss.detach()) == pytest.approx(0.5 * (0.25 + 1.0) / 2)
    loss.backward()
    assert x.grad[0].tolist() == pytest.approx([0.25, 0.5])  # grad / numel


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([0.5, 2.0]), torch.tensor([-2.0, 0.0])
    assert float(hinge_discriminator(real, fake)) == pytest.approx(0.25 + 0.5)
    assert float(hinge_generator(fake)) == pytest.approx(1.0)


def test_reflow_loss_on_a_fixed_input(tiny_teacher):
    from fewstep.training.distill.common import build_student
    from fewstep.training.distill.reflow import ReflowLoss

    teacher = TextToImage.load(tiny_teacher)
    student = build_student(teacher)
    with torch.no_grad():  # a student whose velocity is exactly zero everywhere
        student.final_layer.linear.weight.zero_()
        student.final_layer.linear.bias.zero_()
    z, x = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    loss, _ = ReflowLoss(student)(z, x, torch.tensor([0.3, 1.0]), teacher.encode_text(["a", "b"]))
    assert float(loss.detach()) == pytest.approx(float((z - x).pow(2).mean()), rel=1e-6)


@pytest.mark.parametrize("form", CONSISTENCY_FORMS)
def test_consistency_loss_on_a_fixed_input(tiny_teacher, form):
    from fewstep.training.distill.consistency import ConsistencyRecipe
    from fewstep.training.distill.losses import default_huber_c

    # boundary_scale 1: c_skip + c_out differs visibly between t and s (at 1000 both are ~1 in the LCM form)
    sets = ["consistency.target_ema=0", "consistency.boundary_scale=1", f"consistency.parameterization={form}"]
    cfg = tiny_distill("unused", tiny_teacher, method="consistency", sets=sets)
    teacher = TextToImage.load(tiny_teacher)
    for net in (teacher.transformer,):
        with torch.no_grad():  # zero velocity: the teacher step keeps x, f = (c_skip + c_out)·x
            net.final_layer.linear.weight.zero_()
            net.final_layer.linear.bias.zero_()
    recipe = ConsistencyRecipe(cfg, teacher)
    recipe.setup(Context(device=torch.device("cpu"), module=recipe.module))
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, s = torch.tensor([0.5, 0.25]), torch.tensor([0.25, 0.0])
    batch = {
        "x0": x0,
        "noise": noise,
        "t": t,
        "s": s,
        "w": torch.tensor([2.0, 3.0]),
        "cond": teacher.encode_text(["a red 7 on black", "a"]),
    }
    loss, _ = recipe.train_step(batch)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    ct, ot = consistency_coefficients(t, scale=1.0, form=form)
    cs, os_ = consistency_coefficients(s, scale=1.0, form=form)
    assert ((ct + ot) - (cs + os_)).abs().min() > 0.01
    diff = ((ct + ot) - (cs + os_)).view(-1, 1, 1, 1) * x_t
    assert float(loss.detach()) == pytest.approx(float(pseudo_huber(diff, default_huber_c(256))), rel=1e-5)


def test_snapshots_export_the_ema_student_during_training(tiny_teacher, tmp_path):
    """snapshot_minutes: a loadable student under OUT/snapshots/step-N at each interval, the final export as
    before, and the run's own EMA untouched by the snapshot's export (it moves its copy to the CPU)."""
    cfg = tiny_distill(tmp_path, tiny_teacher, method="dmd2", max_steps=3, snapshot_minutes=1e-9)
    (final,) = distill(cfg)
    snapshots = sorted((tmp_path / "snapshots").iterdir())
    assert [p.name for p in snapshots] == ["step-000001", "step-000002", "step-000003"]
    cards = [read_card(p) for p in snapshots]
    assert [c.training["steps"] for c in cards] == [1, 2, 3]
    assert all(c.training["duration_s"] <= read_card(final).training["duration_s"] for c in cards)
    last = TextToImage.load(snapshots[-1]).transformer.state_dict()
    exported = TextToImage.load(final).transformer.state_dict()
    assert all(torch.equal(last[k], exported[k]) for k in exported)  # step 3's snapshot is the final EMA


def test_guidance_distillation_target_by_hand(tiny_teacher, tmp_path):
    """At initialisation the student is the teacher's conditional branch (zero-initialised w-embedding), so its
    training loss against CFG's v_u + w·(v_c − v_u) is (w − 1)²·‖v_c − v_u‖²: zero at w = 1, four times as large
    at 3 as at 2. Through train_step: the recipe's own target (conditional and empty caption the right way round)."""
    from fewstep.models.flow import interpolate
    from fewstep.training.distill.guidance import GuidanceRecipe

    teacher = TextToImage.load(tiny_teacher)
    recipe = GuidanceRecipe(tiny_distill(tmp_path, tiny_teacher, method="guidance"), teacher)
    recipe.setup(Context(torch.device("cpu"), recipe.module, 1, (0.9, 0.99), None))
    g = torch.Generator().manual_seed(0)
    x0, noise, t = (
        torch.randn(1, *teacher.latent_shape, generator=g),
        torch.randn(1, *teacher.latent_shape),
        torch.tensor([0.6]),
    )
    cond, empty = recipe.cond(["a red 7 on black"]), recipe.cond.empty(1)
    with torch.no_grad():
        x_t = interpolate(x0, noise, t)
        v_c, v_u = velocity(teacher.transformer, x_t, t, cond), velocity(teacher.transformer, x_t, t, empty)
        gap = (v_c - v_u).pow(2).mean().item()
        assert gap > 0
        for w in (1.0, 2.0, 3.0):
            batch = {"x0": x0, "noise": noise, "t": t, "cond": cond, "w": torch.tensor([w])}
            loss, _ = recipe.train_step(batch)
            assert loss.item() == pytest.approx((w - 1) ** 2 * gap, rel=1e-4, abs=1e-10)
    bad = tiny_distill(tmp_path, tiny_teacher, method="guidance", guidance={"guidance_min": 3, "guidance_max": 2})
    with pytest.raises(UsageError, match="empty or negative"):
        GuidanceRecipe(bad, teacher)


def test_guidance_then_progressive_keeps_w_as_an_input(tiny_teacher, tmp_path):
    """Stage 2: progressive distillation from a w-conditioned model gives few-step students that still take w."""
    (stage1,) = distill(tiny_distill(tmp_path / "g", tiny_teacher, method="guidance", guidance={"student_steps": [4]}))
    card1 = read_card(stage1)
    assert card1.model["transformer"]["guidance_embed"] and card1.training["resolved"]["guidance_range"] == [1.0, 4.0]
    students = distill(tiny_distill(tmp_path / "p", stage1, method="progressive"))
    for path in students:
        card = read_card(path)
        assert card.model["transformer"]["guidance_embed"]
        assert card.training["resolved"]["guidance_range"] == [1.0, 4.0]  # stage 1's range, inherited
        assert card.sampling.guidance == card1.sampling.guidance  # the default w; requests may set another
        model = TextToImage.load(path)
        steps = card.sampling.default_steps
        a = model.generate(["a red 7 on black"], [0], steps=steps, guidance=1.0)
        b = model.generate(["a red 7 on black"], [0], steps=steps, guidance=4.0)
        assert torch.isfinite(a).all() and torch.isfinite(b).all() and not torch.equal(a, b)
    # the CFG teacher's chain distils guidance in: no w input, default 1
    (cfg_student, *_) = distill(tiny_distill(tmp_path / "c", tiny_teacher, method="progressive"))
    assert not read_card(cfg_student).model["transformer"]["guidance_embed"]
    assert read_card(cfg_student).sampling.guidance == 1.0


def test_guidance_distillation_on_the_teachers_trajectories(tiny_teacher, tmp_path):
    """trajectory_fraction 1: every row of a batch is a state of the teacher's guided sampler (its time on the
    grid, its trajectory's w and caption); 0 builds nothing and draws the batch as before; the run trains."""
    from fewstep.training.distill.guidance import GuidanceRecipe

    teacher = TextToImage.load(tiny_teacher)
    traj = {"trajectory_fraction": 1.0, "trajectories": 4, "student_steps": [4]}
    cfg = tiny_distill(tmp_path / "t", tiny_teacher, method="guidance", guidance=traj)
    recipe = GuidanceRecipe(cfg, teacher)
    recipe.setup(Context(torch.device("cpu"), recipe.module, 1, (0.9, 0.99), None))
    bank = recipe.trajectories
    assert bank is not None and bank.states.shape[:2] == (4, 4)
    batch = recipe.make_batch(torch.Generator().manual_seed(0))
    assert batch["on_trajectory"].all()
    for x, t, w, c in zip(batch["x_trajectory"], batch["t"], batch["w"], batch["captions"], strict=True):
        i, k = next((i, k) for i in range(4) for k in range(4) if torch.equal(bank.states[i, k], x))
        assert t == bank.grid[k] and w == bank.w[i] and c == bank.captions[i]
    prepared = recipe.prepare(batch, torch.device("cpu"))
    loss, _ = recipe.train_step(prepared)
    assert torch.isfinite(loss) and loss > 0
    plain = GuidanceRecipe(tiny_distill(tmp_path / "p", tiny_teacher, method="guidance"), teacher)
    plain.setup(Context(torch.device("cpu"), plain.module, 1, (0.9, 0.99), None))
    assert plain.trajectories is None and "on_trajectory" not in plain.make_batch(torch.Generator().manual_seed(0))
    (student,) = distill(cfg)
    assert read_card(student).training["resolved"]["guidance_range"] == [1.0, 4.0]
    with pytest.raises(UsageError, match="trajectory_fraction"):
        GuidanceRecipe(tiny_distill(tmp_path, tiny_teacher, method="guidance", guidance={"trajectory_fraction": 2}),
                       teacher)  # fmt: skip
