"""A model's versions through the service (service/lifecycle.py): staging signed bundle archives (and
every refusal with its own reason), the silent trial and its report (a third version activated during
it), activation and rollback, and the active version surviving a restart. Version A is the committed
demo bundle, versions B and C the same checkpoint and name exported with higher score thresholds
(tests/service/conftest.py)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import VERSION_B_SCORE_THRESH, VERSION_C_SCORE_THRESH
from retinaedge.runtime.cli import main
from retinaedge.runtime.signing import load_private_key, sign_bundle
from support.paths import DEMO, EXAMPLES
from support.polling import wait_until
from support.servers import ready_client

TOKEN = "lifecycle-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FILES = sorted((EXAMPLES / "study_01").glob("IM00*.dcm"))[10:22]


def tar_of(bundle: Path, gz: bool = False, extra: int = 0) -> bytes:
    """The bundle directory as a tar archive; ``extra`` > 0 adds a file of that many bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for item in sorted(bundle.iterdir()):
            tar.add(item, arcname=item.name)
        if extra:
            info = tarfile.TarInfo("padding.bin")
            info.size = extra
            tar.addfile(info, io.BytesIO(bytes(extra)))
    return buf.getvalue()


def cli(*argv: str) -> None:
    assert main(["--log-level", "WARNING", *argv]) == 0


@pytest.fixture()
def signed(tmp_path: Path, demo_version_b: Path, demo_version_c: Path) -> dict[str, Path]:
    """Keys (``site`` trusted, ``other`` not) and copies of A, B and C signed by ``site``."""
    out: dict[str, Path] = {}
    for name in ("site", "other"):
        cli("keygen", "--out", str(tmp_path / name))
        out[name], out[f"{name}.pub"] = tmp_path / f"{name}.key.pem", tmp_path / f"{name}.pub.pem"
    for name, source in (("a", DEMO), ("b", demo_version_b), ("c", demo_version_c)):
        out[name] = Path(shutil.copytree(source, tmp_path / name))
        cli("sign", str(out[name]), "--key", str(out["site"]))
    return out


def app_on(data: Path, bundle: Path, keys: dict[str, Path]) -> Any:
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings

    return create_app(
        load_settings(model=bundle, data_dir=data, api_token=TOKEN, trusted_keys=str(keys["site.pub"]))
    )


def detect(client: Any, path: Path) -> dict[str, Any]:
    r = client.post("/v1/detect", content=path.read_bytes(),
                    headers={**AUTH, "Content-Type": "application/dicom"})  # fmt: skip
    assert r.status_code == 200, r.text
    return dict(r.json())


def stage(client: Any, data: bytes) -> Any:
    return client.post(
        "/v1/models/retinaedge-demo-brainmr/versions",
        content=data,
        headers={**AUTH, "Content-Type": "application/x-tar"},
    )


