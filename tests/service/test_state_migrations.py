"""The schema version of ``state.sqlite3`` and its migrations (service/database.py).

``tests/data/state-v0/`` is a data directory written by the code before schema versions (commit 98b2db9)
with that code's own classes (tools/make_state_fixture.py, which says what it holds): instances pending,
failed and done, a ``/v1/detect`` result, destinations taking instance SRs and series SRs, export jobs
delivered, dead, pending and with an attempt in flight, their attempts and counters, a watched series and
the SR files the outbox refers to. Each test works on a copy. Today's code must open it the way the
service does (``Store``, then the exporter's ``Outbox``), migrate it in place, and lose nothing.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from retinaedge.runtime.errors import StateVersionError
from retinaedge.service import database, migrations
from retinaedge.service.app import create_app
from retinaedge.service.http.schemas import ExportsStatus
from retinaedge.service.outbox import schema as outbox_schema
from retinaedge.service.outbox.queue import Outbox
from retinaedge.service.results import schema as results_schema
from retinaedge.service.results.store import Store
from retinaedge.service.settings import load_settings
from support.clients import wait_done
from support.paths import DEMO, REPO_ROOT
from support.polling import wait_until

FIXTURE = REPO_ROOT / "tests" / "data" / "state-v0"
#: The tables whose rows the migrations keep exactly as version 0 wrote them.
UNCHANGED = (
    "series_requests",
    "export_jobs",
    "export_attempts",
    "export_counters",
)
#: The tables whose rows version 3 keeps with the model of the row, '' until the service adopts them.
WITH_MODEL = ("instances", "export_series_watch")


def with_model(table_rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows of before version 3 as version 3 keeps them: a last column, the model, ''."""
    return [(*r, "") for r in table_rows]


def copy_fixture(tmp_path: Path) -> Path:
    """The fixture as a data directory in ``tmp_path``, with its pending instance's spooled file."""
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    (data / "spool").mkdir()
    for name, example in json.loads((FIXTURE / "spool.json").read_text()).items():
        shutil.copyfile(REPO_ROOT / example, data / "spool" / name)
    return data


