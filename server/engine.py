"""The serving engine: routing with teacher fallback, work-based admission, a supervised batcher and one executor
thread per device.

Requests become Jobs. ``route`` (server/routing.py, over a snapshot of the models' health) picks who serves a
job. Admission counts work, not requests: a job costs images × steps × the model's seconds per image-step
(measured at warm-up, then tracked from every batch), and the queue holds at most ``max_queued_work_s`` of it
(and ``queue_size`` jobs). Scheduling: the next batch starts from the queued job with the earliest
*arrival + estimated cost*, so a 1-step request that arrives behind a long teacher request overtakes it, while
the expensive job still runs once the cheap arrivals that would finish before it are served: nothing starves
(docs/api.md, "Admission and scheduling"). A running batch is not interrupted (step-level preemption is not
built). The batcher groups queued jobs with the same (model, steps, guidance, size) into batches of at most
max_batch images, waiting at most max_wait_ms for a batch to fill when requests arrive in a burst, and runs one
batch at a time on the device's executor thread, so the event loop never blocks on the model.

Supervision: an error anywhere in a batch fails that batch's requests only; the batcher task is restarted if
it ever ends, and /readyz says "unavailable" until it runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from fewstep.models.images import to_pil
from fewstep.server.breaker import CircuitBreaker
from fewstep.server.metrics import Metrics
from fewstep.server.registry import Registry, ServedModel
from fewstep.server.routing import Decision, ModelView, Snapshot, readiness, route
from fewstep.server.settings import ServeSettings

log = logging.getLogger("fewstep.server")
DEFAULT_COST_S = 0.02  # seconds per image-step before a model's first measurement (a CPU student's order)


class QueueFull(Exception):
    """Admission refused: the queued work is at its limit. The HTTP layer answers 429 with Retry-After."""


class NotServable(Exception):
    """No model can serve this request now (a student and its teacher both unavailable, or shutting down)."""


class BatchFailed(Exception):
    """Something outside the models failed while running a batch: that batch's requests fail, nothing else."""


@dataclass
class Job:
    model: str  # who will run it (after routing)
    requested: str  # who was asked for
    prompt: str
    steps: int
    guidance: float | None
    seeds: list[int]
    size: tuple[int, int] | None = None  # (width, height); None: the model's default
    fallback_reason: str | None = None
    cost_s: float = 0.0  # estimated device seconds
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    future: asyncio.Future | None = None

    @property
    def key(self) -> tuple[str, int, float | None, tuple[int, int] | None]:
        """Jobs with equal keys run as one batch."""
        return (self.model, self.steps, self.guidance, self.size)

    @property
    def priority(self) -> float:
        """Earliest arrival + own cost first: cheap work overtakes expensive work, aging prevents starvation."""
        return self.enqueued + self.cost_s


@dataclass
class Result:
    images: list[Image.Image]  # RGB, made on the device thread (see device_executor); encoded off it
    seeds: list[int]
    served_by: str
    steps: int
    fallback_reason: str | None
    queue_ms: float
    inference_ms: float
    batch_images: int


