"""What each network of a two-network recipe sees, and when (issue: recipes as the papers wrote them)."""

from __future__ import annotations

import torch

from fewstep.models.flow import interpolate
from fewstep.models.pipeline import TextToImage
from fewstep.training.recipe import Context
from tests.helpers import randomize, tiny_distill


def _dmd2(tiny_teacher, *sets: str):
    from fewstep.training.distill.dmd2 import DMD2Recipe

    cfg = tiny_distill("unused", tiny_teacher, method="dmd2", sets=["batch_size=2", *sets])
    recipe = DMD2Recipe(cfg, TextToImage.load(tiny_teacher))
    randomize(recipe.module)  # the tiny teacher's output layer is near zero: make samples depend on the input
    recipe.setup(Context(device=torch.device("cpu"), module=recipe.module))
    batch = recipe.prepare(recipe.make_batch(torch.Generator().manual_seed(0)), torch.device("cpu"))
    return recipe, batch


def test_dmd2_fake_score_fits_fresh_batches_and_never_the_one_the_generator_is_judged_on(tiny_teacher):
    recipe, batch = _dmd2(tiny_teacher, "dmd2.fake_updates=3")
    generator_calls, fake_calls = [], []  # (input x, grad enabled), in call order
    recipe.module.register_forward_hook(
        lambda m, args, out: generator_calls.append((args[0].detach().clone(), out.detach(), torch.is_grad_enabled()))
    )
    recipe.fake.module.net.register_forward_pre_hook(
        lambda m, args: fake_calls.append((args[0].detach().clone(), len(generator_calls)))
    )
    recipe.train_step(batch)

    # the generator ran once per fake update, without gradients, on that update's own noise; then once, with
    # gradients, on its own batch: last, so the fake score had been updated on everything before it
    assert len(generator_calls) == 3 + 1
    for i, (x, _, grad) in enumerate(generator_calls[:3]):
        assert torch.equal(x, batch["fake_z"][:, i]) and not grad
    x, v, grad = generator_calls[3]
    assert torch.equal(x, batch["z"]) and grad
    # each fake update trained on its own samples (x0 = z − 1·v, re-noised to that update's t)
    for i in range(3):
        z, v_i, _ = generator_calls[i]
        t = batch["fake_t"][:, i].view(-1, 1, 1, 1)
        expected = interpolate(z - v_i, batch["fake_eps"][:, i], batch["fake_t"][:, i])
        first_fake_input = next(x for x, n_gen in fake_calls if n_gen == i + 1)
        assert torch.allclose(first_fake_input, expected, atol=1e-6), t
    # the generator's samples reach the fake score only after every fake update: to be judged, not fitted
    x_gen = batch["z"] - v
    judged = interpolate(x_gen, batch["dm_eps"], batch["dm_t"])
    seen_in_updates = [x for x, n_gen in fake_calls if n_gen <= 3]
    assert not any(torch.allclose(x, judged, atol=1e-5) for x in seen_in_updates)
    assert any(torch.allclose(x, judged, atol=1e-5) for x, n_gen in fake_calls if n_gen == 4)


def test_dmd2_fake_score_trains_at_the_noise_levels_it_is_queried_at(tiny_teacher):
    recipe, _ = _dmd2(tiny_teacher, "dmd2.fake_updates=2", "batch_size=2048")
    batch = recipe.make_batch(torch.Generator().manual_seed(1))
    lo, hi = recipe.s.t_min, recipe.s.t_max
    for key in ("fake_t", "dm_t", "gan_t"):  # U[t_min, t_max] everywhere: std (hi − lo)/√12, not logit-normal's
        t = batch[key].flatten()
        assert lo <= float(t.min()) and float(t.max()) <= hi
        assert abs(float(t.std()) - (hi - lo) / 12**0.5) < 0.01, key