def rows(path: Path, table: str) -> list[tuple[Any, ...]]:
    """Every row of ``table``, in rowid order, read with a plain connection (no code under test)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
    finally:
        db.close()


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def schema_of(path: Path) -> dict[str, str]:
    """Name -> the SQL that made it (whitespace collapsed) of every table, index and trigger."""
    db = sqlite3.connect(path)
    try:
        found = db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall()
    finally:
        db.close()
    return {name: " ".join(sql.replace("IF NOT EXISTS ", "").split()) for name, sql in found}


def snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    tables = (*UNCHANGED, *WITH_MODEL, "export_targets", "export_documents")
    return {table: rows(path, table) for table in tables}


def test_the_fixture_is_what_the_landed_code_wrote() -> None:
    """It holds every case the migration must carry (so that the test below means something)."""
    path = FIXTURE / "state.sqlite3"
    assert user_version(path) == 0
    assert {r[1:] for r in rows(path, "export_targets")} == {(1, 0), (0, 1)}  # instance SRs; series SRs
    states = sorted(r[7] for r in rows(path, "instances"))
    assert states == ["done"] * 5 + ["failed", "pending"]
    jobs = rows(path, "export_jobs")
    assert sorted(j[3] for j in jobs) == ["dead", "delivered", "delivered", "pending", "pending"]
    assert any(a[4] is None for a in rows(path, "export_attempts"))  # an attempt in flight
    assert {d[1] for d in rows(path, "export_documents")} == {"instance", "series"}
    files = [d[4] for d in rows(path, "export_documents") if d[4] is not None]
    assert files and all((FIXTURE / "outbox" / f).is_file() for f in files)
    assert rows(path, "export_series_watch") and rows(path, "export_counters")


def test_a_database_of_the_landed_code_is_migrated_on_start_and_nothing_is_lost(tmp_path: Path) -> None:
    data = copy_fixture(tmp_path)
    path = data / "state.sqlite3"
    before = snapshot(path)

    store = Store(path)  # as build_services opens it: the store first, then the exporter's outbox
    outbox = Outbox(path)
    try:
        assert user_version(path) == database.LATEST == 3
        after = snapshot(path)
        for table in UNCHANGED:
            assert after[table] == before[table], table
        for table in WITH_MODEL:
            assert after[table] == with_model(before[table]), table
        kind = {"instance": "sr", "series": "series-sr"}
        assert after["export_documents"] == [
            (id_, kind[scope], scope, subject, version, file, uid, built, "", None)
            for id_, scope, subject, version, file, uid, built in before["export_documents"]
        ]
        targets = {(name, kind, scope) for name, kind, scope in after["export_targets"]}
        assert targets == {("pacs", "sr", "instance"), ("archive", "series-sr", "series")}

        # Through today's classes: every instance, every job with its state and attempts.
        for uid, state, result in ((r[0], r[7], r[11]) for r in before["instances"]):
            row = store.get(uid)
            assert row is not None and row.state == state
            assert row.result() == (json.loads(result) if result else None)
        jobs = {j.id: j for j in outbox.jobs(None, None, 100)}
        assert sorted(jobs) == [j[0] for j in before["export_jobs"]]
        for id_, destination, _doc, state, _c, _n, attempts, possibly, duplicate, error, _f in before[
            "export_jobs"
        ]:
            job = jobs[id_]
            assert (job.destination, job.state, job.attempts) == (destination, state, attempts)
            assert (job.possibly_delivered, job.duplicate, job.last_error) == (
                bool(possibly),
                duplicate,
                error,
            )
            assert (job.kind, job.document_kind) in {("instance", "sr"), ("series", "series-sr")}
        in_flight = [a[1] for a in before["export_attempts"] if a[4] is None]
        assert [h["outcome"] for h in outbox.attempts(in_flight[0])][-1] == "in-flight"
        assert outbox.known_paths() == {p.name for p in (data / "outbox").iterdir()}
        assert outbox.watched_series() == [(r[0], "") for r in before["export_series_watch"]]

        # The trigger enqueues by kind after the migration: an instance's result, then its series.
        series = "1.2.826.0.1.3680043.8.498.999"
        assert store.add_pending("1.2.826.0.1.3680043.8.498.999.1", "1.2.3", "1.2.4", series, "x.dcm", 10)
        store.done("1.2.826.0.1.3680043.8.498.999.1", {"frames": []})
        (new,) = [j for j in outbox.jobs(None, None, 100) if j.id not in jobs]
        assert (new.destination, new.kind, new.document_kind, new.state) == (
            "pacs",
            "instance",
            "sr",
            "pending",
        )
        assert (series, "") in outbox.watched_series()  # "archive" takes series-sr
        assert outbox.series_complete(series, 1.0) == 1
        (added,) = [j for j in outbox.jobs(None, "archive", 100) if j.subject_uid == series]
        assert (added.kind, added.document_kind) == ("series", "series-sr")
    finally:
        outbox.close()
        store.close()


def test_a_version_1_database_takes_study_documents_and_keeps_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 -> 2 (the scope ``study``, for the KOS) -> 3 (a model per row): the outbox's targets, documents
    (with their ids) and jobs stay as they were; afterwards a destination may take ``kos``, a series is
    watched for it, and its completion enqueues a study-scope document of its study."""
    path = tmp_path / "state.sqlite3"
    with monkeypatch.context() as m:  # a database of version 1, written as that code wrote it
        m.setattr(database, "STEPS", database.STEPS[:1])
        m.setattr(database, "LATEST", 1)
        db = database.connect(path)
        assert user_version(path) == 1
        db.execute(
            "INSERT INTO export_targets (name, kind, scope) VALUES ('pacs', 'sr', 'instance'), "
            "('archive', 'series-sr', 'series')"
        )
        db.execute(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, spool_path, "
            "size_bytes, received_at, state) VALUES ('1.2.3.4.1', '1.2.840.10008.5.1.4.1.1.4', '1.2.3', "
            "'1.2.3.4', 'x.dcm', 10, 1.0, 'pending')"
        )
        db.execute(
            "UPDATE instances SET state = 'done', completed_at = 2.0, result_json = '{\"frames\": []}', "
            "spool_path = NULL WHERE sop_instance_uid = '1.2.3.4.1'"
        )  # the trigger: pacs's sr job, the series watched for archive
        db.execute(
            "INSERT INTO export_documents (kind, scope, subject_uid, version) "
            "VALUES ('series-sr', 'series', '1.2.3.4', 5.0)"
        )
        db.execute(
            "INSERT INTO export_jobs (destination, document_id, state, created_at, next_attempt_at) "
            "SELECT 'archive', id, 'pending', 5.0, 5.0 FROM export_documents WHERE kind = 'series-sr'"
        )
        db.execute("DELETE FROM export_series_watch")
        db.close()
    before = snapshot(path)
    assert len(before["export_jobs"]) == 2 and len(before["instances"]) == 1
    store, outbox = Store(path), Outbox(path)
    try:
        assert user_version(path) == database.LATEST == 3
        after = snapshot(path)
        for table in UNCHANGED:
            assert after[table] == before[table], table
        for table in WITH_MODEL:
            assert after[table] == with_model(before[table]), table
        assert after["export_documents"] == [(*r, "", None) for r in before["export_documents"]]
        assert after["export_targets"] == before["export_targets"]
        outbox.sync_targets([("pacs", ["sr", "kos"])])
        assert store.add_pending("1.2.3.5.1", "1.2.840.10008.5.1.4.1.1.4", "1.2.3", "1.2.3.5", "y.dcm", 10)
        store.done("1.2.3.5.1", {"frames": []})
        assert outbox.watched_series() == [("1.2.3.5", "")]  # watched for the study's kos alone
        assert outbox.series_complete("1.2.3.5", 7.0, "1.2.3") == 1
        (job,) = [j for j in outbox.jobs(None, "pacs", 100) if j.document_kind == "kos"]
        assert (job.kind, job.subject_uid, job.version) == ("study", "1.2.3", 7.0)
        assert [r.sop_instance_uid for r in store.study_rows("1.2.3")] == ["1.2.3.4.1", "1.2.3.5.1"]
    finally:
        store.close()
        outbox.close()


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections (bound, never listening)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield int(s.getsockname()[1])
    finally:
        s.close()


