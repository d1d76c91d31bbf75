"""The quality gate: a small critic that scores a student's image for its prompt, and its calibration.

DiffServe (Ahmad et al., MLSys 2025) sends the images a discriminator doubts from a light model to a heavy one.
Here the critic is trained for the job (``fewstep train-gate``) as an image–prompt matcher on the student's own
samples, at every step count it serves: an image with its own prompt is a positive, unless the benchmark's judge
(zoo/digits-classifier) reads a digit or color other than the prompt asked; the same image with its prompt
changed in one attribute (digit, foreground or background color) and with another image's prompt are negatives.
Right/wrong labels alone are too few to learn from (under 1% of the student's images are wrong); the matching
task teaches the critic to read digits and colors from every sample. It sees only what the server has at
serving time: the image and the student's own text embedding of the prompt. ``fewstep calibrate-gate`` picks,
per step count, the score under which a target share of images falls (say 5%) and writes it into the student's
card; the server then regenerates those images with the teacher inside the same request (docs/api.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fewstep.models.checkpoint import save_checkpoint
from fewstep.models.critic import CRITIC, Critic
from fewstep.models.pipeline import TextToImage
from fewstep.training.classifier import DigitClassifier
from fewstep.training.data import TEMPLATES, caption
from fewstep.training.evaluate import eval_prompts

TRAIN_SEED, CALIBRATION_SEED = 11, 13  # prompt sets apart from each other and from the benchmark's (seed 0)


@dataclass(frozen=True)
class Samples:
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    pooled: torch.Tensor  # (N, text_dim)
    right: torch.Tensor  # (N,) bool: the judge read the digit and both colors the prompt asked for
    steps: torch.Tensor  # (N,) the step count each was sampled with
    neg_pooled: torch.Tensor | None = None  # (N, text_dim) the prompt with one attribute changed (a hard negative)


@torch.no_grad()
def judged_samples(
    student: TextToImage,
    judge: DigitClassifier,
    n: int,
    steps_list: list[int],
    seed: int,
    guidance: float | None = None,
    batch_size: int = 250,
    progress: bool = True,
) -> Samples:
    """``n`` student samples per step count of the benchmark's prompts (set ``seed``), judged."""
    ep = eval_prompts(n, seed=seed)
    out = {"images": [], "pooled": [], "right": [], "steps": [], "neg_pooled": []}
    negatives = _one_attribute_changed(ep, seed)
    bar = tqdm(total=n * len(steps_list), desc="student samples", disable=not progress, unit="img")
    for steps in steps_list:
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            prompts, seeds = ep.prompts[lo:hi], ep.seeds[lo:hi]
            cond = student.encode(prompts)
            images = student.generate(prompts, seeds, steps=steps, guidance=guidance, cond=cond).cpu()
            read = judge(images)
            right = (
                (read["digit"].argmax(-1) == ep.digits[lo:hi])
                & (read["fg"].argmax(-1) == ep.fg[lo:hi])
                & (read["bg"].argmax(-1) == ep.bg[lo:hi])
            )
            out["images"].append(images)
            out["pooled"].append(cond.pooled.float().cpu())
            out["right"].append(right)
            out["steps"].append(torch.full((hi - lo,), steps))
            out["neg_pooled"].append(student.encode(negatives[lo:hi]).pooled.float().cpu())
            bar.update(hi - lo)
    bar.close()
    return Samples(*(torch.cat(out[k]) for k in ("images", "pooled", "right", "steps", "neg_pooled")))


