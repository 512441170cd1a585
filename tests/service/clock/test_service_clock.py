"""Service time does not jump with the wall clock (issue 29, items 1 and 2).

A forward jump (a stale RTC corrected by NTP) must not delete fresh results or undelivered SRs; a
backward one (a clock that was ahead, corrected) must not stall export back-off, series quiet periods or
``Retry-After``; jumps while stopped are absorbed at the next start. The clocks are faked in this process
(support.fakeclock); the machine's clock is never changed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from retinaedge.service.clock import ServiceClock
from retinaedge.service.outbox.queue import Outbox
from retinaedge.service.results.completion import series_status
from retinaedge.service.results.store import Store
from support.fakeclock import FakeTime

DAY = 86400.0
MR = "1.2.840.10008.5.1.4.1.1.4"


def open_rooms(tmp_path: Path, clock: ServiceClock) -> tuple[Store, Outbox]:
    store = Store(tmp_path / "state.sqlite3", clock)
    outbox = Outbox(tmp_path / "state.sqlite3", clock=clock)
    outbox.sync_targets([("pacs", ["sr"])])
    return store, outbox


def test_a_forward_jump_deletes_no_result_and_no_undelivered_sr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeTime(wall_shift=-30 * DAY).install(monkeypatch)  # booted with a stale RTC
    clock = ServiceClock(tmp_path / "clock.json")
    store, outbox = open_rooms(tmp_path, clock)
    for n in range(4):
        assert store.add_pending(f"1.2.3.{n}", MR, "1.2", "1.2.5", f"{n}.dcm", 10)
        store.done(f"1.2.3.{n}", {"frames": []})
    dead = outbox.jobs(None, None, 10)[0]
    outbox.kill(dead, "dead-lettered while the PACS was down")
    with caplog.at_level(logging.WARNING, logger="retinaedge.service.clock"):
        fake.jump(30 * DAY)  # NTP corrects the clock
        assert store.prune(7 * DAY, 1 << 30) == []
        assert outbox.prune(7 * DAY) == [] and len(outbox.jobs(None, None, 10)) == 4
    assert "jumped by +2592000 s" in caplog.text
    assert clock.describe()["jumps"] == 1
    fake.elapse(7 * DAY - 60)  # kept for its retention time, in elapsed terms...
    assert store.prune(7 * DAY, 1 << 30) == []
    fake.elapse(120)  # ...and no longer
    assert sorted(store.prune(7 * DAY, 1 << 30)) == [(f"1.2.3.{n}", "") for n in range(4)]


def test_a_backward_jump_stalls_neither_back_off_nor_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTime(wall_shift=30 * DAY).install(monkeypatch)  # the clock is 30 days ahead
    clock = ServiceClock(tmp_path / "clock.json")
    store, outbox = open_rooms(tmp_path, clock)
    assert store.add_pending("1.2.3.1", MR, "1.2", "1.2.5", "1.dcm", 10)
    store.done("1.2.3.1", {"frames": []})
    job = outbox.jobs(None, None, 10)[0]
    assert outbox.finish(job, outbox.begin(job), "failed", "no connection", retry_in_s=60.0) == "pending"
    fake.jump(-30 * DAY)  # corrected
    assert outbox.due("pacs", clock()) is None  # still backing off, for 60 s, not 30 days
    status = series_status(store.series_rows("1.2.5"), clock(), 30.0, store.series_requested_at("1.2.5"))
    assert status.state == "collecting" and status.retry_after_s <= 30
    fake.elapse(61)
    assert outbox.due("pacs", clock()) is not None
    status = series_status(store.series_rows("1.2.5"), clock(), 30.0, store.series_requested_at("1.2.5"))
    assert status.state == "complete" and status.completed_by == "quiet-period"
    store.request_series_complete("1.2.5")  # a request now counts as after the last arrival
    assert store.series_requested_at("1.2.5") >= store.series_rows("1.2.5")[0].received_at  # type: ignore[operator]


def test_service_time_survives_restarts_and_jumps_while_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTime().install(monkeypatch)
    path = tmp_path / "clock.json"
    first = ServiceClock(path)
    fake.jump(-30 * DAY)  # corrected while running: absorbed
    before = first()
    first.close()
    fake.jump(30 * DAY)  # ...and set forward again while stopped: counts as downtime, as wall time
    fake.jump(-40 * DAY)  # no: set back 40 days while stopped
    again = ServiceClock(path)
    assert again() >= before  # never earlier than the time last saved
    assert (
        again.jumps == 1
        and again.last_jump is not None
        and again.last_jump["when"] == "while the service was stopped"
    )
    # A database newer than any saved time (clock.json lost) is a floor too.
    path.unlink()
    floor = again() + 5 * DAY
    assert ServiceClock(path, floor=floor)() >= floor
    # Displayed times are the wall clock's.
    t = again()
    assert abs(again.wall_of(t) - fake.wall()) < 5  # type: ignore[operator]


def test_the_clock_says_whether_it_is_synchronised(tmp_path: Path) -> None:
    described = ServiceClock(None).describe()
    assert described["synchronised"] in (True, False, None)
    assert {"source", "offset_s", "jumps", "last_jump"} <= set(described)


def test_the_device_report_says_whether_the_clock_is_synchronised() -> None:
    """``retinaedge device`` on the live root reads the kernel's clock state (read-only)."""
    from retinaedge.device.collect import collect

    report = collect("/", lambda _argv: None)
    assert report.time_sync is not None and report.time_sync.source in ("adjtimex", "adjtimex unavailable")
