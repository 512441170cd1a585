"""The clock drill (issue 29): 30 days behind, corrected, 30 days ahead, corrected, with the PACS down
and then up, and a restart in between.

Every result is kept for its retention time in elapsed terms, every SR is delivered once, and the series
completes when its quiet period has elapsed (``Retry-After`` never counts the jumps). The wall clock and
the monotonic clock are faked in this process (support.fakeclock); the machine's clock is never touched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from support.clients import multipart
from support.fakeclock import FakeTime
from support.paths import DEMO, EXAMPLES
from support.polling import wait_until
from support.servers import free_port, ready_client

DAY = 86400.0
QUIET_S = 30.0
RETENTION_S = 7 * DAY
FILES = sorted((EXAMPLES / "study_01").glob("*.dcm"))[:4]


class Pacs:
    """A C-STORE SCP (pynetdicom) on ``port`` that counts what it stores, started when asked."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stored: Counter[str] = Counter()
        self.server: Any = None

    def start(self) -> None:
        from pynetdicom import AE, StoragePresentationContexts, evt

        ae = AE(ae_title="PACS")
        ae.supported_contexts = StoragePresentationContexts

        def on_store(event: Any) -> int:
            self.stored[str(event.request.AffectedSOPInstanceUID)] += 1
            return 0x0000

        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@contextmanager
def appliance(data_dir: Path, pacs_port: int) -> Iterator[tuple[Any, Any]]:
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings

    settings = load_settings(
        model=DEMO,
        data_dir=data_dir,
        series_quiet_s=QUIET_S,
        results_max_age_s=RETENTION_S,
        prune_interval_s=0.0,
        export_retry_initial_s=10.0,
        export_retry_max_s=60.0,
        export_destinations=[
            {
                "name": "pacs",
                "type": "dimse",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs_port,
                "documents": ["sr", "series-sr"],
            }
        ],
    )
    app = create_app(settings)
    with ready_client(app) as client:
        yield app, client


def prune_now(app: Any) -> None:
    services = app.state.services
    services.prune.last = float("-inf")
    services.prune()
    for name in services.dispatcher.outbox.prune(RETENTION_S):
        services.dispatcher.files.remove(name)


def kept(client: Any, uids: list[str]) -> list[int]:
    return [client.get(f"/v1/results/{uid}").status_code for uid in uids]


def series_answer(client: Any, uid: str) -> tuple[int, int | None]:
    r = client.get(f"/v1/series/{uid}")
    return r.status_code, int(r.headers["Retry-After"]) if "Retry-After" in r.headers else None


def test_the_clock_drill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTime(wall_shift=-30 * DAY).install(monkeypatch)  # a stale RTC: 30 days behind
    pacs = Pacs(free_port())  # down: nothing listens yet
    data_dir = tmp_path / "data"
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in FILES]
    series = str(pydicom.dcmread(FILES[0], stop_before_pixels=True).SeriesInstanceUID)
    try:
        with appliance(data_dir, pacs.port) as (app, client):
            body, ctype = multipart([f.read_bytes() for f in FILES])
            assert (
                client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code
                == 200
            )
            wait_until(
                lambda: kept(client, uids), "4 results", lambda s: s == [200] * 4, timeout=60, interval=0.05
            )
            dispatcher = app.state.services.dispatcher
            wait_until(
                lambda: dispatcher.summary()[0]["attempts"]["failed"],
                "an attempt to the PACS that is down",
                timeout=30,
                interval=0.05,
            )
            assert series_answer(client, series)[0] == 202

            fake.jump(30 * DAY)  # NTP corrects the clock: nothing expires
            prune_now(app)
            assert kept(client, uids) == [200] * 4
            status, retry = series_answer(client, series)
            assert status == 202 and retry is not None and retry <= QUIET_S

            fake.jump(30 * DAY)  # now 30 days ahead...
            prune_now(app)
            fake.jump(-30 * DAY)  # ...and corrected back: nothing is held for 30 days
            status, retry = series_answer(client, series)
            assert status == 202 and retry is not None and retry <= QUIET_S
            assert kept(client, uids) == [200] * 4
            ready = client.get("/readyz").json()
            assert ready["clock"]["jumps"] == 3 and ready["clock"]["synchronised"] in (True, False, None)
            jobs = client.get("/v1/exports").json()["jobs"]
            assert jobs and all(j["state"] == "pending" for j in jobs)
            # next attempts within the back-off, in wall-clock terms now (not 30 days away)
            assert all(j["next_attempt_at"] - fake.wall() <= 61 for j in jobs)

        # A restart (after the corrections), then the series' quiet period elapses and the PACS comes up.
        with appliance(data_dir, pacs.port) as (app, client):
            assert kept(client, uids) == [200] * 4
            status, retry = series_answer(client, series)
            assert status == 202 and retry is not None and retry <= QUIET_S
            fake.elapse(QUIET_S + 1)
            assert series_answer(client, series)[0] == 200  # complete on time
            pacs.start()
            fake.elapse(61)  # the longest back-off, in elapsed terms
            app.state.services.dispatcher.wake()

            def delivered() -> dict[str, int]:
                return dict(Counter(j["state"] for j in client.get("/v1/exports").json()["jobs"]))

            wait_until(
                delivered, "every SR delivered", lambda s: s == {"delivered": 5}, timeout=60, interval=0.1
            )
            assert len(pacs.stored) == 5 and set(pacs.stored.values()) == {1}  # 4 SRs, 1 series SR, once each
            summary = client.get("/v1/exports").json()["destinations"][0]
            assert summary["duplicates"] == {"possible": 0, "confirmed": 0}

            fake.elapse(RETENTION_S - 120)  # kept for the retention time, in elapsed terms...
            prune_now(app)
            assert kept(client, uids) == [200] * 4
            fake.elapse(240)  # ...and not longer
            prune_now(app)
            assert kept(client, uids) == [404] * 4
    finally:
        pacs.stop()
