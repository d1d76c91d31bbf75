"""CPU throughput mode: under a backlog, one model batch per core group instead of one batch over every core.

On a CPU the device thread runs each batch with an OpenMP team over all the cores (latency mode): one request's
image comes back as fast as the machine allows. Under overload that team is the wrong shape. Every op of the
batch ends at a barrier, so anything else that runs on one of the cores (the event loop answering and refusing
requests, their kernel network work) stalls the whole team, not just one core: on two cores a batch of 32 images
took 77 ms at the batched capacity and 108-114 ms at 2x and 4x it (``FEWSTEP_CPU_STREAMS=1 python
benchmarks/reliability.py --only overload``). ``python benchmarks/interference.py`` measures the effect alone.

In throughput mode the engine runs ``streams`` batches at once, each on its own device thread with
``threads // streams`` OpenMP threads (one each on two cores), as OpenVINO's throughput streams or a
multi-instance deployment do: a core taken by the event loop now delays one batch by the time it was taken,
and a single-threaded batch pays no barrier at all. A batch takes longer (191 against 77 ms for 32 images,
docs/reliability.md), but under a backlog a request waits for the queue, not for its batch; throughput goes up.

The engine enters the mode when the queue holds a full batch for every stream (``streams × max_batch`` images of
jobs a stream may run: whole batches of a model whose generate() is reentrant, engine ``_streamable``) and
leaves it when less than one batch is left, so a light or steady load, and 32 lockstep clients at max_batch 32,
keep latency mode. GPUs keep one stream: the device runs the batch, not the host's cores.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Streams:
    """How the device's work is spread over CPU threads. ``count`` 1: latency mode only."""

    count: int  # batches at once in throughput mode
    threads: int  # torch threads of the one batch in latency mode (all the cores torch uses)

    @property
    def per_stream(self) -> int:
        """torch threads of each batch in throughput mode (with threads not a multiple of count, the rest idle)."""
        return max(1, self.threads // self.count)

    @classmethod
    def resolve(cls, setting: int, device: torch.device, threads: int) -> Streams:
        """``setting`` 0: automatic (2 on a CPU with an even number of torch threads, so that no thread idles in
        the mode; else 1); n: n on a CPU (at most one per thread), 1 on a GPU."""
        if device.type != "cpu":
            return cls(1, threads)
        count = (2 if threads >= 2 and threads % 2 == 0 else 1) if setting == 0 else setting
        return cls(max(1, min(count, threads)), threads)


def next_mode(throughput: bool, queued_images: int, max_batch: int, streams: int) -> bool:
    """Throughput mode from now on? Entered when the queue holds a full batch for every stream, left when less than
    one batch is queued (between the two, the current mode stays: no flapping at the threshold)."""
    if streams < 2:
        return False
    if queued_images >= streams * max_batch:
        return True
    return throughput and queued_images >= max_batch


def split_batch(
    batch: Sequence[T], parts: int, images: Callable[[T], int] = lambda job: len(job.seeds)
) -> list[list[T]]:
    """At most ``parts`` contiguous parts of about equal images (a job is never cut: its images come back as one
    result). Outside throughput mode a large whole batch runs this way, one single-threaded part per stream at
    once (``python benchmarks/split.py`` measures both layouts by batch size; docs/api.md "Engine" gives its
    figures)."""
    # cut after the job whose running total is nearest each part's share (a job is never cut)
    sums = list(itertools.accumulate(images(job) for job in batch))
    total, cuts = (sums[-1] if sums else 0), [0]
    for k in range(1, parts):
        options = range(cuts[-1] + 1, len(batch))  # cut after job i - 1: the part before holds sums[i - 1]
        if not options:
            break
        cuts.append(min(options, key=lambda i, target=total * k / parts: abs(sums[i - 1] - target)))
    cuts.append(len(batch))
    return [list(batch[a:b]) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def use_threads(n: int) -> None:
    """The calling thread's torch threads. OpenMP's thread count is per thread: a device thread that is running
    keeps its own (threads started later begin with the last count set anywhere, so every device thread sets its
    count before each batch). Set only when it changes: setting it also clears oneDNN's cache of compiled
    primitives."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
