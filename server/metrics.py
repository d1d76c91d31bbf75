"""Prometheus metrics, units in the names. One registry per app, so tests can run several servers."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class Metrics:
    registry: CollectorRegistry
    request_latency: Histogram
    queue_wait: Histogram
    batch_inference: Histogram
    batch_size: Histogram
    queue_depth: Gauge
    in_flight: Gauge
    images: Counter
    fallbacks: Counter
    errors: Counter

    @classmethod
    def create(cls) -> Metrics:
        r = CollectorRegistry()
        return cls(
            registry=r,
            request_latency=Histogram(
                "fewstep_request_latency_seconds",
                "End-to-end request latency",
                ["endpoint", "model", "steps", "status"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            queue_wait=Histogram(
                "fewstep_queue_wait_seconds", "Time a request waited for its batch", buckets=LATENCY_BUCKETS, registry=r
            ),
            batch_inference=Histogram(
                "fewstep_batch_inference_seconds",
                "Model time per batch",
                ["model", "steps"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            batch_size=Histogram(
                "fewstep_batch_size_images", "Images per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
            ),
            queue_depth=Gauge("fewstep_queue_depth_requests", "Requests waiting for a batch", registry=r),
            in_flight=Gauge("fewstep_requests_in_flight", "Requests being handled", registry=r),
            images=Counter("fewstep_images_generated_total", "Images generated", ["model"], registry=r),
            fallbacks=Counter(
                "fewstep_fallbacks_total", "Requests served by the teacher instead", ["reason"], registry=r
            ),
            errors=Counter("fewstep_errors_total", "Errors answered, by type", ["type"], registry=r),
        )