def _one_attribute_changed(ep, seed: int) -> list[str]:
    """Each prompt of ``ep`` (training/evaluate.eval_prompts) in the same words with its digit, foreground or
    background color (in turn) replaced by another."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for i, (d, f, b) in enumerate(zip(ep.digits.tolist(), ep.fg.tolist(), ep.bg.tolist(), strict=True)):
        shift = int(torch.randint(1, 10, (1,), generator=g))
        if i % 3 == 0:
            d = (d + shift) % 10
        else:
            new = next(c for c in ((f if i % 3 == 1 else b) + shift + k for k in range(10)) if c % 10 not in (f, b))
            f, b = (new % 10, b) if i % 3 == 1 else (f, new % 10)
        out.append(caption(d, f, b, i % len(TEMPLATES), bool((i // len(TEMPLATES)) % 2)))
    return out


def train_critic(
    samples: Samples, iters: int = 1500, batch_size: int = 256, lr: float = 1e-3, seed: int = 0, progress: bool = True
) -> tuple[Critic, dict]:
    """Binary cross-entropy, the rare wrong images up-weighted to balance the classes (pos_weight)."""
    torch.manual_seed(seed)
    critic = Critic(samples.pooled.shape[-1], image_size=samples.images.shape[-1])
    opt = torch.optim.AdamW(critic.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    n = len(samples.right)
    # a held-out tenth for the report (the threshold is chosen on a separate calibration set)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = perm[: n // 10], perm[n // 10 :]
    y = samples.right.float()
    wrong_share = float(1 - y[train].mean())
    weight = torch.tensor((1 - wrong_share) / max(wrong_share, 1e-6))  # wrong (label 0) counts this much more
    g = torch.Generator().manual_seed(seed + 1)
    bar = tqdm(range(iters), desc="critic", disable=not progress)
    for _ in bar:
        idx = train[torch.randint(len(train), (batch_size,), generator=g)]
        images, pooled, target = samples.images[idx], samples.pooled[idx], y[idx]
        w = torch.where(target > 0.5, torch.ones_like(target), weight)
        loss = F.binary_cross_entropy_with_logits(critic(images, pooled), target, weight=w)
        zeros = torch.zeros_like(target)
        # negatives: another image's prompt, and (when sampled) the own prompt with one attribute changed
        loss = loss + F.binary_cross_entropy_with_logits(critic(images, pooled.roll(1, 0)), zeros)
        if samples.neg_pooled is not None:
            loss = loss + F.binary_cross_entropy_with_logits(critic(images, samples.neg_pooled[idx]), zeros)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    critic.eval().requires_grad_(False)
    report = {"samples": n, "wrong_share": round(wrong_share, 4), "val_auc": auc(
        critic.score(samples.images[val], samples.pooled[val]), samples.right[val])}  # fmt: skip
    return critic, report


def auc(scores: torch.Tensor, right: torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` for telling right (high) from wrong (low) images: the chance that
    a random right image scores above a random wrong one (ties count half). None without both kinds."""
    pos, neg = scores[right], scores[~right]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return round(float(greater + 0.5 * ties), 4)


def save_critic(out: str | Path, critic: Critic, student: TextToImage, training: dict) -> None:
    card = {
        "name": Path(out).name,
        "role": "gate",
        "model": critic.config,
        "training": training,
        "teacher": {"name": student.name, "sha256": student.weights_sha256()},  # the student it judges
    }
    save_checkpoint(out, card, {CRITIC: critic}, dtype="float32")


def score_samples(critic: Critic, samples: Samples, chunk: int = 500) -> torch.Tensor:
    """(N,) the critic's scores of ``samples`` (on the critic's device), in chunks."""
    device = next(critic.parameters()).device
    parts = zip(samples.images.split(chunk), samples.pooled.split(chunk), strict=True)
    return torch.cat([critic.score(i.to(device), p.to(device)).cpu() for i, p in parts])


def thresholds(scores: torch.Tensor, steps: torch.Tensor, rate: float) -> dict[int, float]:
    """Per step count, the score under which a share ``rate`` of the images falls (the gate sends those on)."""
    out = {}
    for s in sorted(set(steps.tolist())):
        x = scores[steps == s].double().sort().values
        k = math.ceil(rate * len(x))  # the k lowest are sent on: threshold between x[k-1] and x[k]
        out[int(s)] = float(x[0]) if k == 0 else float((x[k - 1] + x[min(k, len(x) - 1)]) / 2)
    return out
