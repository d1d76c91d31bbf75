"""Compression: block importance, pruning, the KD losses by hand, and `fewstep compress` end to end."""

import json
import math
from dataclasses import replace

import pytest
import torch

from fewstep.errors import UsageError
from fewstep.models.checkpoint import read_card
from fewstep.models.mmdit import MMDiT
from fewstep.models.pipeline import TextToImage
from fewstep.training.compress.importance import (
    Calibration,
    block_influence,
    block_names,
    io_mse,
    rank_blocks,
    skipping,
)
from fewstep.training.compress.losses import feature_kd, output_kd, task_loss
from fewstep.training.compress.prune import choose_blocks, parse_keep, prune
from tests.test_cli import fewstep


def test_input_output_criteria_by_hand():
    x_in = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2 tokens, 2)
    x_out = torch.tensor([[[1.0, 1.0], [0.0, -2.0]]])
    assert io_mse(x_in, x_out).item() == pytest.approx((0 + 1 + 0 + 16) / 4)
    # cosines: token 0: 1/sqrt(2); token 1: -1
    assert block_influence(x_in, x_out).item() == pytest.approx(1 - (1 / math.sqrt(2) - 1) / 2)


def test_losses_by_hand():
    x0, noise = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]])  # target ε − x0 = (−1, −1)
    assert task_loss(torch.tensor([[0.0, -1.0]]), x0, noise).item() == pytest.approx((1 + 0) / 2)
    assert output_kd(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 3.0]])).item() == pytest.approx((1 + 4) / 2)
    teacher = [torch.tensor([[2.0, 2.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 4.0]])]
    student = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]])]  # student block 0 <- 0, 1 <- 2
    # plain: MSE(s0, t0) + MSE(s1, t2) = 0.5 + (0 + 4) / 2
    assert feature_kd(student, teacher, [0, 2], "plain").item() == pytest.approx(0.5 + 2.0)
    # per block: each over the teacher feature's mean square (4 and 8)
    assert feature_kd(student, teacher, [0, 2], "per_block").item() == pytest.approx(0.5 / 4 + 2.0 / 8)
    with pytest.raises(ValueError, match="plain or per_block"):
        feature_kd(student, teacher, [0, 2], "l1")


@pytest.fixture()
def net_and_batch(tiny_teacher):
    """A transformer as wide as the tiny teacher's, every block doing something, and a batch."""
    model = TextToImage.load(tiny_teacher)
    src = model.transformer  # 1 + 1 blocks: too few to remove any; the same width at 2 + 4
    net = MMDiT(replace(src.cfg, depth_double=2, depth_single=4), src.txt_in.in_features, src.latent_size).eval()
    g = torch.Generator().manual_seed(0)
    for p in net.parameters():  # the zero-initialised ones (DiT: modulation, final layer)
        if not p.any():
            p.data = 0.2 * torch.randn(p.shape, generator=g)
    x = torch.randn(4, *model.latent_shape, generator=g)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    return net, Calibration(x, t, model.encode_text(["a red 7 on black", "a 3", "", "blue 1 on white"]))


def _forward(net, c: Calibration) -> torch.Tensor:
    return net(c.x_t, c.t, c.cond.tokens, c.cond.mask, c.cond.pooled)


def test_a_pruned_model_equals_the_full_one_with_those_blocks_skipped(net_and_batch):
    net, c = net_and_batch
    names = block_names(net)
    gone = [names[1], names[-2]]
    kept = [n for n in names if n not in gone]
    small, sources = prune(net, kept)
    assert len(small.double_blocks) + len(small.single_blocks) == len(names) - 2
    assert sources == [names.index(n) for n in kept]
    full = _forward(net, c)
    with torch.no_grad(), skipping(net, gone[0]), skipping(net, gone[1]):
        skipped = _forward(net, c)
    assert not torch.allclose(skipped, full)
    assert torch.allclose(_forward(small, c), skipped, atol=1e-6)
    assert torch.equal(_forward(net, c), full)  # skipping restored both blocks
    # feature KD pairs student block j with the full model's feature sources[j]: equal up to the first removal
    _, f_small = small(c.x_t, c.t, c.cond.tokens, c.cond.mask, c.cond.pooled, return_features=True)
    _, f_full = net(c.x_t, c.t, c.cond.tokens, c.cond.mask, c.cond.pooled, return_features=True)
    assert len(f_small) == len(kept) and sources[0] == 0
    assert torch.allclose(f_small[0], f_full[sources[0]], atol=1e-6)
    assert not torch.allclose(f_small[1], f_full[sources[1]], atol=1e-3)  # after double.1 was removed


