"""Prometheus metrics, units in the names. One registry per app, so tests can run several servers.

Label values are bounded: model names come from the served models, step counts from what they serve, and
statuses, endpoints, reasons and error types from fixed sets; anything else a client sends is counted under
"other", so no request can add a series.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OTHER = "other"
ENDPOINTS = ("generate", "images")
STATUSES = ("200", "400", "401", "404", "408", "413", "415", "429", "499", "500", "503", "504")
ERROR_TYPES = (
    "invalid_value", "invalid_json", "unsupported_media_type", "unsupported_value", "body_too_large",
    "model_not_found", "not_found", "method_not_allowed", "invalid_api_key", "queue_full", "timeout",
    "client_disconnected", "model_unavailable", "model_error", "dropped_before_run", "internal", "batcher_restart",
    "body_timeout", "shutting_down", "invalid_request", "dropped_in_flight", "gate_error",
)  # fmt: skip


@dataclass
class Metrics:
    registry: CollectorRegistry
    request_latency: Histogram
    queue_wait: Histogram
    batch_inference: Histogram
    batch_size: Histogram
    queue_depth: Gauge
    queued_work: Gauge
    device_streams: Gauge
    in_flight: Gauge
    images: Counter
    fallbacks: Counter
    errors: Counter
    rejected: Counter
    auto_steps: Counter
    slo: Counter
    gate_score: Histogram
    gate_images: Counter
    models: frozenset[str] = field(default_factory=frozenset)
    steps: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def create(cls) -> Metrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            request_latency=Histogram("fewstep_request_latency_seconds", "End-to-end request latency",
                                      ["endpoint", "model", "steps", "status"], buckets=LATENCY_BUCKETS, registry=r),
            queue_wait=Histogram("fewstep_queue_wait_seconds", "Time a request waited for its batch",
                                 buckets=LATENCY_BUCKETS, registry=r),
            batch_inference=Histogram("fewstep_batch_inference_seconds", "Model time per batch",
                                      ["model", "steps"], buckets=LATENCY_BUCKETS, registry=r),
            batch_size=Histogram("fewstep_batch_size_images", "Images per batch",
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r),
            queue_depth=Gauge("fewstep_queue_depth_requests", "Requests waiting for a batch", registry=r),
            queued_work=Gauge("fewstep_queued_work_seconds", "Estimated device seconds of queued work", registry=r),
            device_streams=Gauge("fewstep_device_streams", "The device's mode: 1 (one batch at a time), or the "
                                 "CPU throughput mode's streams (batches at once) while it is on", registry=r),
            in_flight=Gauge("fewstep_requests_in_flight", "Requests being handled", registry=r),
            images=Counter("fewstep_images_generated_total", "Images generated", ["model"], registry=r),
            fallbacks=Counter("fewstep_fallbacks_total", "Requests served by the teacher instead", ["reason"],
                              registry=r),
            errors=Counter("fewstep_errors_total", "Errors answered, by type", ["type"], registry=r),
            rejected=Counter("fewstep_rejected_total", "Requests refused before their body was read (queue full), by "
                             "where: wire (a whole request, before h11), head (after h11 parsed its head), app "
                             "(the Admission middleware)", ["path"], registry=r),
            auto_steps=Counter("fewstep_auto_steps_total", "What steps: auto chose", ["model", "steps"], registry=r),
            gate_score=Histogram("fewstep_gate_score", "Quality-gate scores of student images (1: surely right)",
                                 buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
                                 registry=r),
            gate_images=Counter("fewstep_gate_images_total", "Student images the quality gate judged, by outcome: "
                                "passed, regenerated (by the teacher), kept_no_teacher, kept_teacher_failed",
                                ["outcome"], registry=r),
            slo=Counter("fewstep_slo_requests_total", "Requests with a latency target (steps: auto) by outcome: "
                        "met or missed", ["outcome"], registry=r),
        )  # fmt: skip

    def bound(self, models: Iterable[str], steps: Iterable[int]) -> Metrics:
        """Fix the label values a request may produce: the served models and the step counts they serve."""
        self.models, self.steps = frozenset(models), frozenset(str(s) for s in steps)
        for path in ("wire", "head", "app"):  # every refusal path shows, at 0 until used
            self.rejected.labels(path=path)
        return self

    def model_label(self, name: str | None) -> str:
        return name if name in self.models else OTHER

    def steps_label(self, steps: int | None) -> str:
        return str(steps) if str(steps) in self.steps else OTHER

    def error(self, kind: str | None, n: int = 1) -> None:
        self.errors.labels(type=kind if kind in ERROR_TYPES else OTHER).inc(n)

    def observe_request(
        self, endpoint: str, model: str | None, steps: int | None, status: int | str, seconds: float
    ) -> None:
        status = str(status)
        self.request_latency.labels(
            endpoint=endpoint if endpoint in ENDPOINTS else OTHER,
            model=self.model_label(model),
            steps=self.steps_label(steps),
            status=status if status in STATUSES else OTHER,
        ).observe(seconds)
