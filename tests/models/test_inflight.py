"""models/inflight.py: a batch sampled step by step, rows joining and leaving at step boundaries, gives every row
the image ``generate`` gives its prompt and seed (the teacher's Euler sampler and a student's x0 sampler)."""

import pytest
import torch

from fewstep.models.pipeline import TextToImage

PROMPTS = ["a red 7 on black", "a blue 3 on white", "a green 1 on yellow"]
SEEDS = [5, 6, 7]


def _drain(batch) -> dict:
    out = {}
    while len(batch):
        batch.step()
        out.update(batch.pop_done())
    return out


@pytest.mark.parametrize("sampler", ["euler", "x0"])
def test_rows_joining_mid_run_get_the_images_generate_gives(tiny_teacher, sampler):
    model = TextToImage.load(tiny_teacher, kernels="torch")
    if sampler == "x0":  # the multistep consistency sampler re-noises each row from its own seed
        model.card = model.card.model_copy(
            update={"sampling": model.card.sampling.model_copy(update={"sampler": "x0"})}
        )
    steps = 5
    ref = model.generate(PROMPTS, SEEDS, steps=steps)
    batch = model.inflight(steps)
    batch.add("a", PROMPTS[:1], SEEDS[:1])
    batch.step()
    batch.step()
    assert batch.pop_done() == {} and batch.remaining_steps() == 3
    batch.add("b", PROMPTS[1:], SEEDS[1:])  # joins two steps behind "a": rows at t = grid[2] and grid[0]
    batch.add("gone", ["a red 1 on blue"], [9])
    batch.drop("gone")  # a cancelled request: its row is not computed again
    assert len(batch) == 3 and batch.remaining_steps() == steps
    out = _drain(batch)
    assert set(out) == {"a", "b"}
    torch.testing.assert_close(out["a"], ref[:1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["b"], ref[1:], atol=1e-5, rtol=0)


def test_a_row_finishes_after_exactly_its_steps(tiny_teacher):
    model = TextToImage.load(tiny_teacher, kernels="torch")
    batch = model.inflight(3)
    batch.add("a", PROMPTS[:1], SEEDS[:1])
    batch.step()
    batch.add("b", PROMPTS[1:2], SEEDS[1:2])
    batch.step()
    assert batch.pop_done() == {}
    batch.step()
    assert set(batch.pop_done()) == {"a"} and len(batch) == 1  # "b" has one step left
    batch.step()
    assert set(batch.pop_done()) == {"b"} and len(batch) == 0