def test_stage_trial_activate_rollback_and_restart(tmp_path: Path, signed: dict[str, Path]) -> None:
    data = tmp_path / "data"
    base = "/v1/models/retinaedge-demo-brainmr"
    with ready_client(app_on(data, signed["a"], signed)) as c:
        listed = c.get(f"{base}/versions", headers=AUTH).json()
        version_a = listed["active"]
        assert [v["version"] for v in listed["versions"]] == [version_a]

        # Refusals, each with its own reason; nothing of them is kept.
        unsigned = Path(shutil.copytree(signed["b"], tmp_path / "unsigned"))
        (unsigned / "signature.json").unlink()
        tampered = Path(shutil.copytree(signed["b"], tmp_path / "tampered"))
        model = bytearray((tampered / "model.onnx").read_bytes())
        model[len(model) // 2] ^= 0xFF
        (tampered / "model.onnx").write_bytes(bytes(model))
        other = Path(shutil.copytree(signed["b"], tmp_path / "other"))
        cli("sign", str(other), "--key", str(signed["other"]))
        mismatch = Path(shutil.copytree(signed["b"], tmp_path / "mismatch"))
        (mismatch / "model.onnx").write_bytes(bytes(model))
        # Signed by a trusted key (the signing library, since `retinaedge sign` refuses such a bundle), but
        # its model.onnx is not the manifest's.
        sign_bundle(mismatch, load_private_key(signed["site"]))
        for bundle, kind, words in (
            (unsigned, "signature-rejected", "unsigned"),
            (tampered, "signature-rejected", "model.onnx"),
            (other, "signature-rejected", "key"),
            (mismatch, "invalid-model-bundle", "does not match the manifest"),
        ):
            r = stage(c, tar_of(bundle))
            assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
            assert r.json()["type"].endswith(kind) and words in r.json()["detail"], (bundle.name, r.text)
        assert stage(c, b"not a tar archive").json()["type"].endswith("invalid-model-bundle")
        assert c.post(f"{base}/versions", content=b"x", headers=AUTH).status_code == 415
        assert c.post(f"{base}/versions", content=tar_of(signed["b"]),
                      headers={"Content-Type": "application/x-tar"}).status_code == 401  # fmt: skip
        assert [v["version"] for v in c.get(f"{base}/versions", headers=AUTH).json()["versions"]] == [
            version_a
        ]

        def staged_and_checked(bundle: Path) -> str:
            r = stage(c, tar_of(bundle, gz=True))
            assert r.status_code == 202, r.text
            version = str(r.json()["version"])

            def checked() -> bool:
                entries = c.get(f"{base}/versions", headers=AUTH).json()["versions"]
                check = next(v["check"] for v in entries if v["version"] == version)
                assert check["state"] != "failed", check
                return bool(check["state"] == "ready")

            wait_until(checked, f"version {version} loaded and self-tested", timeout=120, interval=0.2)
            return version

        version_b = staged_and_checked(signed["b"])

        # The silent trial: results of A only; B's compared and counted.
        assert c.post(f"{base}/shadow", params={"version": version_a}, headers=AUTH).status_code == 409
        assert c.post(f"{base}/shadow", params={"version": version_b}, headers=AUTH).json() == {
            "shadow": version_b
        }
        actives = [detect(c, path) for path in FILES]
        assert {b["model"]["sha256"][:12] for b in actives} == {version_a}
        report = wait_until(
            lambda: (r := c.get(f"{base}/shadow", headers=AUTH).json())["instances"] == len(FILES) and r,
            "the trial saw every instance", timeout=60, interval=0.1,
        )  # fmt: skip
        below = [d for b in actives for f in b["frames"] for d in f["detections"]
                 if d["score"] < VERSION_B_SCORE_THRESH]  # fmt: skip
        assert below, "the trial must lose something for this test to mean anything"
        lost: dict[str, int] = {}
        for d in below:
            lost[d["label"]] = lost.get(d["label"], 0) + 1
        assert report["lost_per_class"] == lost and report["gained_per_class"] == {}
        frames = sum(len(b["frames"]) for b in actives)
        differing = sum(any(d["score"] < VERSION_B_SCORE_THRESH for d in f["detections"])
                        for b in actives for f in b["frames"])  # fmt: skip
        assert report["frames"] == frames and report["frames_agreeing"] == frames - differing
        assert report["latency_ms"]["shadow_p50"] is not None
        assert report["active"] == version_a and [b["active"] for b in report["baselines"]] == [version_a]

        # C activated during the trial of B: B is compared with C from then on, apart from A.
        version_c = staged_and_checked(signed["c"])
        c.post(f"{base}/activate", params={"version": version_c}, headers=AUTH).raise_for_status()
        on_c = [detect(c, path) for path in FILES[:3]]
        assert {b["model"]["sha256"][:12] for b in on_c} == {version_c}
        report = wait_until(
            lambda: (r := c.get(f"{base}/shadow", headers=AUTH).json())["instances"] == 3 and r,
            "the trial saw the instances on C", timeout=60, interval=0.1,
        )  # fmt: skip
        assert report["version"] == version_b and report["active"] == version_c
        gained: dict[str, int] = {}
        for d in (d for b in actives[:3] for f in b["frames"] for d in f["detections"]):
            if VERSION_B_SCORE_THRESH <= d["score"] < VERSION_C_SCORE_THRESH:
                gained[d["label"]] = gained.get(d["label"], 0) + 1
        assert report["gained_per_class"] == gained and report["lost_per_class"] == {}
        assert [(b["active"], b["instances"]) for b in report["baselines"]] == [
            (version_a, len(FILES)), (version_c, 3)
        ]  # fmt: skip
        assert report["baselines"][0]["lost_per_class"] == lost  # A's comparison unchanged
        assert c.post(f"{base}/rollback", headers=AUTH).json()["active"] == version_a

        # Activation, then rollback: later instances run on the version active then.
        switched = c.post(f"{base}/activate", params={"version": version_b}, headers=AUTH).json()
        assert switched["active"] == version_b and switched["previous"] == version_a
        assert detect(c, FILES[0])["model"]["sha256"][:12] == version_b
        assert c.get(f"{base}/shadow", headers=AUTH).json()["shadow"] is None  # the trialled one is live
        assert c.post(f"{base}/rollback", headers=AUTH).json()["active"] == version_a
        assert detect(c, FILES[0])["model"]["sha256"][:12] == version_a
        assert c.post(f"{base}/activate", params={"version": "nope"}, headers=AUTH).status_code == 404
        c.post(f"{base}/activate", params={"version": version_b}, headers=AUTH).raise_for_status()
    # A restart serves the version activated last, not the settings' bundle.
    with ready_client(app_on(data, signed["a"], signed)) as c:
        assert c.get(f"{base}/versions", headers=AUTH).json()["active"] == version_b
        assert detect(c, FILES[0])["model"]["sha256"][:12] == version_b
        # A result keeps the version that produced it: FILES[0]'s is B's now.
        stored = c.get(f"/v1/results/{detect(c, FILES[1])['sop_instance_uid']}", headers=AUTH).json()
        assert stored["model"]["sha256"][:12] == version_b


def test_staging_needs_an_api_token(tmp_path: Path, demo_version_b: Path) -> None:
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings

    app = create_app(load_settings(model=DEMO, data_dir=tmp_path / "data"))
    with ready_client(app) as c:
        r = c.post("/v1/models/retinaedge-demo-brainmr/versions", content=tar_of(demo_version_b),
                   headers={"Content-Type": "application/x-tar"})  # fmt: skip
        assert r.status_code == 403 and r.json()["type"].endswith("forbidden")


def test_the_trial_of_an_identical_model_agrees_everywhere() -> None:
    """The report's rule on the demo against itself: two detectors of the same bundle, every frame of the
    example study agreeing (100 %), nothing gained or lost."""
    from retinaedge.runtime.detector import Detector
    from retinaedge.service.versions.shadow import ShadowReport

    with Detector.open(DEMO, threads=1) as one, Detector.open(DEMO, threads=1) as two:
        same = str(one.bundle.manifest.model_sha256)[:12]
        report = ShadowReport(same, same)
        for path in FILES:
            report.add(one.detect(path).to_json(), two.detect(path).to_json())
    out = report.to_json()
    assert out["frames"] == len(FILES) and out["agreement"] == 1.0
    assert out["gained_per_class"] == {} and out["lost_per_class"] == {}
    assert json.dumps(out)  # JSON as the route answers it


def test_staging_takes_the_archive_and_its_files_at_most(tmp_path: Path, demo_version_b: Path) -> None:
    """An upload of B takes its archive and its unpacked files on the data volume, never a third copy: on a
    volume with room for two copies and not three it is staged; a reserve that leaves room for the
    archive but not its files refuses it (507, saying so) before a file is unpacked, and one that leaves
    no room for the archive before a byte is written; a refusal leaves nothing behind."""
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings
    from support.tmpfs import mounted_tmpfs

    archive = tar_of(demo_version_b)
    unpacked = sum(f.stat().st_size for f in demo_version_b.iterdir())
    padded = tar_of(demo_version_b, extra=unpacked)  # the same bundle with a file of its size more
    size = len(archive) + unpacked + 8 * 1024**2  # room for two copies and the service's own files
    assert size < 3 * unpacked  # not for three
    base = "/v1/models/retinaedge-demo-brainmr"
    with mounted_tmpfs(
        tmp_path / "volume", size=f"{size // 1024}k", why="a data volume of a known size"
    ) as vol:
        data = vol / "data"
        free = shutil.disk_usage(vol).free
        reserve = free - len(archive) - unpacked // 2  # room for the archive and half its files
        settings = {"model": DEMO, "data_dir": data, "api_token": TOKEN, "max_bundle_bytes": 3 * unpacked}
        with ready_client(create_app(load_settings(min_free_bytes=reserve, **settings))) as c:
            for body, what in ((padded, "for the archive"), (archive, "for its unpacked files")):
                r = stage(c, body)
                assert r.status_code == 507 and r.json()["type"].endswith("insufficient-storage"), r.text
                assert what in r.json()["detail"] and "min_free_bytes" in r.json()["detail"], r.text
                assert not any((data / "models" / ".uploads").iterdir())
            assert len(c.get(f"{base}/versions", headers=AUTH).json()["versions"]) == 1
        with ready_client(create_app(load_settings(min_free_bytes=0, **settings))) as c:
            r = stage(c, archive)
            assert r.status_code == 202, r.text
            assert not any((data / "models" / ".uploads").iterdir())
            staged = data / "models" / "retinaedge-demo-brainmr" / "versions" / r.json()["version"]
            assert sum(f.stat().st_size for f in staged.iterdir()) == unpacked

            def checked() -> bool:
                entries = c.get(f"{base}/versions", headers=AUTH).json()["versions"]
                return any(v["version"] == staged.name and v["check"]["state"] == "ready" for v in entries)

            wait_until(checked, "the staged version checked", timeout=120, interval=0.2)
