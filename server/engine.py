"""The serving engine: routing with teacher fallback, a dynamic batcher and one executor per device.

Requests become Jobs. ``route`` picks who serves a job (the requested student, or its teacher and why).
The batcher groups queued jobs with the same (model, steps, guidance) into batches of at most max_batch
images, waiting at most max_wait_ms for a batch to fill, and runs one batch at a time on the device's
executor thread, so the event loop never blocks on the model. While a batch runs, new jobs queue; the
next batch takes every compatible one. A job whose client has gone or whose deadline passed is dropped
before it runs. No sampler state is shared: each batch builds its own noise and time grid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from fewstep.server.settings import ServeSettings

log = logging.getLogger("fewstep.server")


class QueueFull(Exception):
    """The bounded queue has no room: the HTTP layer answers 429 with Retry-After."""


class NotServable(Exception):
    """No model can serve this request (e.g. the student and its teacher are both unavailable)."""


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass
class Job:
    model: str  # who will run it (after routing)
    requested: str  # who was asked for
    prompt: str
    steps: int
    guidance: float | None
    seeds: list[int]
    fallback_reason: str | None = None
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    future: asyncio.Future | None = None

    @property
    def key(self) -> tuple[str, int, float | None]:
        return (self.model, self.steps, self.guidance)


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
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.warmed_up = False
        self.draining = False  # set on SIGTERM (server/main.py): /readyz answers 503 while in-flight work ends
        self._last_arrival, self._arrival_gap_s = float("-inf"), float("inf")

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the batcher; warm up in the background, so /healthz answers at once and /readyz says 503
        until every model has run once (requests that arrive meanwhile queue behind the warm-up)."""
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._batcher(), name="fewstep-batcher")
        self._warm_task = asyncio.create_task(self._warm(), name="fewstep-warmup")

    async def _warm(self) -> None:
        if self.settings.warmup:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.warmup)
        self.warmed_up = True

    async def stop(self) -> None:
        """Finish what is queued (SIGTERM drains), then stop."""
        while self.queue:
            await asyncio.sleep(0.01)
        if not self._warm_task.done():
            await self._warm_task
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=True)

    def warmup(self) -> None:
        """Run every model once at each step count it serves, so the first request pays no start-up cost."""
        for m in self.registry.models.values():
            if not m.ready:
                continue
            steps_list = m.supported_steps() if m.role == "student" else [m.model.sampling.default_steps]
            try:
                for steps in steps_list:
                    images = m.model.generate(["warm up"], [0], steps=steps)
                    if not torch.isfinite(images).all():
                        raise RuntimeError("non-finite output")
            except Exception as e:  # a student that cannot run is served by its teacher
                log.warning("warm-up of %s failed: %s", m.name, e)
                if m.role == "student":
                    m.error = f"warm-up failed: {e}"

    # ---- health ------------------------------------------------------------------------------------------
    def readiness(self) -> tuple[str, list[str]]:
        """("ready" | "degraded" | "unavailable", causes)."""
        if self.draining:
            return "unavailable", ["draining: shutting down"]
        if not self.warmed_up:
            return "unavailable", ["warming up"]
        causes = []
        for m in self.registry.models.values():
            if m.error:
                causes.append(f"{m.name}: {m.error}")
            elif m.role == "student" and self.breaker.is_open(m.name):
                causes.append(f"{m.name}: circuit open after repeated failures")
        servable = [m for m in self.registry.models.values() if m.ready]
        if not servable:
            return "unavailable", causes or ["no model loaded"]
        return ("degraded" if causes else "ready"), causes

    # ---- routing -----------------------------------------------------------------------------------------
    def route(
        self, model: str | None, steps: int | None, want_teacher: bool = False
    ) -> tuple[ServedModel, int, str | None]:
        """-> (who serves, at how many steps, fallback reason or None)."""
        name = model or self.registry.default
        entry = self.registry.models.get(name)
        if entry is None:
            raise BadRequest(
                f"model {name!r} does not exist; GET /v1/models lists the models",
                param="model",
                code="model_not_found",
                status=404,
            )
        if steps is not None and steps > self.settings.max_teacher_steps:
            raise BadRequest(f"steps must be at most {self.settings.max_teacher_steps}", param="steps")
        if model is None and steps is not None and entry.role == "student" and not entry.supports(steps):
            # no model named: another student that serves this step count beats falling back to the teacher;
            # among several, the one with the best measured quality there (its card's eval rows)
            entry = self.registry.best_student_for(steps, self.breaker.allow) or entry
        reason = None
        if entry.role == "teacher":
            if not entry.ready:
                raise NotServable(f"{entry.name} is not available: {entry.error}")
            return entry, steps or entry.model.sampling.default_steps, None
        if want_teacher:
            reason = "teacher_requested"
        elif not entry.ready:
            reason = "student_unavailable"
        elif steps is not None and not entry.supports(steps):
            reason = "steps_unsupported"
        elif not self.breaker.allow(entry.name):
            reason = "circuit_open"
        if reason is None:
            return entry, steps or entry.model.sampling.default_steps, None
        teacher = self.registry.teacher_for(entry.name)
        if teacher is None:
            if reason == "steps_unsupported":
                raise BadRequest(
                    f"{entry.name} supports steps {entry.supported_steps()} and has no teacher to serve {steps}",
                    param="steps",
                )
            raise NotServable(f"{entry.name} cannot serve ({reason}) and its teacher is not available")
        # a count the teacher can run is honoured; otherwise (a student's 1-4) the teacher's default
        t_steps = steps if steps is not None and steps > max(entry.supported_steps() or [0]) else None
        return teacher, t_steps or teacher.model.sampling.default_steps, reason

    # ---- submission --------------------------------------------------------------------------------------
    async def submit(self, job: Job) -> Result:
        if len(self.queue) >= self.settings.queue_size:
            raise QueueFull()
        job.future = asyncio.get_running_loop().create_future()
        self._arrival_gap_s, self._last_arrival = job.enqueued - self._last_arrival, job.enqueued
        self.queue.append(job)
        self.metrics.queue_depth.set(len(self.queue))
        self._wake.set()
        try:
            return await job.future
        finally:
            job.cancelled = True  # a timed-out or abandoned job is dropped if still queued

    # ---- batching ----------------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        before = len(self.queue)
        self.queue = deque(j for j in self.queue if not j.cancelled)
        if len(self.queue) != before:
            self.metrics.errors.labels(type="dropped_before_run").inc(before - len(self.queue))
        self.metrics.queue_depth.set(len(self.queue))

    def _take_batch(self) -> list[Job]:
        """The oldest job and every queued job compatible with it, up to max_batch images."""
        self._drop_cancelled()
        if not self.queue:
            return []
        key, batch, rest, images = self.queue[0].key, [], deque(), 0
        for job in self.queue:
            n = len(job.seeds)
            if job.key == key and (not batch or images + n <= self.settings.max_batch):
                batch.append(job)
                images += n
            else:
                rest.append(job)
        self.queue = rest
        self.metrics.queue_depth.set(len(self.queue))
        return batch

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            # The device is idle. Wait up to max_wait_ms for the batch to fill only when requests are arriving
            # in a burst (the last two came within max_wait_ms of each other): a lone request runs at once,
            # so batching costs nothing at low load.
            wait_s = self.settings.max_wait_ms / 1000 if self._bursty() else 0.0
            deadline = time.perf_counter() + wait_s
            while self._queued_images(self.queue[0].key) < self.settings.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
                if not self.queue:
                    break
            batch = self._take_batch()
            if not batch:
                continue
            results = await loop.run_in_executor(self.executor, self._run_batch, batch)
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
        steps, guidance = batch[0].steps, batch[0].guidance
        for job in batch:
            self.metrics.queue_wait.observe(start - job.enqueued)
        try:
            images = self._generate(entry, batch, steps, guidance)
            served_by, reasons = entry.name, [job.fallback_reason for job in batch]
            if entry.role == "student":
                self.breaker.record_success(entry.name)
        except Exception as e:
            if entry.role != "student":
                log.error("%s failed on a batch: %s", entry.name, e)
                self.metrics.errors.labels(type="model_error").inc()
                return [NotServable(f"{entry.name} failed: {e}") for _ in batch]
            # (c) a student that raises or returns non-finite values: the teacher regenerates the batch
            log.warning("student %s failed (%s); the teacher regenerates its batch", entry.name, e)
            self.breaker.record_failure(entry.name)
            teacher = self.registry.teacher_for(entry.name)
            if teacher is None:
                self.metrics.errors.labels(type="model_error").inc()
                return [NotServable(f"{entry.name} failed and has no teacher: {e}") for _ in batch]
            steps, guidance, entry = teacher.model.sampling.default_steps, None, teacher
            try:
                images = self._generate(teacher, batch, steps, guidance)
            except Exception as e2:
                self.metrics.errors.labels(type="model_error").inc()
                return [NotServable(f"{teacher.name} failed too: {e2}") for _ in batch]
            served_by, reasons = teacher.name, ["student_error"] * len(batch)
        elapsed = time.perf_counter() - start
        n_images = sum(len(j.seeds) for j in batch)
        self.metrics.batch_inference.labels(model=served_by, steps=str(steps)).observe(elapsed)
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
    def _generate(entry: ServedModel, batch: list[Job], steps: int, guidance: float | None) -> torch.Tensor:
        prompts = [job.prompt for job in batch for _ in job.seeds]
        seeds = [s for job in batch for s in job.seeds]
        images = entry.model.generate(prompts, seeds, steps=steps, guidance=guidance).cpu()
        if not torch.isfinite(images).all():
            raise FloatingPointError("non-finite values in the output")
        return images
