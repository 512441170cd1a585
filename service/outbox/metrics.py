"""Prometheus metrics of result delivery, read from the dispatcher's in-memory summary (never SQLite on a
scrape): jobs by state, attempts by outcome, dead letters, duplicates, failing destinations and the age
of the oldest waiting SR, per destination. The counters are kept in the database (``export_counters``),
so they survive restarts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from retinaedge.service.outbox.delivery import Dispatcher


class DeliveryCollector:
    """Prometheus metrics of result delivery, from :meth:`Dispatcher.summary` (memory only)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def describe(self) -> list[Any]:
        return []  # unchecked collector: collect() is only called on scrape

    def collect(self) -> Iterator[Any]:
        jobs = GaugeMetricFamily(
            "retinaedge_export_jobs", "Export jobs by destination and state", labels=["destination", "state"]
        )
        attempts = CounterMetricFamily(
            "retinaedge_export_attempts", "Export attempts by outcome", labels=["destination", "outcome"]
        )
        dead = CounterMetricFamily(
            "retinaedge_export_dead_letters", "Export jobs dead-lettered", labels=["destination"]
        )
        skipped = CounterMetricFamily(
            "retinaedge_export_skipped",
            "Documents not sent because their subject had nothing to show (no findings)",
            labels=["destination"],
        )
        dups = CounterMetricFamily(
            "retinaedge_export_duplicates",
            "Deliveries the peer may have received twice (possible: after an interrupted or unanswered "
            "attempt; confirmed: the peer said it already had the SOP instance)",
            labels=["destination", "kind"],
        )
        failing = GaugeMetricFamily(
            "retinaedge_export_failing",
            "1 while the destination's last attempt failed",
            labels=["destination"],
        )
        oldest = GaugeMetricFamily(
            "retinaedge_export_oldest_pending_seconds",
            "Age of the oldest job waiting for the destination (0 when none)",
            labels=["destination"],
        )
        now = self.dispatcher.clock()
        for d in self.dispatcher.summary():
            name = d["name"]
            for state, n in d["jobs"].items():
                jobs.add_metric([name, state], n)
            for outcome, n in d["attempts"].items():
                attempts.add_metric([name, outcome], n)
            dead.add_metric([name], d["dead_lettered"])
            skipped.add_metric([name], d["skipped"])
            for kind, n in d["duplicates"].items():
                dups.add_metric([name, kind], n)
            failing.add_metric([name], 1.0 if d["state"] == "failing" else 0.0)
            at = d["oldest_pending_at"]
            oldest.add_metric([name], max(0.0, now - at) if at is not None else 0.0)
        yield from (jobs, attempts, dead, skipped, dups, failing, oldest)