def test_the_service_starts_on_a_landed_database_and_serves_it(tmp_path: Path, refusing_port: int) -> None:
    """create_app on the fixture: results answer as before (JSON and SR), /v1/exports lists every job
    with its state, the attempt left in flight is found interrupted, and the pending instance, processed
    now, gets its "sr" job from the migrated trigger."""
    data = copy_fixture(tmp_path)
    before = snapshot(data / "state.sqlite3")
    settings = load_settings(
        model=DEMO,
        data_dir=data,
        results_max_age_s=100 * 365 * 86400.0,  # the fixture's results are older than the default 7 days
        export_retry_initial_s=3600.0,  # one attempt each at most while the test runs
        export_retry_max_s=3600.0,
        export_destinations=[
            {"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": refusing_port},
            {
                "name": "archive",
                "type": "stowrs",
                "url": f"http://127.0.0.1:{refusing_port}/dicom-web",
                "documents": ["series-sr"],
            },
        ],
    )
    app = create_app(settings)
    with TestClient(app) as client:
        assert app.state.worker.wait_ready(120), app.state.worker.reason
        for uid, state, result in ((r[0], r[7], r[11]) for r in before["instances"]):
            if state == "done":
                r = client.get(f"/v1/results/{uid}")
                assert r.status_code == 200 and r.json() == {**json.loads(result), "state": "done"}
                sr = client.get(f"/v1/results/{uid}", headers={"Accept": "application/dicom"})
                assert sr.status_code == 200 and sr.headers["content-type"] == "application/dicom"
                ds = pydicom.dcmread(io.BytesIO(sr.content))
                assert ds.ContentSequence and str(ds.PatientName) == "PHANTOM^ROMEO"  # the identity file
                assert client.get(f"/v1/results/{uid}", params={"document": "sr"}).status_code == 200
            elif state == "failed":
                assert client.get(f"/v1/results/{uid}").json()["state"] == "failed"

        status = client.get("/v1/exports", params={"limit": 1000}).json()
        ExportsStatus.model_validate(status)
        listed = {j["id"]: j for j in status["jobs"]}
        documents = {d[0]: d for d in before["export_documents"]}
        for id_, destination, doc, state, _c, _n, attempts, _p, duplicate, error, _f in before["export_jobs"]:
            job = listed[id_]
            scope, subject, sr_uid = documents[doc][1], documents[doc][2], documents[doc][5]
            assert (job["destination"], job["kind"], job["subject_uid"]) == (destination, scope, subject)
            assert job["document"] == {"instance": "sr", "series": "series-sr"}[scope]
            if sr_uid is not None:  # built before the restart: the same SR file is sent (one SOP instance)
                assert job["sr_sop_instance_uid"] == sr_uid
            assert job["state"] == state
            if state != "pending":  # the exporter may have tried the pending ones once since the start
                assert (job["attempts"], job["duplicate"], job["last_error"]) == (attempts, duplicate, error)
            else:
                assert job["attempts"] >= attempts
        by_name = {d["name"]: d for d in status["destinations"]}
        assert (
            by_name["pacs"]["documents"],
            by_name["pacs"]["instance_sr"],
            by_name["pacs"]["series_sr"],
        ) == (
            ["sr"],
            True,
            False,
        )
        assert (by_name["archive"]["instance_sr"], by_name["archive"]["series_sr"]) == (False, True)
        assert by_name["pacs"]["dead_lettered"] == 1 and by_name["pacs"]["attempts"]["interrupted"] == 1
        assert by_name["archive"]["duplicates"]["possible"] == 1
        in_flight = next(a[1] for a in before["export_attempts"] if a[4] is None)
        history = client.get(f"/v1/exports/{in_flight}").json()["history"]
        assert "interrupted" in [h["outcome"] for h in history]

        (pending,) = [r[0] for r in before["instances"] if r[7] == "pending"]
        wait_done(client, "", pending)

        def new_job() -> list[dict[str, Any]]:
            jobs = client.get("/v1/exports", params={"destination": "pacs"}).json()["jobs"]
            return [j for j in jobs if j["subject_uid"] == pending]

        (job,) = wait_until(new_job, "the processed instance's export job", timeout=30, interval=0.05)
        assert (job["kind"], job["document"]) == ("instance", "sr")


