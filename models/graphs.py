"""A module's inference forward as frozen TorchScript graphs on a CPU, one per input signature: run without the GIL.

Eager PyTorch dispatches every op from Python and takes the GIL back after each one: one batch of the zoo's 1-step
student is about 2,000 ops. Beside another thread that runs Python (the server's event loop answering requests,
or a second device thread: the CPU throughput mode and split batches, server/streams.py), each of those
hand-overs may wait for that thread to let go of the GIL, and the batch stalls with its core idle. A traced and
frozen graph runs all its ops in C++ with the GIL released (`torch.jit` releases it for the whole call), so such
a thread costs the batch only the core time it takes. ``python benchmarks/gil.py`` measures both, alone and
beside a thread that runs Python.

A graph is traced on the first call with a new signature (which inputs are given, their shapes but the batch
dimension, dtypes and device) and used from then on. The batch dimension stays dynamic in the trace (every other
shape is part of the signature, so values computed from them may be baked in); the first call at each batch size
also runs eager and compares, so a size the trace did not generalise to is caught, not served. A signature whose
trace fails or disagrees runs eager from then on, with one warning.
TorchScript is in maintenance in PyTorch 2.x (its tracer warns that it is deprecated): should it go, every call
runs eager and nothing else changes.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

log = logging.getLogger("fewstep.models")

Signature = tuple


class _Call(nn.Module):
    """The eager function as a module over the given inputs only (a trace takes tensors, not None)."""

    def __init__(self, owner: nn.Module, fn: Callable[..., torch.Tensor], given: Sequence[bool]):
        super().__init__()
        self.owner, self.fn, self.given = owner, fn, tuple(given)  # owner: its parameters are the graph's

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        it = iter(tensors)
        return self.fn(*(next(it) if g else None for g in self.given))


_TRACING = threading.Lock()  # one trace at a time: warnings.catch_warnings changes process-wide state


def _no_graphs() -> None:
    return None


class Graphs:
    """Frozen graphs of ``fn`` (a function of tensors or None returning one tensor, computed by ``owner``'s
    parameters), keyed by signature; ``__call__`` returns None where the caller should run eager."""

    def __init__(self, owner: nn.Module, fn: Callable[..., torch.Tensor], name: str, atol: float = 1e-4):
        self.owner, self.fn, self.name, self.atol = owner, fn, name, atol
        self._graphs: dict[Signature, torch.jit.ScriptModule | None] = {}  # None: this signature runs eager
        self._checked: set[tuple[Signature, int]] = set()  # (signature, batch size) seen to agree with eager
        self._lock = threading.Lock()  # two device threads may meet a new signature at once: trace it once

    def __reduce__(self):
        """A copy (copy.deepcopy, pickle, torch.save of the module) holds no graphs: it runs eager."""
        return (_no_graphs, ())

    @staticmethod
    def signature(args: Sequence[torch.Tensor | None]) -> Signature:
        return tuple(None if a is None else (tuple(a.shape[1:]), a.dtype, a.device.type) for a in args)

    def __call__(self, *args: torch.Tensor | None) -> torch.Tensor | None:
        key = self.signature(args)
        graph = self._graphs.get(key, False)
        if graph is False:
            with self._lock:
                graph = self._graphs.get(key, False)
                if graph is False:
                    graph = self._graphs[key] = self._trace(key, args)
        if graph is None:
            return None
        tensors = [a for a in args if a is not None]
        try:
            out = graph(*tensors)
        except Exception as e:  # a shape the trace did not generalise to: eager from now on, for this signature
            log.warning("%s: its graph failed (%s); running eager", self.name, e)
            self._graphs[key] = None
            return None
        batch = (key, tensors[0].shape[0])
        if batch not in self._checked:  # once per batch size: a size the trace baked in would differ here
            want = self.fn(*args)
            if not self._agree(out, want, f"batch {batch[1]}"):
                self._graphs[key] = None
                return want
            self._checked.add(batch)
        return out

    def _trace(self, key: Signature, args: Sequence[torch.Tensor | None]) -> torch.jit.ScriptModule | None:
        call, tensors = _Call(self.owner, self.fn, [a is not None for a in args]), [a for a in args if a is not None]
        training = self.owner.training  # freeze needs eval mode; the owner's own mode is given back
        try:
            with _TRACING, torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's deprecation and shape notes (see the module docstring)
                graph = torch.jit.freeze(torch.jit.trace(call.eval(), tuple(tensors), check_trace=False))
                got, want = graph(*tensors), call(*tensors)
        except Exception as e:
            log.warning("%s: cannot trace a graph (%s); running eager", self.name, e)
            return None
        finally:
            self.owner.train(training)
        if not self._agree(got, want, "traced"):
            return None
        self._checked.add((key, tensors[0].shape[0]))
        return graph

    def _agree(self, got: torch.Tensor, want: torch.Tensor, when: str) -> bool:
        if got.shape == want.shape and torch.allclose(got, want, rtol=self.atol, atol=self.atol, equal_nan=True):
            return True
        diff = f"max |diff| {(got - want).abs().max().item():.3g}" if got.shape == want.shape else f"shape {got.shape}"
        log.warning("%s: its graph disagrees with eager (%s, %s); running eager", self.name, when, diff)
        return False

    def __len__(self) -> int:
        """Graphs in use (signatures that run eager are not counted)."""
        return sum(g is not None for g in self._graphs.values())


class GraphsOwner(nn.Module):
    """A module whose inference may run as frozen graphs of its method ``graph_method`` (``use_graphs``). A graph
    keeps the tensors it was traced with: in-place updates reach it, but tensors moved or replaced through the
    module (``.to()``, ``.double()``, ``load_state_dict``) drop its graphs, which are traced again on use."""

    graphs: Graphs | None = None
    graph_method: str = "forward"

    def use_graphs(self, on: bool = True):
        """Inference (no autograd) as frozen TorchScript graphs that run without the GIL: for serving."""
        self.graphs = Graphs(self, getattr(self, self.graph_method), type(self).__name__) if on else None
        return self

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self.graphs is not None:
            self.use_graphs()
        return out

    def load_state_dict(self, *args, **kwargs):
        out = super().load_state_dict(*args, **kwargs)
        if self.graphs is not None:
            self.use_graphs()
        return out


def run(graphs: Graphs | None, eager: Callable[..., torch.Tensor], *args: torch.Tensor | None) -> torch.Tensor:
    """``graphs``' answer where graphs serve (set, and no autograd), else ``eager(*args)``."""
    if graphs is not None and not torch.is_grad_enabled():
        out = graphs(*args)
        if out is not None:
            return out
    return eager(*args)
