"""The service's batching settings in the benchmark's HTTP phase (which variables are passed, when) and the
4-client level's request budget."""

from __future__ import annotations

import argparse
import time

import pytest
from retinaedge.bench.batch_settings import (
    AUTO,
    best_batch_size,
    check_options,
    parse_max_batch_size,
    service_batching,
    service_fields,
)
from retinaedge.runtime.errors import ConfigError

ROWS = [
    {"batch_size": 1, "frames_per_s": 110.0},
    {"batch_size": 4, "frames_per_s": 125.0},
    {"batch_size": 8, "frames_per_s": 125.0},  # a tie: the smaller batch wins
]
BOTH = {"max_batch_size", "batch_delay_ms", "threads"}


def args(max_batch_size: int | str = AUTO, batch_delay_ms: float | None = None) -> argparse.Namespace:
    return argparse.Namespace(max_batch_size=max_batch_size, batch_delay_ms=batch_delay_ms)


def test_auto_takes_the_best_model_batch_and_passes_it_when_the_service_has_the_setting() -> None:
    assert best_batch_size(ROWS) == 4 and best_batch_size([]) is None
    near = [{"batch_size": 2, "frames_per_s": 167.2}, {"batch_size": 8, "frames_per_s": 171.7}]
    assert best_batch_size(near) == 2  # within 5 % of the most: the smaller batch, for latency
    got = service_batching(args(batch_delay_ms=2.5), ROWS, fields=BOTH)
    assert got["env"] == {"RETINAEDGE_MAX_BATCH_SIZE": "4", "RETINAEDGE_BATCH_DELAY_MS": "2.5"}
    assert got["max_batch_size"] == 4 and got["batch_delay_ms"] == 2.5 and got["not_applied"] == {}
    explicit = service_batching(args(max_batch_size=2), ROWS, fields=BOTH)
    assert explicit["env"] == {"RETINAEDGE_MAX_BATCH_SIZE": "2"}
    assert explicit["max_batch_size_from"] == "--max-batch-size"


def test_a_service_without_the_settings_gets_no_variable_and_the_report_says_why() -> None:
    got = service_batching(args(), ROWS, fields={"threads"})
    assert got["env"] == {} and got["max_batch_size"] is None
    assert got["not_applied"] == {"max_batch_size": "this service has no max_batch_size setting"}
    with pytest.raises(
        ConfigError, match="--max-batch-size was given, but this service has no max_batch_size"
    ):
        check_options(args(max_batch_size=4), fields={"threads"})
    with pytest.raises(ConfigError, match="--batch-delay-ms was given"):
        check_options(args(batch_delay_ms=1.0), fields={"threads"})
    check_options(args(), fields={"threads"})  # auto with no setting: not an error


def test_option_parsing_and_the_real_settings() -> None:
    assert parse_max_batch_size("auto") == AUTO and parse_max_batch_size("8") == 8
    for bad in ("0", "x", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_max_batch_size(bad)
    with pytest.raises(ConfigError, match="--batch-delay-ms must be >= 0"):
        check_options(args(batch_delay_ms=-1.0), fields=BOTH)
    fields = service_fields()
    assert "threads" in fields and "max_batch_size" in fields and "batch_delay_ms" in fields
    got = service_batching(args(), ROWS)  # whatever this service accepts: only those are passed
    assert set(got["env"]) <= {"RETINAEDGE_MAX_BATCH_SIZE", "RETINAEDGE_BATCH_DELAY_MS"}
    assert ("RETINAEDGE_MAX_BATCH_SIZE" in got["env"]) == ("max_batch_size" in fields)


def test_a_level_ends_when_stable_or_at_its_time_bound() -> None:
    """:func:`~retinaedge.bench.steady.run_level` against a local HTTP server answering ``/v1/detect``
    (the load generator alone: no inference here). A server of constant pace ends the level as stable,
    with at least ``min_requests`` in its last three windows; one that slows down with every answer never
    agrees and ends at ``max_seconds``. Only the stopping rule is asserted, no speed."""
    import http.server
    import json
    import threading
    import time

    from retinaedge.bench.steady import run_level

    state = {"slowing": False, "n": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            state["n"] += 1
            time.sleep(0.0005 * state["n"] if state["slowing"] else 0.001)
            body = json.dumps({"frames": [], "timings_ms": {"total": 1.0}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        steady = run_level(port, [(b"x" * 10, 1)], 2, min_requests=30, max_seconds=30)
        assert steady.stopped_by == "stable" and steady.stable
        assert len(steady.measured) == 3 and len(steady.done) >= 30
        state.update(slowing=True, n=0)
        slowing = run_level(port, [(b"x" * 10, 1)], 1, min_requests=30, max_seconds=1.0)
        assert slowing.stopped_by == "time" and not slowing.stable
    finally:
        server.shutdown()


def test_model_throughput_runs_each_batch_size_for_its_count_and_its_time() -> None:
    """``batch_throughput`` times at least ``repeats`` batches per size and at least ``min_seconds`` of
    them (the loop's own condition: no clock is asserted), and counts the frames of the batches run."""
    import numpy as np
    from retinaedge.bench.worker import batch_throughput

    tensors = np.zeros((3, 1, 4, 4), np.float32)
    seen: list[int] = []

    def infer(x: np.ndarray) -> None:
        seen.append(len(x))
        time.sleep(0.002)

    rows = batch_throughput(infer, tensors, [1, 2], repeats=2, min_seconds=0.02)
    for row in rows:
        assert row["batches"] >= 2 and len(row["batch_ms"]) == row["batches"]
        assert sum(row["batch_ms"]) >= 20.0
        assert row["frames_per_s"] == round(
            row["batch_size"] * row["batches"] / (sum(row["batch_ms"]) / 1e3), 3
        )
    assert seen.count(1) == rows[0]["batches"] + 1 and seen.count(2) == rows[1]["batches"] + 1  # + untimed
    counted = batch_throughput(lambda x: None, tensors, [2], repeats=3, min_seconds=0.0)
    assert counted[0]["batches"] == 3