def test_a_new_database_gets_the_latest_version_and_the_rooms_schemas(tmp_path: Path) -> None:
    """A new database runs every step (service/database.py); the result is exactly what the rooms
    describe (results/schema.py, outbox/schema.py), and so is a migrated version 0 database."""
    described = tmp_path / "described.sqlite3"
    db = sqlite3.connect(described)
    db.executescript(results_schema.SCHEMA + outbox_schema.SCHEMA)
    db.close()
    fresh = tmp_path / "fresh" / "state.sqlite3"
    Store(fresh).close()
    assert user_version(fresh) == database.LATEST
    assert schema_of(fresh) == schema_of(described)

    migrated = copy_fixture(tmp_path) / "state.sqlite3"
    Store(migrated).close()
    assert schema_of(migrated) == schema_of(described)


def test_a_version_0_database_without_the_outbox_tables_is_completed(tmp_path: Path) -> None:
    """A database the landed Store wrote alone (no outbox yet) is version 0 too: its tables are
    completed, its rows kept."""
    path = tmp_path / "state.sqlite3"
    db = sqlite3.connect(path)
    for statement in list(migrations.statements(migrations.V0_SCHEMA))[:5]:  # instances, series_requests
        db.execute(statement)
    db.execute(
        "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, size_bytes, "
        "received_at, state) VALUES ('1.2.3.1', '1.2', '1.2.3', '1.2.3.4', 10, 1.0, 'pending')"
    )
    db.commit()
    db.close()
    outbox = Outbox(path)
    store = Store(path)
    try:
        assert user_version(path) == database.LATEST
        outbox.sync_targets([("pacs", ["sr"])])
        store.done("1.2.3.1", {"frames": []})
        assert [(j.document_kind, j.subject_uid) for j in outbox.jobs(None, None, 10)] == [("sr", "1.2.3.1")]
    finally:
        store.close()
        outbox.close()


def test_a_failed_migration_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The steps run in one transaction: a step that fails halfway leaves version 0 as it was."""
    path = copy_fixture(tmp_path) / "state.sqlite3"
    before = snapshot(path)
    schema = schema_of(path)

    real = database.STEPS[0]

    def half_then_fail(db: sqlite3.Connection) -> None:
        real.apply(db)  # every change of step 1, then a failure before the version is set
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(database, "STEPS", (migrations.Step(1, "fails", half_then_fail),))
    with pytest.raises(RuntimeError, match="disk went away"):
        Store(path)
    assert user_version(path) == 0 and schema_of(path) == schema and snapshot(path) == before


def test_a_newer_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "data" / "state.sqlite3"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {database.LATEST + 1}")
    db.commit()
    db.close()
    schema = schema_of(path)
    for opener in (Store, Outbox):
        with pytest.raises(StateVersionError, match="written by a newer retinaedge") as info:
            opener(path)
        assert f"schema version {database.LATEST + 1}" in str(info.value)
        assert "never downgrades" in str(info.value)
    with pytest.raises(StateVersionError):
        create_app(load_settings(model=DEMO, data_dir=tmp_path / "data"))
    assert user_version(path) == database.LATEST + 1 and schema_of(path) == schema
