"""Distillation configs: the training loop's fields plus each method's own knobs, with their reasons."""

from __future__ import annotations

from dataclasses import dataclass

from fewstep.training.config import TrainConfig


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    method: str = "consistency"  # progressive | consistency | reflow | dmd2 | ladd
    teacher: str = "zoo/digits-teacher"
    name: str = "digits-student"
    out: str = "runs/distill"
    lr: float = 1e-4  # students start from the teacher: fine-tuning rates, not training-from-scratch ones
    warmup_steps: int = 50
    max_steps: int = 2000
    ema_decay: float = 0.99
    teacher_guidance: float = -1.0  # CFG scale of the teacher's targets; < 0 = the teacher card's default
    # progressive (Salimans & Ho 2022): halve the step count each round, from start_steps down to 1
    start_steps: int = 32
    # consistency (Song et al. 2023; LCM, Luo et al. 2023)
    grid_steps: int = 32  # the teacher ODE grid; one teacher Euler step between adjacent points
    target_ema: float = 0.95  # EMA rate of the target network (CM, LCM)
    huber_c: float = 0.0  # pseudo-Huber c; 0 = 0.00054·sqrt(dim) (Song & Dhariwal 2023)
    sigma_data: float = 0.5  # boundary parameterisation c_skip / c_out (CM appendix C)
    boundary_scale: float = 1000.0  # t is scaled to [0, 1000] in c_skip / c_out, as LCM does
    guidance_min: float = 1.0  # LCM samples w ~ U[min, max] and feeds it to the student as an embedding
    guidance_max: float = 5.0
    # reflow (Liu et al. 2022): pairs from the teacher's ODE, then a straighter flow, then k-step distillation
    pairs: int = 4096
    pair_steps: int = 0  # teacher steps per pair; 0 = the teacher's default
    reflow_fraction: float = 0.6  # share of max_steps spent on the reflow phase; the rest distils
    # dmd2 (Yin et al. 2024)
    generator_steps: int = 1  # 1, or 4 with backward simulation
    fake_updates: int = 5  # fake-score updates per generator update
    fake_lr: float = 1e-4
    gan_weight: float = 3e-3  # generator's GAN loss weight (DMD2: 3e-3 … 5e-3)
    dmd_t_min: float = 0.02  # noise levels for the distribution-matching gradient
    dmd_t_max: float = 0.98
    # ladd (Sauer et al. 2024)
    samples: int = 4096  # teacher-generated training images, made before training
    disc_lr: float = 1e-4
    renoise_mean: float = 1.0  # logit-normal re-noising biased to high noise (LADD §3)
    renoise_std: float = 1.0
    student_step_set: tuple[int, ...] = (1, 2, 4)  # the step counts a student is trained for and supports
