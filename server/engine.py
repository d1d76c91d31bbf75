"""The serving engine: routing with teacher fallback, work-based admission, a supervised batcher and one executor
thread per device.

Requests become Jobs. ``route`` (server/routing.py, over a snapshot of the models' health) picks who serves a
job. Admission counts work, not requests: a job costs images × steps × the model's seconds per image-step
(measured at warm-up, then tracked from every batch), and the queue holds at most ``max_queued_work_s`` of it
(and ``queue_size`` jobs). Scheduling: the next batch starts from the queued job with the earliest
*arrival + estimated cost*, so a 1-step request that arrives behind a long teacher request overtakes it, while
the expensive job still runs once the cheap arrivals that would finish before it are served: nothing starves
(docs/api.md, "Admission and scheduling"). The batcher groups queued jobs with the same (model, steps,
guidance, size) into batches of at most max_batch images, waiting at most max_wait_ms for a batch to fill when
requests arrive in a burst, and runs the device's work on its executor thread, so the event loop never blocks on
the model.

Step-level scheduling (``step_scheduling``, on by default): many-step work (more than STEPWISE_MIN_STEPS steps
on a model that can sample step by step: models/inflight.py; a teacher, or a many-step student such as a
guidance-distilled one, whose failed jobs then go to its teacher) runs as a *running batch*, one model evaluation per
slice of device time. Between two of its steps the batcher runs one whole student batch, so a 1-step request
waits for at most one teacher step, not a whole teacher batch; and queued jobs of the same key join the running
batch at the next step boundary (continuous batching), each row at its own position on the time grid, so the
teacher's batches stay full. Student and teacher slices alternate when both have work: neither starves. A lone
running batch with nothing else queued takes up to MAX_STEPS_PER_SLICE steps per hand-off to the device thread
(an arrival or a cancellation ends the slice after its current step), so the teacher alone pays no per-step
scheduling cost.

CPU throughput mode (server/streams.py): while the queue holds a full batch of whole-batch work for every stream,
``streams`` batches run at once, each on its own device thread with its share of the cores, instead of one batch
over all of them; helper batchers take those batches. Step-wise work stays on the main device thread.

Supervision: an error anywhere in a batch fails that batch's requests only; the batcher tasks are restarted if
they ever end, and /readyz says "unavailable" until the main one runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from fewstep.models.images import encode, to_pil
from fewstep.models.inflight import InFlight
from fewstep.server.breaker import CircuitBreaker
from fewstep.server.metrics import Metrics
from fewstep.server.registry import Registry, ServedModel
from fewstep.server.routing import Decision, ModelView, RouteError, Snapshot, readiness, route
from fewstep.server.settings import ServeSettings
from fewstep.server.streams import Streams, next_mode, split_batch, use_threads

log = logging.getLogger("fewstep.server")
DEFAULT_COST_S = 0.02  # seconds per image-step before a model's first measurement (a CPU student's order)
STEPWISE_MIN_STEPS = 4  # jobs with more steps than this run step by step (a student's 1-4 run as one slice)
RECENT_S = 2.0  # the window over which the device time of whole batches is rated (steps "auto")
MAX_RUNNING = 4  # running batches at once (distinct keys); more wait in the queue, as do their rows and memory
# a lone running batch with nothing else to do takes up to this many steps per slice (one executor hand-off instead
# of one per step, as vLLM's multi-step scheduling); an arrival or a cancellation ends the slice after its step
MAX_STEPS_PER_SLICE = 8
# a job whose images have at most this many pixels in all is encoded on the device thread when its batch ends (eight
# 64×64 images: well under a millisecond); larger images are encoded by the HTTP layer, off both threads
SMALL_IMAGES_PIXELS = 64 * 64 * 8


class QueueFull(Exception):
    """Admission refused: the queued work is at its limit. The HTTP layer answers 429 with Retry-After."""


class NotServable(Exception):
    """No model can serve this request now (a student and its teacher both unavailable, or shutting down)."""


class BatchFailed(Exception):
    """Something outside the models failed while running a batch: that batch's requests fail, nothing else."""


@dataclass(frozen=True)
class Encoding:
    """How a request's images are served: format, JPEG/WebP quality and PNG zlib level (models/images.py)."""

    fmt: str = "png"
    quality: int = 95
    png_level: int = 1

    def __call__(self, image: Image.Image) -> bytes:
        return encode(image, self.fmt, self.quality, self.png_level)


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
    started: float | None = None  # when it joined a running batch (step-level scheduling)
    gate: bool = False  # score the student's images; the teacher regenerates those under the gate's threshold
    children: list[Job] = field(default_factory=list)  # its gated images' teacher job (cancelled with it)
    encoding: Encoding | None = None  # set: small images are encoded on the device thread (SMALL_IMAGES_PIXELS)
    streamable: bool = False  # a throughput stream may run it (Engine._streamable, set when it is queued)

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
    # the quality gate (training/gate.py): each image's score, and the images it sends to the teacher
    gate_scores: list[float] | None = None
    regenerate: list[int] = field(default_factory=list)
    image_served_by: list[str] | None = None  # per image, when some were regenerated
    image_reasons: list[str | None] | None = None
    encoded: list[bytes] | None = None  # the images in the job's encoding, when the device thread encoded them
    encode_ms: float = 0.0