def test_ladd_hinge_is_per_token_and_per_head_by_hand():
    from fewstep.training.distill.losses import hinge_discriminator, hinge_generator

    real = torch.tensor([[[2.0, 0.0], [0.5, 0.5]]])  # (B=1, heads=2, tokens=2)
    fake = torch.tensor([[[-2.0, 1.0], [0.0, 0.0]]])
    # real: head 0 hinges [0, 1] -> 0.5, head 1 [0.5, 0.5] -> 0.5; fake: head 0 [0, 2] -> 1, head 1 [1, 1] -> 1
    # (a hinge on the heads' summed token means would give relu(1 − 1.5) = 0 for real: the margin met on a sum)
    assert float(hinge_discriminator(real, fake)) == 0.5 + 0.5 + 1.0 + 1.0
    assert float(hinge_generator(fake)) == (2.0 - 1.0) / 2 + 0.0


def test_ladd_heads_give_every_token_of_every_head_a_logit_and_train_one_step_often(tiny_teacher, tmp_path):
    from fewstep.training.distill.ladd import LADDRecipe

    cfg = tiny_distill(tmp_path, tiny_teacher, method="ladd", sets=["ladd.samples=8", "ladd.sample_steps=2"])
    recipe = LADDRecipe(cfg, TextToImage.load(tiny_teacher))
    tf = recipe.teacher.transformer
    x = torch.randn(3, *recipe.teacher.latent_shape)
    cond = recipe.cond(["a red 7 on black", "a", "b"])
    logits, _ = recipe.discriminate(recipe._heads, x, torch.tensor([0.3, 0.6, 0.9]), cond)
    tokens = (recipe.teacher.config.latent_size // tf.cfg.patch_size) ** 2
    assert logits.shape == (3, tf.cfg.depth_double + tf.cfg.depth_single, tokens)
    t = recipe.student_times(20_000, torch.Generator().manual_seed(0))
    assert abs(float((t == 1.0).float().mean()) - 0.5) < 0.02  # one_step_fraction, not 1/4 of the grid times
    assert set(t.unique().tolist()) == {1.0, 0.75, 0.5, 0.25}


def test_add_distillation_term_by_hand():
    from fewstep.training.distill.losses import add_distillation

    x0 = torch.tensor([[1.0, 2.0], [3.0, 3.0]])
    teacher = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    # per-sample mean squared error [2.5, 2.0], weighted by c(t) = [0.5, 1.0]: (1.25 + 2.0) / 2
    assert float(add_distillation(x0, teacher, torch.tensor([0.5, 1.0]))) == 1.625
    x0.requires_grad_(True)
    teacher.requires_grad_(True)
    add_distillation(x0, teacher, torch.ones(2)).backward()
    # d/dx0 of mean((x0 − sg(teacher))²) over 2 elements, then over 2 samples: (x0 − teacher) / 2
    torch.testing.assert_close(x0.grad, torch.tensor([[0.5, 1.0], [0.0, 1.0]]))
    assert teacher.grad is None  # the teacher's estimate is a target (sg), not a path for gradients


def _ladd_step(tiny_teacher, out, weight: float):
    """One LADD train_step on a tiny model, everything seeded alike: (recipe, batch, loss, logs)."""
    from fewstep.training.distill.ladd import LADDRecipe

    sets = ["ladd.samples=8", "ladd.sample_steps=2", "batch_size=3", "teacher_guidance=2.5"]
    cfg = tiny_distill(out, tiny_teacher, method="ladd", sets=[*sets, f"ladd.distill_weight={weight}"])
    torch.manual_seed(0)  # the discriminator heads' initialisation
    recipe = LADDRecipe(cfg, TextToImage.load(tiny_teacher))
    randomize(recipe.teacher.transformer)  # so that the conditional and unconditional velocities differ
    randomize(recipe.module)
    recipe.setup(Context(device=torch.device("cpu"), module=recipe.module))
    batch = recipe.prepare(recipe.make_batch(torch.Generator().manual_seed(0)), torch.device("cpu"))
    loss, logs = recipe.train_step(batch)
    return recipe, batch, loss, logs


def test_ladd_distillation_term_regresses_on_the_teachers_cfg_estimate(tiny_teacher, tmp_path):
    """ADD's L_distill: the teacher's CFG x0 estimate of the same re-noised student sample, weighted by 1 − t',
    added to the adversarial loss times λ, with gradients to the student. The conditional velocity comes from the
    discriminator's forward; the estimate must equal a plain CFG one."""
    from fewstep.models.flow import x0_from_velocity
    from fewstep.training.distill.common import guided_velocity, velocity
    from fewstep.training.distill.losses import add_distillation

    recipe, batch, loss, logs = _ladd_step(tiny_teacher, tmp_path / "with", 2.5)
    recipe_without, _, loss_without, logs_without = _ladd_step(tiny_teacher, tmp_path / "without", 0.0)

    tf, cond, t = recipe.teacher.transformer, batch["cond"], batch["t_fake"]
    with torch.no_grad():
        x_ts = interpolate(batch["x"], batch["eps_student"], batch["t_student"])
        x0 = x0_from_velocity(x_ts, velocity(recipe.module, x_ts, batch["t_student"], cond), batch["t_student"])
        fake_in = interpolate(x0, batch["eps_fake"], t)
        v = guided_velocity(tf, fake_in, t, cond, recipe.cond.empty(3), 2.5)
        expected = add_distillation(x0, x0_from_velocity(fake_in, v, t), 1 - t)
        v_c = velocity(tf, fake_in, t, cond)
    assert float((v - v_c).abs().max()) > 1e-3  # CFG changes the target here, so the check below can tell
    torch.testing.assert_close(logs["distill"], expected, rtol=1e-5, atol=1e-7)
    assert "distill" not in logs_without
    torch.testing.assert_close(loss - loss_without, 2.5 * expected, rtol=1e-4, atol=1e-6)  # L_adv + λ·L_distill
    # the term reaches the student: its gradients differ from the adversarial loss's alone
    grads = [torch.autograd.grad(l, [p for p in r.module.parameters() if p.requires_grad], allow_unused=True)
             for l, r in ((loss, recipe), (loss_without, recipe_without))]  # fmt: skip
    diff = sum(float((a - b).abs().sum()) for a, b in zip(*grads, strict=True) if a is not None and b is not None)
    assert diff > 0


def test_a_later_progressive_round_moves_its_teacher_to_the_runs_device(tiny_teacher):
    """From round 2 on the round's teacher is the previous student, loaded on the CPU: setup must move it with
    everything else. The meta device stands in for CUDA (any device but the CPU shows a teacher left behind)."""
    from fewstep.training.distill.progressive import ProgressiveRound

    teacher = TextToImage.load(tiny_teacher)
    round_teacher = TextToImage.load(tiny_teacher).transformer  # as run_progressive loads the previous student
    cfg = tiny_distill("unused", tiny_teacher, method="progressive")
    recipe = ProgressiveRound(cfg, teacher, round_teacher, teacher_steps=4, guidance=1.0)
    device = torch.device("meta")
    recipe.setup(Context(device=device, module=recipe.module.to(device)))
    nets = {"round teacher": recipe.module._teacher[0], "student": recipe.module.student,
            "teacher": recipe.teacher.transformer, "text encoder": recipe.teacher.text_encoder}  # fmt: skip
    for name, net in nets.items():
        assert {p.device for p in net.parameters()} == {device}, name


def test_progressive_rounds_get_the_budget_they_are_given(tiny_teacher, tmp_path):
    from fewstep.models.checkpoint import read_card
    from fewstep.training.distill.methods import distill

    sets = ["progressive.start_steps=4", "progressive.round_steps=2"]
    students = distill(tiny_distill(tmp_path, tiny_teacher, method="progressive", max_steps=100, sets=sets))
    assert [read_card(s).training["steps"] for s in students] == [2, 2]
