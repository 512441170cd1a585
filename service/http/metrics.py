"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Per-stage latency histograms, queue depth and instances by outcome."""

    def __init__(self, queue_depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.stage = Histogram(
            "retinaedge_stage_seconds",
            "Latency of each inference stage per instance",
            ["stage"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.instances = Counter(
            "retinaedge_instances", "Instances received, by outcome", ["outcome"], registry=self.registry
        )
        self.not_applicable = Counter(
            "retinaedge_not_applicable",
            "Instances outside a model's intended use, by model and by failed rule (an instance counts "
            "once for each rule it fails)",
            ["model", "rule"],
            registry=self.registry,
        )
        self.backend = Gauge(
            "retinaedge_backend_info",
            "The inference backend in use (1) and its state",
            ["backend", "state"],
            registry=self.registry,
        )
        self.batch_frames = Histogram(
            "retinaedge_batch_frames",
            "Frames per inference batch, from any requests",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=self.registry,
        )
        depth = Gauge(
            "retinaedge_queue_depth",
            "Instances in the pipeline (being read, waiting for or in inference)",
            registry=self.registry,
        )
        depth.set_function(lambda: float(queue_depth()))
        # Each label's child, looked up once: ``labels()`` validates and locks on every call (a request
        # observes every stage).
        self._stages: dict[str, Any] = {}
        self._outcomes: dict[str, Any] = {}

    def set_backend(self, backend: str, state: str) -> None:
        """Export exactly one (backend, state) series with value 1."""
        self.backend.clear()
        self.backend.labels(backend=backend or "none", state=state).set(1)

    def outcome(self, outcome: str) -> None:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes.setdefault(outcome, self.instances.labels(outcome=outcome))
        child.inc()

    def not_applicable_to(self, model: str, rules: list[str]) -> None:
        """Count an instance ``model``'s intended use refused, once per failed rule."""
        for rule in rules:
            self.not_applicable.labels(model=model, rule=rule).inc()

    def observe(self, timings_ms: dict[str, float]) -> None:
        """One observation per stage of an instance's ``timings_ms`` (milliseconds; exported in seconds)."""
        stages = self._stages
        for stage, ms in timings_ms.items():
            child = stages.get(stage)
            if child is None:
                child = stages.setdefault(stage, self.stage.labels(stage=stage))
            child.observe(ms / 1e3)