def device_executor(name: str = "fewstep-device") -> ThreadPoolExecutor:
    """The one thread that runs every model call of a device: loading, warm-up and batches (and, in CPU throughput
    mode, one more per extra stream, each running whole batches on its share of the cores: server/streams.py).

    One thread, not just one at a time: on a CPU each thread that enters a parallel torch op gets its own
    OpenMP team, and a second team (say, the main thread's, from loading the models there) competes with
    the serving thread's for the same cores (docs/performance.md: HTTP/in-process 2.07× before, 1.00-1.65×
    after, by benchmarks/serve.py).
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=name_os_thread, initargs=(name,))


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` where the OS shows it too (``top -H``, /proc/<pid>/task/*/comm), so that
    a device thread's CPU can be told from the event loop's (benchmarks/reliability.py's overload rows). Linux
    only (prctl PR_SET_NAME, at most 15 bytes: "fewstep-device" becomes "fewstep-dev"); a no-op elsewhere."""
    short = name.replace("fewstep-device", "fewstep-dev").encode()[:15]
    with contextlib.suppress(Exception):  # a name is a nicety: never a reason for the device thread to fail
        ctypes.CDLL(None).prctl(15, short, 0, 0, 0)


@dataclass(eq=False)
class Running:
    """A batch sampled one step at a time (step-level scheduling): its key, model, rows and their jobs."""

    key: tuple
    entry: ServedModel
    batch: InFlight | None = None  # made on the executor thread at the first step
    jobs: dict[int, Job] = field(default_factory=dict)  # id(job) -> job
    peak: dict[int, int] = field(default_factory=dict)  # id(job) -> the most rows a step of it computed

    def rows(self, engine: Engine) -> int:
        """Rows its next steps compute: its jobs' and the queued jobs that will join it (up to max_batch)."""
        queued = sum(len(j.seeds) for j in engine.queue if j.key == self.key)
        mine = sum(len(j.seeds) for j in self.jobs.values())
        return max(mine, min(engine.settings.max_batch, mine + queued))


@dataclass(frozen=True)
class Plan:
    """What steps: "auto" chose, and what it predicted for every candidate (best first)."""

    decision: Decision
    predicted_s: float
    candidates: list[tuple[Decision, float]]


class _Dropped:
    """A cancelled job's rows left its running batch: nothing to answer (its request is gone)."""


class _ToTeacher:
    """A student's running batch failed (an error, or non-finite images): the job goes to the teacher."""


def small(images: list[Image.Image]) -> bool:
    """Whether a job's images are small enough to encode where they are, without a thread hop."""
    return sum(im.width * im.height for im in images) <= SMALL_IMAGES_PIXELS


def _encoded(job: Job, result: Result) -> Result:
    """``result`` with its images in the job's encoding when they are small and final (none for the teacher to
    redo), on the device thread as its batch ends.

    In a burst of small requests the event loop is the bottleneck between two batches: it answers one batch and
    reads the next while the device waits. Encoding here, where the loop does not wait for a thread hop, takes
    that work out of the gap (docs/performance.md). Larger images are encoded by the HTTP layer, off both."""
    if job.encoding is None or job.cancelled or result.regenerate or not small(result.images):
        return result
    t0 = time.perf_counter()
    try:
        encoded = [job.encoding(im) for im in result.images]
    except Exception:  # the HTTP layer encodes them again and answers the error there
        return result
    return replace(result, encoded=encoded, encode_ms=1000 * (time.perf_counter() - t0))


def _settle(job: Job, outcome: Result | BaseException) -> None:
    if job.future is not None and not job.future.done():
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)


