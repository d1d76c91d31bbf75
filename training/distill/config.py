"""Distillation configs: the loop's settings at the top, and one nested section per method.

A card records the loop's settings and its method's section only. ``None`` means "inherit": the teacher card's
CFG scale or default step count, the loop's learning rate, iCT's default Huber constant.

    method: consistency
    teacher: zoo/digits-teacher
    batch_size: 64            # loop settings (training/config.py LoopConfig)
    consistency:              # this method's settings
      grid_steps: 32
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fewstep.training.config import LoopConfig, plain


@dataclass(frozen=True)
class ProgressiveSettings:
    """Salimans & Ho 2022: halve the step count each round, from start_steps down to 1."""

    start_steps: int = 32
    # optimizer steps per round; None: max_steps split evenly. Later rounds are no easier than the first (each
    # student must match two steps of a teacher that is itself a student): give every round the same budget
    round_steps: int | None = None
    # a teacher that takes the guidance scale as an input (guidance distillation, stage 1): w ~ U[min, max] is
    # given to it and to every round's student, which keeps w as an input (Meng et al. 2023, stage 2);
    # None: the range the teacher was trained on (its card's resolved guidance_range), else [1, 4]
    guidance_min: float | None = None
    guidance_max: float | None = None


@dataclass(frozen=True)
class ConsistencySettings:
    """Consistency distillation (Song et al. 2023) with LCM's guidance input (Luo et al. 2023)."""

    grid_steps: int = 32  # the teacher ODE grid; one teacher Euler step between adjacent points
    target_ema: float = 0.95  # EMA rate of the target network (CM, LCM)
    huber_c: float | None = None  # pseudo-Huber c; None: 0.00054·sqrt(dim) (Song & Dhariwal 2023)
    sigma_data: float = 0.5  # boundary parameterisation c_skip / c_out (CM appendix C)
    boundary_scale: float = 1000.0  # t is scaled to [0, 1000] in c_skip / c_out, as LCM does
    # c_out -> 1 (LCM, for an x0-estimate network); "consistency" is the EDM raw-output scaling (c_out -> σd) that
    # trained zoo/digits-consistency, kept to reproduce it
    parameterization: str = "consistency-lcm"
    guidance_min: float = 1.0  # LCM samples w ~ U[min, max] and feeds it to the student as an embedding
    guidance_max: float = 5.0
    student_steps: tuple[int, ...] = (1, 2, 4)  # the step counts the student is exported for


@dataclass(frozen=True)
class ReflowSettings:
    """Liu et al. 2022: pairs from the teacher's ODE, a straighter flow, then k-step distillation."""

    pairs: int = 4096
    pair_steps: int | None = None  # teacher steps per pair; None: the teacher's default
    reflow_fraction: float = 0.6  # share of max_steps spent on the reflow phase; the rest distils
    student_steps: tuple[int, ...] = (1, 2, 4)


@dataclass(frozen=True)
class DMD2Settings:
    """Yin et al. 2024."""

    generator_steps: int = 1  # 1, 2, or 4 with backward simulation
    fake_updates: int = 5  # fake-score updates per generator update
    fake_lr: float | None = None  # None: the loop's lr
    gan_weight: float = 3e-3  # generator's GAN loss weight (DMD2: 3e-3 … 5e-3)
    t_min: float = 0.02  # noise levels for the distribution-matching gradient
    t_max: float = 0.98


@dataclass(frozen=True)
class LADDSettings:
    """Sauer et al. 2024."""

    samples: int = 4096  # teacher-generated training images, made before training
    sample_steps: int | None = None  # teacher steps per image; None: the teacher's default
    disc_lr: float | None = None  # None: the loop's lr
    renoise_mean: float = 1.0  # logit-normal re-noising biased to high noise (LADD §3)
    renoise_std: float = 1.0
    one_step_fraction: float = 0.5  # share of student inputs at t = 1; the rest at the other grid times
    student_steps: tuple[int, ...] = (1, 2, 4)
    # ADD's distillation term beside the adversarial loss (λ; ADD uses 2.5): the teacher's CFG x0 estimate of
    # the re-noised student sample as a regression target, weighted by c(t') = 1 − t'. 0: LADD as written
    distill_weight: float = 0.0


@dataclass(frozen=True)
class GuidanceSettings:
    """Meng et al. 2023, stage 1: one forward with w as an input replaces CFG's two."""

    guidance_min: float = 1.0  # w ~ U[min, max] in training; requests may ask for any w in this range
    guidance_max: float = 4.0
    student_steps: tuple[int, ...] = ()  # step counts exported; empty: the teacher's default
    # share of each batch drawn from the teacher's own guided trajectories (the states its CFG sampler visits,
    # at the exported step count) instead of noised data; 0: Meng et al.'s stage 1 as written (data only)
    trajectory_fraction: float = 0.0
    trajectories: int = 1024  # trajectories generated once (cached under OUT/teacher-data), every state kept


@dataclass(frozen=True)
class CompressSettings:
    """Block removal, then knowledge distillation from the full model (the thesis's aim; BK-SDM, Flux.1 Lite,
    Flux-Mini): training/compress/."""

    criterion: str = "io_mse"  # io_mse | output_loss | bi: how blocks are ranked (training/compress/importance.py)
    remove: int | None = None  # remove this many of the least important blocks; None: a third of them
    keep: str | None = None  # or keep exactly these (double.0,single.3 or d0,s3), whatever the ranking says
    calibration: int = 64  # images in the ranking's calibration batch
    task_weight: float = 1.0  # flow matching on the data (the teacher's own loss)
    output_weight: float = 1.0  # output KD: the full model's velocity
    feature_weight: float = 1.0  # feature KD: each kept block's output against the full model's same block
    feature_norm: str = "plain"  # plain: MSE per block (BK-SDM); per_block: MSE / the block's mean square
    caption_dropout: float = 0.1  # as the teacher trained, so classifier-free guidance still works
    # a teacher that embeds the guidance scale (FLUX.1-dev): the scale both models are run at (Flux-Mini: 4);
    # None: the teacher's default
    guidance: float | None = None


@dataclass(frozen=True)
class DistillConfig(LoopConfig):
    method: str = "consistency"  # progressive | consistency | reflow | dmd2 | ladd | guidance | compress
    teacher: str = "zoo/digits-teacher"
    teacher_guidance: float | None = None  # CFG scale of the teacher's targets; None: the teacher card's
    # a Flux pipeline teacher (training/flux.py): the training image side; None: its fewstep.json width, else 512
    resolution: int | None = None
    name: str = "digits-student"
    out: str = "runs/distill"
    lr: float = 1e-4  # students start from the teacher: fine-tuning rates, not training-from-scratch ones
    warmup_steps: int = 50
    max_steps: int = 2000
    ema_decay: float = 0.99
    progressive: ProgressiveSettings = field(default_factory=ProgressiveSettings)
    consistency: ConsistencySettings = field(default_factory=ConsistencySettings)
    reflow: ReflowSettings = field(default_factory=ReflowSettings)
    dmd2: DMD2Settings = field(default_factory=DMD2Settings)
    ladd: LADDSettings = field(default_factory=LADDSettings)
    guidance: GuidanceSettings = field(default_factory=GuidanceSettings)
    compress: CompressSettings = field(default_factory=CompressSettings)

    @property
    def settings(self) -> Any:
        """This method's section."""
        return getattr(self, self.method)

    def settings_record(self) -> dict[str, Any]:
        """What a student's card records of the method: its section and the distillation-wide settings."""
        return {"teacher": self.teacher, "teacher_guidance": self.teacher_guidance, **plain(self.settings)}