def test_a_block_that_does_nothing_ranks_least_important_by_every_criterion(net_and_batch):
    net, c = net_and_batch
    names = block_names(net)
    idle = names[1]
    block = net.double_blocks[1] if idle.startswith("double") else net.single_blocks[int(idle.split(".")[1])]
    for p in block.parameters():  # zero modulation: every gate is 0, the block returns its input
        p.data.zero_()
    ranking = rank_blocks(net, c)
    for criterion in ("io_mse", "output_loss", "bi"):
        assert ranking.order(criterion)[0] == idle
        assert ranking.scores[criterion][idle] == pytest.approx(0.0, abs=1e-6)
        assert all(ranking.scores[criterion][n] > 1e-6 for n in names if n != idle)
    md = ranking.to_markdown(2)
    assert f"| {idle} |" in md and "rank 1 = least important" in md
    assert json.loads(ranking.to_json())["blocks"] == names
    with pytest.raises(ValueError, match="unknown criteria"):
        rank_blocks(net, c, ("cka",))
    # chunked (the memory of one chunk) or not, the same scores
    small_chunks = rank_blocks(net, c, chunk=1)
    for criterion in ranking.scores:
        for n in names:
            assert small_chunks.scores[criterion][n] == pytest.approx(ranking.scores[criterion][n], rel=1e-4, abs=1e-9)


def test_keep_lists_and_removal_counts():
    names = ["double.0", "double.1", "single.0", "single.1", "single.2", "single.3"]
    assert parse_keep("s3,d0, double.1", names) == ["double.0", "double.1", "single.3"]
    for bad, msg in [("single.9", "no block 'single.9'"), ("d0,d0", "listed twice"), (" , ", "lists no block")]:
        with pytest.raises(UsageError, match=msg):
            parse_keep(bad, names)
    with pytest.raises(UsageError, match="remove at least 1"):
        choose_blocks(names, None, "io_mse", 6, None)
    assert choose_blocks(names, None, "io_mse", None, "d1,s0") == ["double.1", "single.0"]


def test_compress_command_removes_blocks_and_records_the_lineage(tiny_teacher, tmp_path):
    out = tmp_path / "run"
    fewstep(
        "compress", "--teacher", str(tiny_teacher), "--out", str(out), "--remove", "1", "--criterion", "bi",
        "--max-steps", "2", "--set", "data=synthetic", "--set", "batch_size=4", "--set", "compress.calibration=8",
        "--set", "export_dtype=float32", "--set", "name=tiny-compressed",
    )  # fmt: skip
    card, teacher_card = read_card(out / "export"), read_card(tiny_teacher)
    lin = card.compression
    assert card.role == "teacher" and lin.criterion == "bi" and len(lin.removed) == 1
    assert lin.source.sha256 == teacher_card.files["transformer.safetensors"].sha256
    ranking = json.loads((out / "ranking.json").read_text())
    assert set(lin.removed) == set(sorted(ranking["blocks"], key=lambda b: ranking["scores"]["bi"][b])[:1])
    assert lin.weights == {"task": 1.0, "output_kd": 1.0, "feature_kd": 1.0}
    assert card.sampling == teacher_card.sampling and card.training["method"] == "compress"
    model = TextToImage.load(out / "export")
    depth = len(model.transformer.double_blocks) + len(model.transformer.single_blocks)
    assert depth == len(lin.kept) == len(ranking["blocks"]) - 1
    images = model.generate(["a red 7 on black"], [0], steps=2)
    assert images.shape[0] == 1 and torch.isfinite(images).all()
    # bad settings are refused, with the setting named, before any data is read
    for args, msg in [
        (["--keep", "s9"], "no block 's9'"),
        (["--criterion", "cka"], "invalid choice"),
        (["--set", "compress.feature_norm=l2"], "feature_norm: 'l2'"),
        ([], "too few to remove a third"),  # the tiny teacher has 2 blocks
    ]:
        r = fewstep("compress", "--teacher", str(tiny_teacher), "--out", str(tmp_path / "bad"), *args, check=False)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    # a run started with some blocks is not resumed with others
    r = fewstep(
        "compress", "--teacher", str(tiny_teacher), "--out", str(out), "--keep", lin.removed[0], "--max-steps", "2",
        "--set", "data=synthetic", "--set", "compress.calibration=8", check=False,
    )  # fmt: skip
    assert r.returncode != 0 and "was started keeping" in r.stderr and "Traceback" not in r.stderr
