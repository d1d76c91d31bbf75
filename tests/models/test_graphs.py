"""Frozen inference graphs (models/graphs.py): the same numbers as eager at every batch size, one graph per
signature, eager where a graph cannot be traced or disagrees, and never under autograd."""

import dataclasses
import logging
import threading

import pytest
import torch

from fewstep.models.autoencoder import Autoencoder
from fewstep.models.config import get_variant
from fewstep.models.graphs import Graphs, run
from fewstep.models.mmdit import MMDiT
from fewstep.models.text import TextEncoder
from tests.helpers import randomize


def _inputs(model: MMDiT, b: int, mask: bool = True, guidance: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = model.latent_size
    x = torch.randn(b, model.cfg.in_channels, size, size, generator=g)
    txt = torch.randn(b, 5, model.txt_in.in_features, generator=g)
    keep = torch.ones(b, 5, dtype=torch.bool)
    keep[:, 3:] = torch.arange(b)[:, None] % 2 == 0  # some rows padded
    pooled = torch.randn(b, model.vector_in.in_layer.in_features, generator=g)
    return (
        x,
        torch.rand(b, generator=g),
        txt,
        keep if mask else None,
        pooled,
        torch.full((b,), 3.5) if guidance else None,
    )


@pytest.mark.parametrize("mask, guidance", [(True, False), (False, True)])
def test_transformer_graph_matches_eager_at_every_batch_size(mask, guidance):
    cfg = get_variant("tiny")
    tcfg = dataclasses.replace(cfg.transformer, guidance_embed=guidance)
    model = MMDiT(tcfg, cfg.text.dim, cfg.latent_size).eval()
    randomize(model)
    with torch.no_grad():
        want = {b: model(*_inputs(model, b, mask, guidance, seed=b)) for b in (1, 3, 5)}
        model.use_graphs()
        got = {b: model(*_inputs(model, b, mask, guidance, seed=b)) for b in (3, 1, 5)}  # traced at batch 3
    for b in want:
        assert torch.allclose(got[b], want[b], atol=1e-5), b
    assert len(model.graphs) == 1  # the batch size is not part of the signature


def test_text_encoder_and_decoder_graphs_match_eager():
    cfg = get_variant("tiny")
    enc, ae = TextEncoder(cfg.text).eval(), Autoencoder(cfg.autoencoder).eval()
    randomize(enc), randomize(ae)
    ids = torch.randint(0, cfg.text.vocab_size, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1:, 4:] = False
    z = torch.randn(4, cfg.autoencoder.latent_channels, 8, 8)
    with torch.no_grad():
        want_tokens, want_images = enc(ids, mask).tokens, ae.decode(z)
        enc.use_graphs(), ae.use_graphs()
        assert torch.allclose(enc(ids, mask).tokens, want_tokens, atol=1e-5)
        assert torch.allclose(enc(ids[:2], mask[:2]).tokens, want_tokens[:2], atol=1e-5)
        assert torch.allclose(ae.decode(z), want_images, atol=1e-5)
    assert len(enc.graphs) == 1 and len(ae.graphs) == 1


def test_graphs_are_not_used_under_autograd():
    cfg = get_variant("tiny")
    model = MMDiT(cfg.transformer, cfg.text.dim, cfg.latent_size).use_graphs()
    randomize(model)
    out = model(*_inputs(model, 2))
    out.sum().backward()  # eager: gradients reach the weights
    assert model.img_in.weight.grad is not None and len(model.graphs) == 0


def test_a_graph_that_cannot_be_traced_runs_eager_with_one_warning(caplog):
    owner = torch.nn.Linear(2, 2)
    graphs = Graphs(owner, lambda x: None, "no tensor out")  # a trace must return tensors
    with caplog.at_level(logging.WARNING, logger="fewstep.models"), torch.no_grad():
        for _ in range(3):
            assert run(graphs, lambda x: x + 1, torch.zeros(2, 2)).tolist() == [[1.0, 1.0]] * 2
    assert [r.message for r in caplog.records if "cannot trace" in r.message] != []
    assert len([r for r in caplog.records if "no tensor out" in r.message]) == 1
    assert len(graphs) == 0


def test_a_batch_size_baked_into_the_trace_is_caught_and_served_eager(caplog):
    def fn(x: torch.Tensor) -> torch.Tensor:
        return x * int(x.shape[0])  # a Python int: the trace keeps the batch size it saw

    graphs = Graphs(torch.nn.Linear(1, 1), fn, "baked")
    with caplog.at_level(logging.WARNING, logger="fewstep.models"), torch.no_grad():
        assert run(graphs, fn, torch.ones(2, 1)).flatten().tolist() == [2.0, 2.0]  # traced here: right
        assert run(graphs, fn, torch.ones(3, 1)).flatten().tolist() == [3.0] * 3  # the graph says 2: caught
        assert run(graphs, fn, torch.ones(2, 1)).flatten().tolist() == [2.0, 2.0]  # eager from now on
    assert len(graphs) == 0
    assert any("disagrees" in r.message and "batch 3" in r.message for r in caplog.records)


def test_two_threads_meeting_a_new_signature_trace_it_once():
    traced = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        traced.append(1)  # the eager function runs once to trace and once to check, per trace
        return x * 2

    graphs = Graphs(torch.nn.Linear(1, 1), fn, "shared")
    barrier, out = threading.Barrier(2), []

    def call() -> None:
        barrier.wait()
        with torch.no_grad():
            out.append(run(graphs, fn, torch.ones(4, 3)))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(graphs) == 1 and len(traced) == 2
    assert all(o.tolist() == [[2.0] * 3] * 4 for o in out)


def test_after_the_first_call_at_a_batch_size_the_graph_serves_not_eager():
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x * 2

    graphs = Graphs(torch.nn.Linear(1, 1), fn, "served")
    with torch.no_grad():
        for _ in range(3):
            assert run(graphs, fn, torch.ones(4, 3)).tolist() == [[2.0] * 3] * 4
        assert calls == [4, 4]  # traced, then checked once; the other calls ran the graph
        run(graphs, fn, torch.ones(5, 3))
        run(graphs, fn, torch.ones(5, 3))
    assert calls == [4, 4, 5]  # a new batch size is checked once


def test_weights_moved_or_replaced_through_the_module_are_traced_again():
    cfg = get_variant("tiny")
    model = MMDiT(cfg.transformer, cfg.text.dim, cfg.latent_size).eval()
    randomize(model)
    args = _inputs(model, 2)
    with torch.no_grad():
        model.use_graphs()(*args)
        other = MMDiT(cfg.transformer, cfg.text.dim, cfg.latent_size).eval()
        randomize(other, seed=1)
        model.load_state_dict(other.state_dict(), assign=True)  # new tensors: the old graph would be stale
        assert len(model.graphs) == 0
        assert torch.allclose(model(*args), other(*args), atol=1e-5)
        model.double()
        out = model(*(a.double() if a is not None and a.is_floating_point() else a for a in args))
    assert out.dtype == torch.float64 and model.graphs is not None


def test_tracing_keeps_the_training_flag_and_copies_run_eager():
    import copy

    cfg = get_variant("tiny")
    model = MMDiT(cfg.transformer, cfg.text.dim, cfg.latent_size).use_graphs()
    randomize(model)
    model.train()
    with torch.no_grad():
        model(*_inputs(model, 2))
    assert model.training and len(model.graphs) == 1
    assert copy.deepcopy(model).graphs is None  # a copy (an EMA, a checkpoint) holds no graphs


def test_a_default_guidance_is_an_input_of_the_graph_not_a_constant():
    cfg = get_variant("tiny")
    model = MMDiT(dataclasses.replace(cfg.transformer, guidance_embed=True), cfg.text.dim, cfg.latent_size).eval()
    randomize(model)
    args = _inputs(model, 2)[:5]  # no guidance given
    with torch.no_grad():
        model.default_guidance = 3.5
        at_3_5 = model._forward(*args)
        model.use_graphs()
        assert torch.allclose(model(*args), at_3_5, atol=1e-5)
        model.default_guidance = 1.0
        assert torch.allclose(model(*args), model._forward(*args), atol=1e-5)
        assert not torch.allclose(model(*args), at_3_5, atol=1e-3)