class Engine:
    def __init__(
        self,
        registry: Registry,
        settings: ServeSettings,
        metrics: Metrics,
        executor: ThreadPoolExecutor | None = None,
        streams: Streams | None = None,
    ):
        self.registry, self.settings, self.metrics = registry, settings, metrics
        self.breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown_s)
        self.executor = executor or device_executor()
        self.streams = streams or Streams(1, torch.get_num_threads())
        # throughput mode's other device threads (the main one is self.executor), their batchers and their batches
        self.helpers = [device_executor(f"fewstep-device-{k}") for k in range(1, self.streams.count)]
        self._helping: set[asyncio.Future] = set()
        self._helper_wake: asyncio.Event | None = None
        self.throughput = False  # throughput mode now (read by the device threads for their thread counts)
        self._main_width = 0  # torch threads of the main device thread's batch or step in flight (0: none; loop-side)
        if self.helpers and settings.queue_size < self.streams.count * settings.max_batch:
            log.warning(
                "cpu_streams %d: the queue (queue_size %d) holds fewer 1-image requests than a batch for every "
                "stream (%d × max_batch %d), so the throughput mode turns on only when requests ask for several "
                "images", self.streams.count, settings.queue_size, self.streams.count, settings.max_batch,
            )  # fmt: skip
        self._cost_lock = threading.Lock()  # cost_s is updated from every device thread
        metrics.device_streams.set(1)
        self.queue: deque[Job] = deque()
        self.queued_work_s = 0.0
        self._whole_images = 0  # queued images a throughput stream could take (_streamable): the mode's measure
        self.cost_s: dict[str, float] = {}  # seconds per image-step, per model (warm-up, then every batch)
        self._wake: asyncio.Event | None = None
        self._arrived = threading.Event()  # set on the event loop by arrivals and cancellations, read by the device
        self._snapshot: tuple[tuple, Snapshot] | None = None  # (the models' health it was built from, it)
        self._tasks: dict[str, asyncio.Task] = {}  # the supervised batchers, by name (_supervise)
        self._warm_task: asyncio.Task | None = None
        self._running: asyncio.Future | None = None  # the slice of work on the executor now
        self.running: list[Running] = []  # batches sampled step by step (step-level scheduling)
        self._owe_step = False  # a whole batch just ran: the running batches get the next slice
        self._turn = 0  # round-robin over the running batches
        self._whole_ends = 0.0  # when the whole batch on the device now is estimated to end
        self._regenerating: set[asyncio.Task] = set()  # quality-gate regenerations waiting for the teacher
        # steps "auto": measured end-to-end time / predicted device time, tracked from every auto request, so the
        # predictions include what the device model leaves out (HTTP, encoding, clients sharing the machine)
        self.auto_correction = 1.0
        self._wholes: deque[tuple[float, float]] = deque(maxlen=512)  # (end, seconds) of recent whole batches
        self._stopping = False
        self.batcher_restarts = 0
        self.warmed_up = False
        self.draining = False  # set on SIGTERM (server/lifecycle.py): /readyz answers 503 while in-flight work ends
        self._last_arrival, self._arrival_gap_s = float("-inf"), float("inf")

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the batcher; warm up in the background, so /healthz answers at once and /readyz says 503
        until every model has run once (requests that arrive meanwhile queue behind the warm-up)."""
        self._wake, self._helper_wake = asyncio.Event(), asyncio.Event()
        self._supervise("fewstep-batcher", lambda: self._next_batch())
        for k in range(len(self.helpers)):
            self._supervise(f"fewstep-batcher-{k + 1}", lambda k=k: self._next_helper_batch(k))
        self._warm_task = asyncio.create_task(self._warm(), name="fewstep-warmup")

    @property
    def _task(self) -> asyncio.Task | None:
        """The main batcher (readiness: /readyz says unavailable while it is not running)."""
        return self._tasks.get("fewstep-batcher")

    def _supervise(self, name: str, one_slice: Callable[[], Awaitable[None]]) -> None:
        """Run ``one_slice`` for ever as the task ``name``: an error outside the model calls is logged and counted and
        the next slice runs; if the task ever ends while the engine runs, it is logged, counted and started again.
        (``one_slice`` looks its method up at each call, so a restarted batcher runs what the engine has now.)"""

        async def run() -> None:
            while True:
                try:
                    await one_slice()
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug outside the model calls: log it, keep serving
                    log.exception("%s error", name)
                    self.metrics.error("internal")

        def ended(task: asyncio.Task) -> None:
            if self._stopping:
                return
            exc = None if task.cancelled() else task.exception()
            log.error("%s stopped (%r); restarting it", name, exc)
            self.metrics.error("batcher_restart")
            self.batcher_restarts += 1
            self._supervise(name, one_slice)

        self._tasks[name] = task = asyncio.create_task(run(), name=name)
        task.add_done_callback(ended)

    async def _warm(self) -> None:
        if self.settings.warmup:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.warmup)
        self.warmed_up = True
        self._helper_wake.set()  # throughput streams start after the warm-up

    async def stop(self, deadline_s: float | None = None) -> None:
        """Finish what is queued and running (SIGTERM drains) until ``deadline_s``; then fail what is still
        queued with 503 and stop (a batch still running is abandoned: lifecycle.Deadlines answers its requests
        at the drain deadline). Never blocks the event loop."""
        deadline = time.perf_counter() + (self.settings.request_timeout_s if deadline_s is None else deadline_s)
        while (
            self.queue or self.running or self._running is not None or self._helping or self._regenerating
        ) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        self._stopping = True
        for job in [*self.queue, *(j for run in self.running for j in run.jobs.values())]:
            if job.future is not None and not job.future.done():
                job.future.set_exception(NotServable("the server is shutting down"))
        self.queue.clear()
        self.running.clear()
        for task in (self._warm_task, *self._tasks.values()):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for executor in (self.executor, *self.helpers):
            executor.shutdown(wait=False, cancel_futures=True)

    def warmup(self) -> None:
        """Run every model once at each step count it serves (so the first request pays no start-up cost), and
        measure its seconds per image-step for admission. A student that fails is marked unavailable."""
        for m in self.registry.models.values():
            if not m.ready:
                continue
            steps_list = m.supported_steps() if m.role == "student" else [m.default_steps]
            try:
                if getattr(m.model, "uses_graphs", False):  # its graphs are traced at the first call: not timed
                    m.model.generate(["warm up"], [0], steps=1 if m.model.supports(1) else steps_list[0])
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

    def _observe_cost(self, name: str, seconds: float, images: int, steps: int, threads: int | None = None) -> None:
        """Seconds per image-step of the whole device: a batch that ran on ``threads`` of the streams' threads
        (throughput mode) had only that share of the cores, so its time counts in that proportion."""
        streams = self.streams
        share = 1.0 if threads is None or threads >= streams.threads else threads / (streams.per_stream * streams.count)
        per = seconds * share / max(1, images * steps)
        with self._cost_lock:
            old = self.cost_s.get(name)
            self.cost_s[name] = per if old is None else 0.8 * old + 0.2 * per

    # ---- health and routing ------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The models' health now, as plain data for routing (server/routing.py). Every request routes on one, so
        it is rebuilt only when some model's health has changed since the last (building one is most of what
        routing costs, about 30 µs for the zoo's models)."""
        health = (
            self.registry.default,
            tuple(
                (m.name, m.ready, m.error, m.role == "student" and self.breaker.is_open(m.name))
                for m in self.registry.models.values()
            ),
        )
        if self._snapshot is None or self._snapshot[0] != health:
            self._snapshot = (health, self._build_snapshot())
        return self._snapshot[1]

    def _build_snapshot(self) -> Snapshot:
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

    def predict_s(self, model: str, images: int, steps: int, size: tuple[int, int] | None = None) -> float:
        """Seconds until a job submitted now would complete (steps: "auto"): the queued work scheduled before it
        (earlier arrival + cost), the running batches' steps it shares the device with, and its own cost, all from
        the measured seconds per image-step. A whole batch waits for one step of each running batch; step-wise
        work shares every round of steps with them (its rows join a running batch of the same key)."""
        own = self.estimate_s(model, images, steps, size)
        now = time.perf_counter()
        ahead = sum(j.cost_s for j in self.queue if j.priority <= now + own) + max(0.0, self._whole_ends - now)
        one_round = sum(run.rows(self) * self.cost_s.get(run.entry.name, DEFAULT_COST_S) for run in self.running)
        if not self._stepwise_for(model, steps, size):
            # in throughput mode its own batch runs on one stream's share of the threads
            stretch = self.streams.threads / self.streams.per_stream if self.throughput else 1.0
            return ahead + one_round + own * stretch
        # step-wise work shares the device with the whole (student) batches that arrive while it runs: at the
        # recent rate r of their device time, it stretches by r / (1 − r), at most one whole batch per step.
        # Conservative: a lone client's own earlier requests count too (measured: benchmarks/slo.py)
        base = ahead + own + steps * one_round
        recent = [d for end, d in self._wholes if end > now - RECENT_S]
        if not recent:
            return base
        r = min(0.9, sum(recent) / RECENT_S)
        return base + min(base * r / (1 - r), steps * sum(recent) / len(recent))

    def plan_auto(
        self, model: str | None, images: int, slo_s: float, guidance: float | None = None,
        size: tuple[int, int] | None = None,
    ) -> Plan:  # fmt: skip
        """steps: "auto": the best step count whose predicted completion meets ``slo_s``. Candidates, best first:
        the teacher at its default steps, then each step count a healthy student serves, most steps first
        (routing decides who serves each, as for an explicit count); the first that fits is chosen, else the
        fastest. Raises routing.RouteError when nothing can serve."""
        snap = self.snapshot()
        decisions = []
        if self._teacher_of(snap, model):
            with contextlib.suppress(RouteError):  # a teacher that is down is no candidate
                decisions.append(replace(route(snap, model, None, True, guidance), reason=None))  # chosen, not asked
        asked = snap.models.get(model or snap.default)
        counts = sorted({s for m in snap.models.values() if m.role == "student" and m.healthy for s in m.serves})
        if asked is not None and asked.role == "teacher":
            counts = []  # a teacher named: its default steps (students answer for themselves, not for it)
        for steps in reversed(counts):
            with contextlib.suppress(RouteError):
                d = route(snap, model, steps, False, guidance)
                if d.reason is None and d not in decisions:
                    decisions.append(d)
        if not decisions:
            decisions = [route(snap, model, None, False, guidance)]
        k = self.auto_correction
        candidates = [(d, k * self.predict_s(d.model, images, d.steps, size)) for d in decisions]
        fits = [c for c in candidates if c[1] <= slo_s]
        decision, predicted = fits[0] if fits else min(candidates, key=lambda c: c[1])
        return Plan(decision, predicted, candidates)

    def observe_auto(self, predicted_s: float, actual_s: float) -> None:
        """An auto request's end-to-end time against its (corrected) prediction: updates the correction."""
        if predicted_s > 0:
            ratio = self.auto_correction * actual_s / predicted_s
            self.auto_correction = min(8.0, max(0.5, 0.9 * self.auto_correction + 0.1 * ratio))

    @staticmethod
    def _teacher_of(snap: Snapshot, model: str | None) -> bool:
        """Whether the model asked for (or the default) has a teacher view to fall back on."""
        m = snap.models.get(model or snap.default)
        if m is not None and m.role == "student":
            m = snap.models.get(m.teacher or "")
        return m is not None and m.role == "teacher" and m.healthy

    def saturated(self) -> bool:
        """Full before looking at the request: the HTTP layer refuses without reading the body."""
        return len(self.queue) >= self.settings.queue_size or self.queued_work_s >= self.settings.max_queued_work_s

    def retry_after_s(self) -> int:
        """When to come back: the queued work's estimated time, at least the configured minimum."""
        return max(self.settings.retry_after_s, math.ceil(self.queued_work_s))

    def submit(self, job: Job) -> asyncio.Future:
        """Admit the job into the queue (or raise QueueFull): -> the future of its Result. Whoever stops waiting
        for it calls ``cancel`` (a future, not a task: under load every task a request creates costs the event
        loop, on the cores the model runs on)."""
        job.cost_s = self.estimate_s(job.model, len(job.seeds), job.steps, job.size)
        # an empty queue takes any one job (the request limits bound it); otherwise its work must fit
        if self.queue and (self.saturated() or self.queued_work_s + job.cost_s > self.settings.max_queued_work_s):
            raise QueueFull()
        job.future = asyncio.get_running_loop().create_future()
        self._arrival_gap_s, self._last_arrival = job.enqueued - self._last_arrival, job.enqueued
        self._enqueue(job)
        return job.future

    def cancel(self, job: Job) -> None:
        """A job nobody waits for any more (timeout, disconnect): out of the queue and its work budget now,
        not when the running batch ends, so dead jobs do not turn live clients away."""
        job.cancelled = True
        if job.future is not None and not job.future.done():
            job.future.cancel()  # nobody will read what the batch would have set
        self._arrived.set()  # a multi-step slice ends after its step: the job's rows leave at the next one
        for child in job.children:  # the teacher's regeneration of its gated images
            self.cancel(child)
        if any(j is job for j in self.queue):
            self._remove([job])
            self.metrics.error("dropped_before_run")

    # ---- batching ----------------------------------------------------------------------------------------
    def _enqueue(self, job: Job) -> None:
        """An admitted job into the queue and its work budget; wakes the batcher and ends a multi-step slice."""
        self.queue.append(job)
        self.queued_work_s += job.cost_s
        job.streamable = self._streamable(job)
        if job.streamable:
            self._whole_images += len(job.seeds)
        self.metrics.queue_depth.set(len(self.queue))
        self._wake.set()
        if self.helpers and (self.throughput or self._whole_images >= self.streams.count * self.settings.max_batch):
            self._helper_wake.set()  # a throughput stream may start a batch (not woken by every light-load arrival)
        self._arrived.set()

    def _remove(self, jobs: list[Job]) -> None:
        gone = {id(j) for j in jobs}
        self.queue = deque(j for j in self.queue if id(j) not in gone)
        self.queued_work_s = max(0.0, sum(j.cost_s for j in self.queue))
        self._whole_images = sum(len(j.seeds) for j in self.queue if j.streamable)
        self.metrics.queue_depth.set(len(self.queue))

    def _take_batch(self, whole_only: bool = False) -> list[Job]:
        """The queued job with the earliest arrival + cost, and every queued job compatible with it, oldest first,
        up to max_batch images (``whole_only``: among the jobs a throughput stream may run, ``_streamable``)."""
        self._drop_cancelled()
        takeable = [j for j in self.queue if self._takeable(j) and (not whole_only or j.streamable)]
        if not takeable:
            return []
        head = min(takeable, key=lambda j: j.priority)
        batch, images = [head], len(head.seeds)
        for job in self.queue:
            if job is not head and job.key == head.key and images + len(job.seeds) <= self.settings.max_batch:
                batch.append(job)
                images += len(job.seeds)
        self._remove(batch)
        return batch

    async def _next_batch(self) -> None:
        """One slice of device work: a step of a running batch, or a whole batch (student work, or everything when
        step scheduling is off), or a new running batch's first step."""
        while not self.queue and not self.running:
            self._wake.clear()
            await self._wake.wait()
        self._drop_cancelled()
        if self.running and (self._owe_step or not self._other_work_queued()):
            self._owe_step = False
            run = self.running[self._turn % len(self.running)]
            self._turn += 1
            await self._step(run, self._joiners(run))
            return
        if not self.queue:
            return
        if not self._update_mode() and not self.running:
            await self._fill_wait()  # throughput mode: a full batch is queued for every stream, nothing to wait for
            if not self.queue:
                return
        batch = self._take_batch()
        if not batch:
            return
        if self._stepwise(batch[0]):
            run = Running(batch[0].key, self.registry.models[batch[0].model])
            self.running.append(run)
            run.jobs.update((id(j), j) for j in batch)
            await self._step(run, batch)
            return
        await self._whole(batch)
        self._owe_step = bool(self.running)

    async def _fill_wait(self) -> None:
        """The device is idle. Wait up to max_wait_ms for the batch to fill only when requests are arriving in a
        burst (the last two came within max_wait_ms of each other): a lone request runs at once.

        A backlog of at least half a batch counts its wait from its oldest request's arrival (as Triton's
        max_queue_delay), so requests that queued while a batch ran start as soon as it ends: waiting for more
        then only idled the device, up to max_wait_ms a batch under open-loop arrivals (docs/reliability.md).
        Fewer requests wait from now: a straggler that missed the last batch waits for the burst behind it
        instead of running alone, which split 32 lockstep clients into batches of 31 and 1 for good."""
        wait_s = self.settings.max_wait_ms / 1000 if self._bursty() else 0.0
        head_key = min(self.queue, key=lambda j: j.priority).key  # nothing runs: every queued job is takeable
        backlog = 2 * self._queued_images(head_key) >= self.settings.max_batch
        oldest = min(j.enqueued for j in self.queue if j.key == head_key) if backlog else time.perf_counter()
        deadline = oldest + wait_s
        while self._queued_images(head_key) < self.settings.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)
            if not self.queue or self._update_mode():  # gone, or a backlog for every stream: nothing to wait for
                return

    def _update_mode(self) -> bool:
        """Throughput mode from the queue now (server/streams.py); helpers are woken when it starts."""
        if not self.helpers:
            return False
        mode = next_mode(self.throughput, self._whole_images, self.settings.max_batch, self.streams.count)
        if mode != self.throughput:
            self.throughput = mode
            self.metrics.device_streams.set(self.streams.count if mode else 1)
            log.debug("throughput mode %s (%d images queued)", "on" if mode else "off", self._whole_images)
            self._helper_wake.set()
        return mode

    async def _next_helper_batch(self, k: int) -> None:
        """A throughput stream's slice: a whole batch on its own device thread, only in throughput mode, after the
        warm-up, and never beside a main-thread batch that runs on every thread (the barrier stalls the mode
        exists to avoid: it waits for that batch to end)."""
        ready = self.warmed_up and self._main_width <= self.streams.per_stream
        batch = self._take_batch(whole_only=True) if ready and self._update_mode() else []
        if not batch:
            self._helper_wake.clear()
            await self._helper_wake.wait()
            return
        running = asyncio.get_running_loop().run_in_executor(
            self.helpers[k], self._run_batch, batch, self.streams.per_stream
        )
        self._helping.add(running)
        try:
            results = await running
        except Exception as e:
            results = self._batch_failed(batch, e)
        finally:
            self._helping.discard(running)
        self._finish(batch, results)

    def _batch_failed(self, batch: list[Job], e: Exception) -> list[Result | BaseException]:
        """The batch failed outside the model calls: its requests fail, nothing else."""
        log.error("batch of %d requests failed", len(batch), exc_info=e)
        self.metrics.error("internal")
        return [BatchFailed(f"the batch failed: {type(e).__name__}") for _ in batch]

    async def _whole(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        began = time.perf_counter()
        self._main_width = self._main_threads()
        # cost_s is device-seconds of every thread: a batch on a share of them takes longer (throughput mode)
        self._whole_ends = began + sum(j.cost_s for j in batch) * self.streams.threads / self._main_width
        parts = self._split(batch)
        if len(parts) == 1:
            self._running = loop.run_in_executor(self.executor, self._run_batch, batch, self._main_width)
        else:  # one part per stream, each single-threaded, at once (server/streams.py split_batch)
            self._running = asyncio.gather(
                *(
                    loop.run_in_executor(executor, self._run_batch, part, self.streams.per_stream, False)
                    for executor, part in zip((self.executor, *self.helpers), parts, strict=False)
                ),
                return_exceptions=True,
            )
        try:
            done = await self._running
            if len(parts) == 1:
                results = done
            else:  # a part that failed outside the model calls fails only its own requests
                results = []
                for part, outcome in zip(parts, done, strict=True):
                    results += self._batch_failed(part, outcome) if isinstance(outcome, BaseException) else outcome
                self._record_student(batch[0].model, results)
            self._wholes.append((time.perf_counter(), time.perf_counter() - began))
        except Exception as e:
            results = self._batch_failed(batch, e)
        finally:
            self._running, self._main_width = None, 0
            if self.helpers:
                self._helper_wake.set()  # a throughput stream may have waited for this batch to end
        self._finish(batch, results)

    def _split(self, batch: list[Job]) -> list[list[Job]]:
        """The parts a whole batch runs as: one per stream when the batch runs over every thread, after the warm-up,
        its model may run on several threads at once (``streamable``) and every part gets ``cpu_split_images``
        images (parts are cut between jobs: a batch whose jobs do not split so is not split); else the batch."""
        per_part = self.settings.cpu_split_images
        if (
            not self.helpers
            or not per_part
            or not self.warmed_up
            or self._main_width != self.streams.threads
            or not batch[0].streamable
            or sum(len(j.seeds) for j in batch) < per_part * self.streams.count
        ):
            return [batch]
        parts = split_batch(batch, self.streams.count)
        if len(parts) < 2 or min(sum(len(j.seeds) for j in part) for part in parts) < per_part:
            return [batch]
        return parts

    def _record_student(self, model: str, results: list[Result | BaseException]) -> None:
        """A split batch of a student counts once for its circuit breaker, as the batch would have unsplit (its
        parts do not record: two parts would count twice, and a success landing last would reset a failure)."""
        if self.registry.models[model].role != "student":
            return
        failed = any(
            isinstance(r, NotServable) or (isinstance(r, Result) and r.fallback_reason == "student_error")
            for r in results
        )
        (self.breaker.record_failure if failed else self.breaker.record_success)(model)

    def _finish(self, batch: list[Job], results: list[Result | BaseException]) -> None:
        """A whole batch's outcomes to its requests; images the quality gate doubted go to the teacher first."""
        for job, outcome in zip(batch, results, strict=True):
            if isinstance(outcome, Result) and outcome.regenerate and not job.cancelled and not self._stopping:
                task = asyncio.get_running_loop().create_task(self._regenerate(job, outcome))
                self._regenerating.add(task)
                task.add_done_callback(self._regenerating.discard)
            else:
                _settle(job, outcome)

    async def _regenerate(self, job: Job, result: Result) -> None:
        """The quality gate's second half, inside the same request: the images the gate doubted go to the teacher
        as a job of their own (scheduled like any teacher work, joining a running batch when one is there); the
        request is answered when they are back. If the teacher fails, the student's images stand."""
        if job.cancelled:  # its request left between the batch and this task's first step: nothing to redo
            return
        teacher = self.registry.teacher_for(job.model)
        idx = result.regenerate
        if teacher is None:
            self.metrics.gate_images.labels(outcome="kept_no_teacher").inc(len(idx))
            _settle(job, result)
            return
        # the teacher at the scale the student was sampled at, when the student takes one (its guidance embedding
        # stands for the teacher's CFG at that scale); a student with CFG distilled in: the teacher's own default
        student = self.registry.models[job.model]
        guidance = job.guidance if job.guidance is not None else (
            student.default_guidance if student.guidance_input else None)  # fmt: skip
        child = Job(model=teacher.name, requested=job.requested, prompt=job.prompt, steps=teacher.default_steps,
                    guidance=guidance, seeds=[result.seeds[i] for i in idx], size=job.size,
                    fallback_reason="quality_gate", enqueued=job.enqueued)  # fmt: skip
        child.cost_s = self.estimate_s(child.model, len(child.seeds), child.steps, child.size)
        child.future = asyncio.get_running_loop().create_future()
        job.children.append(child)
        self._enqueue(child)  # admitted with its request: never a 429 halfway through
        try:
            regenerated = await child.future
        except Exception as e:
            log.warning("the teacher could not regenerate gated images: %s", e)
            self.metrics.gate_images.labels(outcome="kept_teacher_failed").inc(len(idx))
            _settle(job, result)
            return
        images, served, reasons = (
            list(result.images),
            [result.served_by] * len(result.images),
            [None] * len(result.images),
        )
        for k, i in enumerate(idx):
            images[i], served[i], reasons[i] = regenerated.images[k], regenerated.served_by, "quality_gate"
        _settle(job, replace(result, images=images, encoded=None, image_served_by=served, image_reasons=reasons,
                             fallback_reason=result.fallback_reason or "quality_gate",
                             inference_ms=result.inference_ms + regenerated.inference_ms))  # fmt: skip

    # ---- step-level scheduling -------------------------------------------------------------------------
    def _stepwise(self, job: Job) -> bool:
        return self._stepwise_for(job.model, job.steps, job.size)

    def _stepwise_for(self, model: str, steps: int, size: tuple[int, int] | None) -> bool:
        entry = self.registry.models.get(model)
        return (
            self.settings.step_scheduling
            and entry is not None
            # a student's fallback and breaker work step by step too (_ToTeacher); its gate scores whole batches
            and (entry.role == "teacher" or entry.gate is None)
            and steps > STEPWISE_MIN_STEPS
            and size is None
            and hasattr(entry.model, "inflight")
        )

    def _streamable(self, job: Job) -> bool:
        """Whether a throughput stream may run the job: a whole batch, of a model whose generate() may run on two
        threads at once (fewstep's own; a diffusers pipeline keeps its scheduler's state on itself), and so may its
        teacher, which regenerates the batch on the same thread if the student fails."""
        entry = self.registry.models.get(job.model)
        if entry is None or not getattr(entry.model, "reentrant", False) or self._stepwise(job):
            return False
        teacher = self.registry.teacher_for(job.model)  # a failing student's batch is regenerated on the same thread
        return teacher is None or getattr(teacher.model, "reentrant", False)

    def _other_work_queued(self) -> bool:
        """Queued work that cannot join a running batch and may start now (a student batch, another key)."""
        return any(self._takeable(j) for j in self.queue)

    def _takeable(self, job: Job) -> bool:
        """Whether a queued job may start a batch now: not one that joins a running batch at its next step, nor
        a new running batch beyond MAX_RUNNING."""
        if any(run.key == job.key for run in self.running):
            return False
        return not (self._stepwise(job) and len(self.running) >= MAX_RUNNING)

    def _drop_cancelled(self) -> None:
        dropped = [j for j in self.queue if j.cancelled]
        if dropped:
            self.metrics.error("dropped_before_run", len(dropped))
            self._remove(dropped)

    def _joiners(self, run: Running) -> list[Job]:
        """Queued jobs of the running batch's key that fit in it now, in priority order."""
        rows, out = len(run.batch) if run.batch is not None else 0, []
        for job in sorted((j for j in self.queue if j.key == run.key), key=lambda j: j.priority):
            if rows and rows + len(job.seeds) > self.settings.max_batch:
                break  # in order: a larger job is not overtaken for ever by smaller ones that fit
            out.append(job)
            rows += len(job.seeds)
        self._remove(out)
        run.jobs.update((id(j), j) for j in out)  # its jobs now, though their rows are added on the device thread
        return out

    async def _step(self, run: Running, joiners: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        self._arrived.clear()  # what arrives from now on ends the slice after its current step
        alone = len(self.running) == 1 and not self._other_work_queued()
        steps = MAX_STEPS_PER_SLICE if alone else 1  # others waiting: one step, then their turn
        self._main_width = self._main_threads()
        self._running = loop.run_in_executor(self.executor, self._run_step, run, joiners, steps, self._main_width)
        try:
            outcomes, failed = await self._running
        except Exception as e:
            log.exception("a step of %s failed", run.key[0])
            self.metrics.error("internal")
            outcomes, failed = (
                [(j, BatchFailed(f"the batch failed: {type(e).__name__}")) for j in run.jobs.values()],
                True,
            )
        finally:
            self._running, self._main_width = None, 0
            if self.helpers:
                self._helper_wake.set()  # a throughput stream may have waited for this batch to end
        for job, outcome in outcomes:
            run.jobs.pop(id(job), None)
            if isinstance(outcome, _ToTeacher):
                self._requeue_on_teacher(job, run.entry)
            elif not isinstance(outcome, _Dropped):
                _settle(job, outcome)
        if failed:
            run.batch = None
            for job in run.jobs.values():  # joined while the step ran: none can, but fail rather than lose them
                _settle(job, NotServable(f"{run.entry.name} failed"))
            run.jobs.clear()
        if run.batch is None or not len(run.batch):
            self.running = [r for r in self.running if r is not run]

    def _requeue_on_teacher(self, job: Job, student: ServedModel) -> None:
        """A many-step student's job whose batch failed: queued again for the student's teacher at its default
        steps (``fallback_reason: student_error``), as a whole batch of the student would have been regenerated."""
        teacher = self.registry.teacher_for(student.name)
        if teacher is None or job.cancelled:
            _settle(job, NotServable(f"{student.name} failed and has no teacher to serve it"))
            return
        job.model, job.steps, job.guidance = teacher.name, teacher.default_steps, None
        job.fallback_reason = "student_error"
        job.started, job.cost_s = None, self.estimate_s(teacher.name, len(job.seeds), teacher.default_steps, job.size)
        self._enqueue(job)  # admitted already: never a 429 halfway through

    def _run_step(
        self, run: Running, joiners: list[Job], max_steps: int = 1, threads: int | None = None
    ) -> tuple[list[tuple[Job, Result | BaseException]], bool]:
        """On the executor thread: the joiners' rows join, cancelled jobs' rows leave, every row takes one step,
        and more, up to ``max_steps``, while no row is done and nothing has arrived or been cancelled since.
        Returns (the jobs that are done, with their results; whether the batch failed). ``run.jobs`` is changed
        on the event loop only (``_step``), which reads it meanwhile. A model error fails every job of the batch
        (a teacher has no fallback); non-finite images fail their own job."""
        threads = threads or self.streams.threads
        use_threads(threads)
        start = time.perf_counter()
        entry = run.entry
        student = entry.role == "student"
        jobs = dict(run.jobs)  # this step's view
        try:
            if run.batch is None:
                run.batch = entry.model.inflight(run.key[1], run.key[2])
            for job in joiners:
                self.metrics.queue_wait.observe(start - job.enqueued)
                run.batch.add(id(job), [job.prompt] * len(job.seeds), job.seeds)
                job.started = start
            dropped = [j for j in jobs.values() if j.cancelled]
            for job in dropped:
                run.batch.drop(id(job))
                self.metrics.error("dropped_in_flight")
            step_start, taken = start, 0
            while True:
                rows = len(run.batch)
                for key in jobs:
                    run.peak[key] = max(run.peak.get(key, 0), rows)
                run.batch.step()
                done = run.batch.pop_done()
                now = time.perf_counter()
                if rows:
                    self._observe_cost(entry.name, now - step_start, rows, 1, threads)
                taken += 1
                if done or not len(run.batch) or taken >= max_steps or self._arrived.is_set():
                    break
                step_start = now
            out: list[tuple[Job, Result | BaseException]] = [(j, _Dropped()) for j in dropped]
            student_failed = False
            for owner, images in done.items():
                job, peak = jobs[owner], run.peak.pop(owner, rows)
                if not torch.isfinite(images).all():
                    if student:  # its teacher regenerates the job, as for a whole student batch
                        log.warning("student %s returned non-finite values; the teacher regenerates", entry.name)
                        student_failed = True
                        out.append((job, _ToTeacher()))
                        continue
                    self.metrics.error("model_error")
                    out.append((job, NotServable(f"{entry.name} failed: non-finite values in the output")))
                    continue
                n = len(job.seeds)
                steps_label = self.metrics.steps_label(job.steps)
                self.metrics.batch_inference.labels(model=entry.name, steps=steps_label).observe(now - job.started)
                self.metrics.batch_size.observe(n)
                self.metrics.images.labels(model=entry.name).inc(n)
                if job.fallback_reason:
                    self.metrics.fallbacks.labels(reason=job.fallback_reason).inc()
                result = Result(to_pil(images), job.seeds, entry.name, job.steps, job.fallback_reason,
                                queue_ms=1000 * (job.started - job.enqueued), inference_ms=1000 * (now - job.started),
                                batch_images=peak)  # fmt: skip
                out.append((job, _encoded(job, result)))
            if student and done:  # one outcome per slice, as one per whole batch: consecutive failures trip it
                (self.breaker.record_failure if student_failed else self.breaker.record_success)(entry.name)
            return out, False
        except Exception as e:
            run.batch = None
            if student:
                log.warning("student %s failed on a step (%s); the teacher regenerates its jobs", entry.name, e)
                self.breaker.record_failure(entry.name)
                return [(j, _ToTeacher()) for j in jobs.values() if not j.cancelled], True
            log.error("%s failed on a step: %s", entry.name, e)
            self.metrics.error("model_error")
            return [(j, NotServable(f"{entry.name} failed: {e}")) for j in jobs.values()], True

    def _bursty(self) -> bool:
        return self._arrival_gap_s < self.settings.max_wait_ms / 1000

    def _queued_images(self, key) -> int:
        return sum(len(j.seeds) for j in self.queue if j.key == key and not j.cancelled)

    # ---- running a batch (on the executor thread) -------------------------------------------------------
    def _main_threads(self) -> int:
        """On the event loop: torch threads for the main device thread's next batch or step: its share in
        throughput mode and while a throughput batch still runs after the mode ended (never more threads than
        cores), else every thread."""
        return self.streams.per_stream if self.throughput or self._helping else self.streams.threads

    def _run_batch(
        self, batch: list[Job], threads: int | None = None, breaker: bool = True
    ) -> list[Result | BaseException]:
        """``batch`` on the calling device thread with ``threads`` torch threads; ``breaker`` False: a split batch's
        part, whose student outcome the batch records once (``_record_student``)."""
        threads = threads or self.streams.threads
        use_threads(threads)
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
            if entry.role == "student" and breaker:
                self.breaker.record_success(entry.name)
        except Exception as e:
            if entry.role != "student":
                log.error("%s failed on a batch: %s", entry.name, e)
                self.metrics.error("model_error")
                return [NotServable(f"{entry.name} failed: {e}") for _ in batch]
            # a student that raises or returns non-finite values: the teacher regenerates the batch
            log.warning("student %s failed (%s); the teacher regenerates its batch", entry.name, e)
            if breaker:
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
        self._observe_cost(served_by, elapsed, n_images, steps * self._pixel_scale(served_by, size), threads)
        self.metrics.batch_inference.labels(model=served_by, steps=self.metrics.steps_label(steps)).observe(elapsed)
        self.metrics.batch_size.observe(n_images)
        self.metrics.images.labels(model=served_by).inc(n_images)
        scores = self._gate_scores(entry, batch, images, cond) if served_by == batch[0].model else None
        pils = to_pil(images)  # one tensor op for the batch, on this thread: no second OpenMP team elsewhere
        out, offset = [], 0
        for job, reason in zip(batch, reasons, strict=True):
            n = len(job.seeds)
            if reason:
                self.metrics.fallbacks.labels(reason=reason).inc()
            mine = scores[offset : offset + n] if scores is not None and job.gate else None
            regenerate = [] if mine is None else [i for i, x in enumerate(mine) if x < entry.gate.threshold(steps)]
            result = Result(
                pils[offset : offset + n],
                job.seeds,
                served_by,
                steps,
                reason,
                queue_ms=1000 * (start - job.enqueued),
                inference_ms=1000 * elapsed,
                batch_images=n_images,
                gate_scores=mine,
                regenerate=regenerate,
            )
            out.append(_encoded(job, result))
            if mine is not None:
                self.metrics.gate_images.labels(outcome="passed").inc(n - len(regenerate))
                self.metrics.gate_images.labels(outcome="regenerated").inc(len(regenerate))
            offset += n
        return out

    def _gate_scores(self, entry: ServedModel, batch: list[Job], images: torch.Tensor, cond) -> list[float] | None:
        """The gate's score of every image of a student batch in which some request has the gate on."""
        if entry.gate is None or not any(job.gate for job in batch):
            return None
        try:
            scores = entry.gate.critic.score(images.to(entry.model.device), cond.pooled).cpu()
        except Exception as e:  # a gate that fails leaves the student's images as they are
            log.warning("the quality gate of %s failed: %s", entry.name, e)
            self.metrics.error("gate_error")
            return None
        values = scores.tolist()
        for x in values:
            self.metrics.gate_score.observe(x)
        return values

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
