import pytest
import torch

from fewstep.training.evaluate import eval_prompts, frechet_distance, markdown_table


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    a = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0])
    b = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 0.5]) + torch.tensor([1.0, -1.0])
    # FD of N(μ1, diag σ1²), N(μ2, diag σ2²) = |μ1 − μ2|² + Σ (σ1 − σ2)²
    expect = 2.0 + (1 - 3) ** 2 + (2 - 0.5) ** 2
    assert frechet_distance(a, b) == pytest.approx(expect, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_with_correlated_features():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, 4, generator=g, dtype=torch.float64)
    mix = torch.tensor([[1.0, 0.5, 0, 0], [0, 1.0, 0.3, 0], [0, 0, 1.0, 0.2], [0.1, 0, 0, 1.0]], dtype=torch.float64)
    a, b = x @ mix, x @ mix.T + 0.3
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # reference via the general matrix square root of ca @ cb (eigen-decomposition of a non-symmetric matrix)
    w, v = torch.linalg.eig(ca @ cb)
    tr_sqrt = (v @ torch.diag(w.sqrt()) @ torch.linalg.inv(v)).real.trace()
    expect = float((a.mean(0) - b.mean(0)).pow(2).sum() + ca.trace() + cb.trace() - 2 * tr_sqrt)
    assert frechet_distance(a, b) == pytest.approx(expect, rel=1e-6)


def test_eval_prompts_are_fixed_and_cover_every_phrasing():
    a, b = eval_prompts(16), eval_prompts(16)
    assert a.prompts == b.prompts and a.seeds == b.seeds
    assert any(p.endswith("background") for p in a.prompts) and any(p.startswith("a ") for p in a.prompts)
    assert any(w in " ".join(a.prompts) for w in ("zero", "one", "two", "three", "four", "five", "six"))
    assert len(set(a.seeds)) == 16


def test_markdown_table():
    res = {
        "model": "m",
        "n": 10,
        "real_floor_fd": 0.5,
        "threads": 2,
        "device": "cpu",
        "rows": [
            {
                "steps": 4,
                "digit_accuracy": 0.97,
                "fg_accuracy": 1.0,
                "bg_accuracy": 0.99,
                "fd": 1.234,
                "ms_per_image": 3.0,
            }
        ],
    }
    md = markdown_table([res])
    assert "| m | 4 | 97.0% | 100.0% | 99.0% | 1.23 (0.50) | 3.00 |" in md