def device_executor() -> ThreadPoolExecutor:
    """The one thread that runs every model call of a device: loading, warm-up and batches.

    One thread, not just one at a time: on a CPU each thread that enters a parallel torch op gets its own
    OpenMP team, and a second team (say, the main thread's, from loading the models there) competes with
    the serving thread's for the same cores (docs/performance.md: HTTP/in-process 2.07× before, 1.00-1.65×
    after, by benchmarks/serve.py).
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="fewstep-device")


class Engine:
    def __init__(
        self, registry: Registry, settings: ServeSettings, metrics: Metrics, executor: ThreadPoolExecutor | None = None
    ):
        self.registry, self.settings, self.metrics = registry, settings, metrics
        self.breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown_s)
        self.executor = executor or device_executor()
        self.queue: deque[Job] = deque()
        self.queued_work_s = 0.0
        self.cost_s: dict[str, float] = {}  # seconds per image-step, per model (warm-up, then every batch)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._warm_task: asyncio.Task | None = None
        self._running: asyncio.Future | None = None  # the batch on the executor now
        self._stopping = False
        self.batcher_restarts = 0
        self.warmed_up = False
        self.draining = False  # set on SIGTERM (server/lifecycle.py): /readyz answers 503 while in-flight work ends
        self._last_arrival, self._arrival_gap_s = float("-inf"), float("inf")

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the batcher; warm up in the background, so /healthz answers at once and /readyz says 503
        until every model has run once (requests that arrive meanwhile queue behind the warm-up)."""
        self._wake = asyncio.Event()
        self._start_batcher()
        self._warm_task = asyncio.create_task(self._warm(), name="fewstep-warmup")

    def _start_batcher(self) -> None:
        self._task = asyncio.create_task(self._batcher(), name="fewstep-batcher")
        self._task.add_done_callback(self._batcher_ended)

    def _batcher_ended(self, task: asyncio.Task) -> None:
        """Supervision: a batcher that ends while the engine runs is logged, counted and started again."""
        if self._stopping:
            return
        exc = None if task.cancelled() else task.exception()
        log.error("the batcher stopped (%r); restarting it", exc)
        self.metrics.error("batcher_restart")
        self.batcher_restarts += 1
        self._start_batcher()

    async def _warm(self) -> None:
        if self.settings.warmup:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.warmup)
        self.warmed_up = True

    async def stop(self, deadline_s: float | None = None) -> None:
        """Finish what is queued and running (SIGTERM drains) until ``deadline_s``; then fail what is still
        queued with 503 and stop (a batch still running is abandoned: lifecycle.Deadlines answers its requests
        at the drain deadline). Never blocks the event loop."""
        deadline = time.perf_counter() + (self.settings.request_timeout_s if deadline_s is None else deadline_s)
        while (self.queue or self._running is not None) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        self._stopping = True
        for job in self.queue:
            if job.future is not None and not job.future.done():
                job.future.set_exception(NotServable("the server is shutting down"))
        self.queue.clear()
        for task in (self._warm_task, self._task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.executor.shutdown(wait=False, cancel_futures=True)

    def warmup(self) -> None:
        """Run every model once at each step count it serves (so the first request pays no start-up cost), and
        measure its seconds per image-step for admission. A student that fails is marked unavailable."""
        for m in self.registry.models.values():
            if not m.ready:
                continue
            steps_list = m.supported_steps() if m.role == "student" else [m.default_steps]
            try:
                for steps in steps_list:
                    t0 = time.perf_counter()
                    images = m.model.generate(["warm up"], [0], steps=steps)
                    self._observe_cost(m.name, time.perf_counter() - t0, 1, steps)
                    if not torch.isfinite(images).all():
                        raise RuntimeError("non-finite output")
            except Exception as e:  # a student that cannot run is served by its teacher
                log.warning("warm-up of %s failed: %s", m.name, e)
                if m.role == "student":
                    m.error = f"warm-up failed: {e}"

    def _observe_cost(self, name: str, seconds: float, images: int, steps: int) -> None:
        per = seconds / max(1, images * steps)
        old = self.cost_s.get(name)
        self.cost_s[name] = per if old is None else 0.8 * old + 0.2 * per

    # ---- health and routing ------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The models' health now, as plain data for routing (server/routing.py)."""
        views = {}
        for m in self.registry.models.values():
            views[m.name] = ModelView(
                name=m.name,
                role=m.role,
                default_steps=m.default_steps,
                serves=tuple(m.supported_steps()),
                max_steps=min(self.settings.max_teacher_steps, m.max_steps),
                loaded=m.ready,
                circuit_open=m.role == "student" and self.breaker.is_open(m.name),
                teacher=m.teacher,
                fd=m.fd,
                error=m.error,
                guidance_input=m.guidance_input,
                default_guidance=m.default_guidance,
            )
        return Snapshot(views, self.registry.default or "", self.settings.max_teacher_steps)

    def readiness(self) -> tuple[str, list[str]]:
        """("ready" | "degraded" | "unavailable", causes)."""
        alive = self._task is not None and not self._task.done()
        return readiness(self.snapshot(), self.warmed_up, self.draining, alive)

    def route(
        self, model: str | None, steps: int | None, want_teacher: bool = False, guidance: float | None = None
    ) -> Decision:
        """Raises routing.RouteError when no model can take the request."""
        return route(self.snapshot(), model, steps, want_teacher, guidance)

    # ---- admission ---------------------------------------------------------------------------------------
    def estimate_s(self, model: str, images: int, steps: int, size: tuple[int, int] | None = None) -> float:
        """Device seconds: images × steps × the model's seconds per image-step at its default size, scaled by
        pixels for another size (a transformer's cost grows at least with its token count)."""
        return images * steps * self._pixel_scale(model, size) * self.cost_s.get(model, DEFAULT_COST_S)

    def _pixel_scale(self, model: str, size: tuple[int, int] | None) -> float:
        """A size's pixels over the model's default size's (1 for the default)."""
        entry = self.registry.models.get(model)
        if size is None or entry is None or entry.sizes is None:
            return 1.0
        return size[0] * size[1] / (entry.sizes.width * entry.sizes.height)

    def saturated(self) -> bool:
        """Full before looking at the request: the HTTP layer refuses without reading the body."""
        return len(self.queue) >= self.settings.queue_size or self.queued_work_s >= self.settings.max_queued_work_s

    def retry_after_s(self) -> int:
        """When to come back: the queued work's estimated time, at least the configured minimum."""
        return max(self.settings.retry_after_s, math.ceil(self.queued_work_s))

    async def submit(self, job: Job) -> Result:
        job.cost_s = self.estimate_s(job.model, len(job.seeds), job.steps, job.size)
        # an empty queue takes any one job (the request limits bound it); otherwise its work must fit
        if self.queue and (self.saturated() or self.queued_work_s + job.cost_s > self.settings.max_queued_work_s):
            raise QueueFull()
        job.future = asyncio.get_running_loop().create_future()
        self._arrival_gap_s, self._last_arrival = job.enqueued - self._last_arrival, job.enqueued
        self.queue.append(job)
        self.queued_work_s += job.cost_s
        self.metrics.queue_depth.set(len(self.queue))
        self._wake.set()
        try:
            return await job.future
        finally:
            self.cancel(job)

    def cancel(self, job: Job) -> None:
        """A job nobody waits for any more (timeout, disconnect): out of the queue and its work budget now,
        not when the running batch ends, so dead jobs do not turn live clients away."""
        job.cancelled = True
        if any(j is job for j in self.queue):
            self._remove([job])
            self.metrics.error("dropped_before_run")

    # ---- batching ----------------------------------------------------------------------------------------
    def _remove(self, jobs: list[Job]) -> None:
        gone = {id(j) for j in jobs}
        self.queue = deque(j for j in self.queue if id(j) not in gone)
        self.queued_work_s = max(0.0, sum(j.cost_s for j in self.queue))
        self.metrics.queue_depth.set(len(self.queue))

    def _take_batch(self) -> list[Job]:
        """The queued job with the earliest arrival + cost, and every queued job compatible with it, oldest first,
        up to max_batch images."""
        dropped = [j for j in self.queue if j.cancelled]
        if dropped:
            self.metrics.error("dropped_before_run", len(dropped))
            self._remove(dropped)
        if not self.queue:
            return []
        head = min(self.queue, key=lambda j: j.priority)
        batch, images = [head], len(head.seeds)
        for job in self.queue:
            if job is not head and job.key == head.key and images + len(job.seeds) <= self.settings.max_batch:
                batch.append(job)
                images += len(job.seeds)
        self._remove(batch)
        return batch

    async def _batcher(self) -> None:
        while True:
            try:
                await self._next_batch()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug outside the model calls: log it, keep serving
                log.exception("batcher error")
                self.metrics.error("internal")

    async def _next_batch(self) -> None:
        while not self.queue:
            self._wake.clear()
            await self._wake.wait()
        # The device is idle. Wait up to max_wait_ms for the batch to fill only when requests are arriving in a
        # burst (the last two came within max_wait_ms of each other): a lone request runs at once.
        wait_s = self.settings.max_wait_ms / 1000 if self._bursty() else 0.0
        deadline = time.perf_counter() + wait_s
        head_key = min(self.queue, key=lambda j: j.priority).key
        while self._queued_images(head_key) < self.settings.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)
            if not self.queue:
                return
        batch = self._take_batch()
        if not batch:
            return
        loop = asyncio.get_running_loop()
        self._running = loop.run_in_executor(self.executor, self._run_batch, batch)
        try:
            results = await self._running
        except Exception as e:  # the batch failed outside the model calls: fail its requests, nothing else
            log.exception("batch of %d requests failed", len(batch))
            self.metrics.error("internal")
            results = [BatchFailed(f"the batch failed: {type(e).__name__}") for _ in batch]
        finally:
            self._running = None
        for job, outcome in zip(batch, results, strict=True):
            if job.future is not None and not job.future.done():
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _bursty(self) -> bool:
        return self._arrival_gap_s < self.settings.max_wait_ms / 1000

    def _queued_images(self, key) -> int:
        return sum(len(j.seeds) for j in self.queue if j.key == key and not j.cancelled)

    # ---- running a batch (on the executor thread) -------------------------------------------------------
    def _run_batch(self, batch: list[Job]) -> list[Result | BaseException]:
        start = time.perf_counter()
        entry = self.registry.models[batch[0].model]
        steps, guidance, size = batch[0].steps, batch[0].guidance, batch[0].size
        prompts = [job.prompt for job in batch for _ in job.seeds]
        seeds = [s for job in batch for s in job.seeds]
        for job in batch:
            self.metrics.queue_wait.observe(start - job.enqueued)
        cond = None
        try:
            cond = entry.model.encode(prompts)  # once: a teacher with the same encoder reuses it below
            images = self._generate(entry, prompts, seeds, steps, guidance, size, cond)
            served_by, reasons = entry.name, [job.fallback_reason for job in batch]
            if entry.role == "student":
                self.breaker.record_success(entry.name)
        except Exception as e:
            if entry.role != "student":
                log.error("%s failed on a batch: %s", entry.name, e)
                self.metrics.error("model_error")
                return [NotServable(f"{entry.name} failed: {e}") for _ in batch]
            # a student that raises or returns non-finite values: the teacher regenerates the batch
            log.warning("student %s failed (%s); the teacher regenerates its batch", entry.name, e)
            self.breaker.record_failure(entry.name)
            teacher = self.registry.teacher_for(entry.name)
            if teacher is None:
                self.metrics.error("model_error")
                return [NotServable(f"{entry.name} failed and has no teacher: {e}") for _ in batch]
            key = teacher.model.encoder_key
            same_encoder = cond is not None and key is not None and key == entry.model.encoder_key
            steps, guidance, entry = teacher.default_steps, None, teacher
            try:
                images = self._generate(teacher, prompts, seeds, steps, guidance, size, cond if same_encoder else None)
            except Exception as e2:
                self.metrics.error("model_error")
                return [NotServable(f"{teacher.name} failed too: {e2}") for _ in batch]
            served_by, reasons = teacher.name, ["student_error"] * len(batch)
        elapsed = time.perf_counter() - start
        n_images = len(seeds)
        self._observe_cost(served_by, elapsed, n_images, steps * self._pixel_scale(served_by, size))
        self.metrics.batch_inference.labels(model=served_by, steps=self.metrics.steps_label(steps)).observe(elapsed)
        self.metrics.batch_size.observe(n_images)
        self.metrics.images.labels(model=served_by).inc(n_images)
        pils = to_pil(images)  # one tensor op for the batch, on this thread: no second OpenMP team elsewhere
        out, offset = [], 0
        for job, reason in zip(batch, reasons, strict=True):
            n = len(job.seeds)
            if reason:
                self.metrics.fallbacks.labels(reason=reason).inc()
            out.append(
                Result(
                    pils[offset : offset + n],
                    job.seeds,
                    served_by,
                    steps,
                    reason,
                    queue_ms=1000 * (start - job.enqueued),
                    inference_ms=1000 * elapsed,
                    batch_images=n_images,
                )
            )
            offset += n
        return out

    @staticmethod
    def _generate(
        entry: ServedModel,
        prompts: list[str],
        seeds: list[int],
        steps: int,
        guidance: float | None,
        size: tuple[int, int] | None,
        cond,
    ) -> torch.Tensor:
        images = entry.model.generate(prompts, seeds, steps=steps, guidance=guidance, size=size, cond=cond).cpu()
        if not torch.isfinite(images).all():
            raise FloatingPointError("non-finite values in the output")
        return images
