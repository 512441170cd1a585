"""The export outbox on a real SQLite database, the destination settings, and dead letters end to end.

The outbox tests drive :class:`Store` and :class:`Outbox` on one database file exactly as the service
does (two connections, the trigger between them); then the service runs with destinations that refuse
connections, so every job is dead-lettered after the attempt limit and queued again, and with a STOW-RS
destination over HTTPS that is a second appliance, which refuses the SR itself.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from retinaedge.runtime.errors import ConfigError
from retinaedge.service.http.schemas import ExportJob, ExportsStatus, Ready
from retinaedge.service.outbox.queue import Outbox
from retinaedge.service.results.store import Store
from retinaedge.service.settings import load_settings
from support.certs import self_signed
from support.clients import multipart, wait_done
from support.paths import DEMO, REPO_ROOT
from support.polling import poll
from support.servers import serve

DIMSE = {"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
STOW = {"name": "web", "type": "stowrs", "url": "https://pacs.example/dicom-web"}


def open_db(tmp_path: Path, targets: list[tuple[str, bool, bool]]) -> tuple[Store, Outbox]:
    """``targets``: (name, takes instance SRs, takes series SRs), as the document kinds ``sr`` and
    ``series-sr``."""
    store = Store(tmp_path / "state.sqlite3")
    outbox = Outbox(tmp_path / "state.sqlite3")
    outbox.sync_targets((n, ["sr"] * i + ["series-sr"] * s) for n, i, s in targets)
    return store, outbox


def received(store: Store, uid: str, series: str = "1.2.3.4") -> None:
    assert store.add_pending(uid, "1.2.840.10008.5.1.4.1.1.4", "1.2.3", series, f"{uid}.dcm", 10)


def test_a_result_and_its_export_jobs_are_one_transaction(tmp_path: Path) -> None:
    """Recording a STOW-RS/C-STORE instance's result enqueues one job per destination taking instance
    SRs, by the database itself; a failed instance and a /v1/detect result enqueue none."""
    store, outbox = open_db(
        tmp_path, [("pacs", True, True), ("viewer", True, False), ("series-only", False, True)]
    )
    received(store, "1.2.3.4.1")
    received(store, "1.2.3.4.2")
    assert outbox.jobs(None, None, 10) == []
    store.done("1.2.3.4.1", {"frames": []})
    store.failed("1.2.3.4.2", "malformed-dicom", "x")
    store.put_done("1.2.3.4.3", "1.2.840.10008.5.1.4.1.1.4", "1.2.3", "1.2.3.4", 10, {"frames": []}, None)
    jobs = outbox.jobs(None, None, 10)
    assert sorted((j.destination, j.kind, j.subject_uid, j.state) for j in jobs) == [
        ("pacs", "instance", "1.2.3.4.1", "pending"),
        ("viewer", "instance", "1.2.3.4.1", "pending"),
    ]
    assert jobs[0].document_id == jobs[1].document_id  # one SR for both destinations
    assert outbox.watched_series() == [("1.2.3.4", "")]  # a destination takes series SRs
    assert outbox.series_complete("1.2.3.4", 123.0) == 2  # pacs and series-only
    assert outbox.watched_series() == []
    assert outbox.series_complete("1.2.3.4", 123.0) == 0  # the same version once only


def test_retries_dead_letters_and_duplicates_are_recorded(tmp_path: Path) -> None:
    """An attempt is committed before sending; a stopped process leaves it in flight, the next start
    marks it interrupted, and the delivery after it counts as a possible duplicate. Counters survive
    reopening the database; a job past its attempts is dead and can be queued again."""
    store, outbox = open_db(tmp_path, [("pacs", True, False)])
    for n in (1, 2):
        received(store, f"1.2.3.4.{n}")
        store.done(f"1.2.3.4.{n}", {"frames": []})
    first, second = sorted(outbox.jobs(None, None, 10), key=lambda j: j.id)
    attempt = outbox.begin(first)
    assert outbox.due("pacs", time.time()) is not None  # still pending while in flight
    outbox.close()  # the process "stops" here: no outcome recorded

    outbox = Outbox(tmp_path / "state.sqlite3")
    assert outbox.recover() == 1
    assert [a["outcome"] for a in outbox.attempts(first.id)] == ["interrupted"]
    job = outbox.job(first.id)
    assert job is not None and job.possibly_delivered and job.state == "pending"
    assert outbox.finish(job, outbox.begin(job), "delivered", "C-STORE status 0x0000") == "delivered"
    job2 = outbox.job(second.id)
    assert job2 is not None
    assert outbox.finish(job2, outbox.begin(job2), "failed", "refused", retry_in_s=60.0) == "pending"
    job2 = outbox.job(second.id)
    assert job2 is not None and job2.next_attempt_at > time.time() + 50 and job2.attempts == 1
    assert outbox.due("pacs", time.time()) is None  # backing off
    assert outbox.finish(job2, outbox.begin(job2), "failed", "refused", retry_in_s=None) == "dead"
    assert attempt  # the interrupted attempt kept its row

    summary = outbox.summary()["pacs"]
    assert summary["jobs"] == {"pending": 0, "delivered": 1, "dead": 1}
    assert summary["counters"] == {
        "attempts_interrupted": 1,
        "attempts_delivered": 1,
        "attempts_failed": 2,
        "delivered": 1,
        "duplicates_possible": 1,
        "dead": 1,
    }
    assert outbox.requeue_dead(["pacs"]) == 1
    job2 = outbox.job(second.id)
    assert job2 is not None and job2.state == "pending" and job2.attempts == 0
    assert outbox.sync_targets([]) == 1  # the destination removed: its pending job is dead


@pytest.mark.parametrize(
    ("destinations", "message"),
    [
        ([DIMSE, {**DIMSE, "port": 105}], "used twice"),
        ([{**STOW, "url": "https://user:pw@pacs.example/dicom-web"}], "credentials"),
        ([{**STOW, "url": "ftp://pacs.example"}], "http"),
        ([{**STOW, "auth": {"type": "bearer", "secret_env": "X", "secret_file": "/x"}}], "exactly one"),
        ([{**STOW, "auth": {"type": "basic", "secret_env": "X"}}], "username"),
        ([{**DIMSE, "ae_title": "A" * 17}], "AE title"),
        ([{**DIMSE, "calling_ae_title": "BAD\\AE"}], "AE title"),
        ([{**DIMSE, "instance_sr": False}], "sends nothing"),
        ([{**DIMSE, "type": "hl7"}], "type"),
        ([{**DIMSE, "tls": {"ca_file": "/ca.pem", "cert_file": "/c.pem"}}], "go together"),
        ([{**DIMSE, "name": "bad name"}], "destination name"),
    ],
)
def test_export_settings_are_validated(tmp_path: Path, destinations: list[Any], message: str) -> None:
    with pytest.raises(ConfigError, match="export_destinations") as info:
        load_settings(model=DEMO, data_dir=tmp_path, export_destinations=destinations)
    assert message in str(info.value)


def test_destinations_list_the_documents_they_receive(tmp_path: Path) -> None:
    """``documents`` names the result documents a destination receives (default ``["sr"]``); the older
    ``instance_sr``/``series_sr`` mean the same kinds; a kind export does not deliver, a destination that
    receives nothing and both spellings at once are refused, saying why."""
    settings = load_settings(
        model=DEMO,
        data_dir=tmp_path,
        export_destinations=[
            {**DIMSE, "documents": ["series-sr", "sr", "sr"]},
            {**STOW, "series_sr": True},
            {**STOW, "name": "series-only", "instance_sr": False, "series_sr": "true"},
            {**DIMSE, "name": "plain", "port": 105},
        ],
    )
    assert [(d.documents, d.instance_sr, d.series_sr) for d in settings.export_destinations] == [
        (["series-sr", "sr"], True, True),
        (["sr", "series-sr"], True, True),
        (["series-sr"], False, True),
        (["sr"], True, False),
    ]
    for given, message in [
        ({"documents": ["pdf"]}, "'pdf' is not a result document that export delivers"),
        ({"documents": []}, "sends nothing"),
        ({"documents": ["sr"], "series_sr": True}, "not both"),
        ({"instance_sr": "sometimes"}, "instance_sr must be true or false"),
    ]:
        with pytest.raises(ConfigError, match="export_destinations") as info:
            load_settings(model=DEMO, data_dir=tmp_path, export_destinations=[{**DIMSE, **given}])
        assert message in str(info.value)


def test_export_destinations_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RETINAEDGE_EXPORT_DESTINATIONS", json.dumps([DIMSE, STOW]))
    settings = load_settings(model=DEMO, data_dir=tmp_path)
    assert [d.target() for d in settings.export_destinations] == [
        "PACS@127.0.0.1:104",
        "https://pacs.example/dicom-web",
    ]
    with pytest.raises(ConfigError, match="export_retry_max_s"):
        load_settings(model=DEMO, data_dir=tmp_path, export_retry_initial_s=10, export_retry_max_s=1)


def closed_port() -> int:
    """A port on 127.0.0.1 that refuses connections (bound, never listening, for the test's duration)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed_port.keep = s  # type: ignore[attr-defined]
    return int(s.getsockname()[1])


def test_dead_letters_degrade_readiness_until_queued_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Destinations that refuse connections: each SR (an instance's; the series' once its quiet period is
    over) is tried export_max_attempts times with back-off, then dead-lettered; /readyz says so (200, degraded), /metrics counts it, /v1/exports lists the jobs
    and their attempts, and POST /v1/exports/retry queues them again. The bearer token is never logged."""
    monkeypatch.setenv("TEST_STOW_TOKEN", "token-that-must-not-leak-0123")
    port = closed_port()
    destinations = [
        {**DIMSE, "port": port, "series_sr": True},
        {
            **STOW,
            "url": f"http://127.0.0.1:{port}/dicom-web",
            "auth": {"type": "bearer", "secret_env": "TEST_STOW_TOKEN"},
        },
    ]
    caplog.set_level(logging.INFO)
    with (
        serve(
            model=DEMO,
            export_destinations=destinations,
            export_max_attempts=3,
            export_retry_initial_s=0.05,
            export_retry_max_s=0.1,
            series_quiet_s=0.5,
        ) as base,
        httpx.Client(timeout=60) as c,
    ):
        body, ctype = multipart([(REPO_ROOT / "examples" / "study_01" / "IM0005.dcm").read_bytes()])
        r = c.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        uid = r.json()["00081199"]["Value"][0]["00081155"]["Value"][0]
        wait_done(c, base, uid)

        def dead() -> dict[str, Any] | None:
            b = c.get(f"{base}/v1/exports", params={"state": "dead"}).json()
            return b if len(b["jobs"]) == 3 else None

        status = poll(dead, lambda status: status is not None, timeout=30, interval=0.1)
        assert status is not None, "the jobs were not dead-lettered"
        ExportsStatus.model_validate(status)
        assert {j["attempts"] for j in status["jobs"]} == {3}
        assert {d["name"]: d["dead_lettered"] for d in status["destinations"]} == {"pacs": 2, "web": 1}
        kinds = sorted((j["destination"], j["kind"]) for j in status["jobs"])
        assert kinds == [("pacs", "instance"), ("pacs", "series"), ("web", "instance")]  # quiet period
        details = {d["name"]: d["last_attempt"]["detail"] for d in status["destinations"]}
        assert "no connection to 127.0.0.1" in details["pacs"]
        assert "ConnectionRefusedError" in details["web"]
        job = c.get(f"{base}/v1/exports/{status['jobs'][0]['id']}").json()
        ExportJob.model_validate(job)
        assert [a["outcome"] for a in job["history"]] == ["failed"] * 3
        assert c.get(f"{base}/v1/exports/999999").status_code == 404

        ready = c.get(f"{base}/readyz")
        assert ready.status_code == 200
        Ready.model_validate(ready.json())
        assert ready.json()["status"] == "degraded"
        assert sum("dead-lettered" in reason for reason in ready.json()["degraded"]) == 2
        assert c.get(f"{base}/v1/exports", params={"state": "bogus"}).status_code == 400
        metrics = c.get(f"{base}/metrics").text
        assert 'retinaedge_export_dead_letters_total{destination="web"} 1.0' in metrics
        assert 'retinaedge_export_attempts_total{destination="pacs",outcome="failed"} 6.0' in metrics

        assert c.post(f"{base}/v1/exports/retry", params={"destination": "nope"}).status_code == 404
        assert c.post(f"{base}/v1/exports/retry", params={"destination": "web"}).json() == {"requeued": 1}
        (web,) = [j for j in status["jobs"] if j["destination"] == "web"]
        job = poll(  # tried again from attempt 1, then dead again
            lambda: c.get(f"{base}/v1/exports/{web['id']}").json(),
            lambda job: job["state"] == "dead" and len(job["history"]) == 6,
            timeout=30,
            interval=0.1,
        )
        assert job["state"] == "dead" and job["attempts"] == 3 and len(job["history"]) == 6
    assert "token-that-must-not-leak-0123" not in caplog.text
    assert uid not in caplog.text  # UIDs are hashed in logs


@contextmanager
def https_appliance(tmp_path: Path, token: str) -> Iterator[tuple[str, Path]]:
    """A second appliance serving HTTPS with a bearer token (uvicorn in a thread): a real DICOMweb peer
    for STOW-RS that refuses what it cannot analyse. Yields its DICOMweb root and its certificate."""
    import threading

    import uvicorn
    from retinaedge.service.app import create_app
    from support.servers import free_port

    cert, key = self_signed(tmp_path, "peer")
    port = free_port()
    settings = load_settings(
        model=DEMO,
        data_dir=tmp_path / "peer",
        port=port,
        api_token=token,
        tls_cert_file=cert,
        tls_key_file=key,
    )
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_config=None,
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    poll(lambda: server.started, timeout=60, interval=0.05)
    try:
        yield f"https://127.0.0.1:{port}/dicomweb", cert
    finally:
        server.should_exit = True
        thread.join(30)


def test_stow_rs_over_https_with_a_bearer_token_to_a_peer_that_refuses_the_sr(tmp_path: Path) -> None:
    """STOW-RS over HTTPS (the peer's certificate verified by ca_file) with a bearer token from a file:
    the peer, another appliance, takes the request but refuses the SR itself (no pixel data: Failure
    Reason 0x0122 in a 409). That is a failure of this SR only: it backs off alone and is dead-lettered."""
    token = "peer-token-0123456789abcdef"
    secret = tmp_path / "token"
    secret.write_text(token + "\n")
    with https_appliance(tmp_path, token) as (url, cert):
        web = {
            **STOW,
            "url": url,
            "ca_file": str(cert),
            "auth": {"type": "bearer", "secret_file": str(secret)},
        }
        with (
            serve(
                model=DEMO, export_destinations=[web], export_max_attempts=2, export_retry_initial_s=0.05
            ) as base,
            httpx.Client(timeout=60) as c,
        ):
            body, ctype = multipart([(REPO_ROOT / "examples" / "study_01" / "IM0005.dcm").read_bytes()])
            r = c.post(f"{base}/dicomweb/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 200, r.text

            def web_destination() -> dict[str, Any]:
                (d,) = c.get(f"{base}/v1/exports").json()["destinations"]
                return dict(d)

            d = poll(web_destination, lambda d: d["jobs"]["dead"] == 1, timeout=30, interval=0.1)
            assert d["jobs"] == {"pending": 0, "delivered": 0, "dead": 1}
            assert d["last_attempt"]["detail"] == "STOW-RS HTTP 409, failure reason 0x0122"
            assert d["attempts"]["failed"] == 2
