"""``backend = triton`` against a real tritonserver on 127.0.0.1 (the nvidia-pytriton wheel's, CPU, python
backend) serving repositories written by ``retinaedge export-triton --platform python``.

One tritonserver for the module (it loads the demo bundle and "another bundle", a copy of it whose
model.onnx differs by its doc string); the stop/restart test leaves it running again. Skipped, with the
reason, when the wheel or the python backend's numpy<2 is missing (``make test`` installs both).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from retinaedge.runtime.cli import main
from retinaedge.runtime.hashing import sha256_file
from support.clients import multipart, wait_done
from support.paths import DEMO, EXAMPLES, REPO_ROOT
from support.polling import wait_until
from support.servers import free_port, serve

sys.path.insert(0, str(REPO_ROOT / "tools"))
from triton_local import LocalTriton, TritonUnavailable  # noqa: E402

NAME = "retinaedge-demo-brainmr"
OTHER = "other-bundle"
ONE = "demo-batch-1"  # the demo bundle with max_batch_size 1: the backend splits every batch
DEMO_SHA = json.loads((DEMO / "manifest.json").read_text())["model_sha256"]


def other_bundle(root: Path) -> Path:
    """The demo bundle with a model.onnx that differs in its doc string only (so another sha256)."""
    import onnx

    out = root / "other-bundle"
    shutil.copytree(DEMO, out)
    model = onnx.load(str(out / "model.onnx"))
    model.doc_string = "another bundle"
    onnx.save(model, str(out / "model.onnx"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model_sha256"] = sha256_file(out / "model.onnx")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    root = tmp_path_factory.mktemp("triton")
    repo = root / "repo"
    common = ["--out", str(repo), "--platform", "python", "--threads", "1", "--max-batch", "8"]
    assert main(["export-triton", "--model", str(DEMO), *common]) == 0
    assert main(["export-triton", "--model", str(other_bundle(root)), "--name", OTHER, *common]) == 0
    one = ["--out", str(repo), "--platform", "python", "--threads", "1", "--max-batch", "1", "--name", ONE]
    assert main(["export-triton", "--model", str(DEMO), *one]) == 0
    try:
        server = LocalTriton(
            repo,
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            log_path=root / "triton.log",
        )
    except TritonUnavailable as exc:
        pytest.skip(str(exc))
    try:
        server.start(90)
        yield server
    finally:
        server.close()


def readyz(base: str) -> httpx.Response:
    return httpx.get(f"{base}/readyz", timeout=10)


def frames(result: dict[str, Any]) -> list[list[dict[str, Any]]]:
    return [f["detections"] for f in result["frames"]]


def test_python_variant_serves_the_bundle_as_onnxruntime_does(triton: LocalTriton) -> None:
    """The exported python-backend model loads in the real tritonserver and computes what ONNX Runtime does."""
    import onnxruntime as ort
    import tritonclient.http as th

    client = th.InferenceServerClient(triton.http_url)
    assert client.is_model_ready(NAME) and client.is_model_ready(OTHER)
    config = client.get_model_config(NAME)
    assert config["parameters"]["retinaedge_model_sha256"]["string_value"] == DEMO_SHA
    assert config["max_batch_size"] == 8 and config["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    images = (np.load(DEMO / "golden.npz")["images"].astype(np.float32) / np.float32(255)).astype(np.float32)
    inp = th.InferInput("images", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    result = client.infer(NAME, [inp])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(DEMO / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    num, boxes, scores, labels = session.run(None, {"images": images})
    assert result.as_numpy("num_detections").shape == (len(images), 1)  # dims [1] for the scalar per image
    np.testing.assert_array_equal(result.as_numpy("num_detections").reshape(-1), num)
    np.testing.assert_array_equal(result.as_numpy("labels"), labels)
    np.testing.assert_allclose(result.as_numpy("boxes"), boxes, rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("scores"), scores, rtol=0, atol=1e-6)
    # the registry backend splits a batch beyond the model's max_batch_size (1 here) into requests
    from retinaedge.runtime.backends import BackendOptions, open_backend
    from retinaedge.runtime.bundle import load_bundle

    extra = {"url": triton.http_url, "model": ONE}
    with open_backend("triton", load_bundle(DEMO), BackendOptions(extra=extra)) as backend:
        assert backend.max_batch == 1 and backend.unavailable() is None
        split = backend.infer(images)
    np.testing.assert_array_equal(split["num_detections"], num)
    np.testing.assert_allclose(split["boxes"], boxes, rtol=0, atol=1e-4)

    # Triton records an execution's statistics after its responses are sent: polled, bounded
    def stats(name: str) -> dict[str, Any]:
        return dict(client.get_inference_statistics(name)["model_stats"][0])

    wait_until(
        lambda: int(stats(ONE)["execution_count"]) == len(images),
        "two executions of batch size 1",
        timeout=10,
        interval=0.1,
    )

    def batched() -> bool:
        s = stats(NAME)
        formed = sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in s["batch_stats"])
        return formed == int(s["inference_count"]) >= len(images)

    wait_until(batched, "batch statistics that add up to the inferences", timeout=10, interval=0.1)
    client.close()


def test_serve_with_triton_gives_the_local_onnxruntime_results(
    triton: LocalTriton, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Golden self-test through Triton, then every example: STOW-RS for the series, /v1/detect for the
    multi-frame and JPEG 2000 instances; every box as `retinaedge detect --backend onnxruntime` finds it."""
    series = sorted((EXAMPLES / "study_01").glob("*.dcm"))
    singles = [
        EXAMPLES / "study_01_multiframe" / "MF0001.dcm",
        EXAMPLES / "compressed" / "study_01_IM0016_J2K.dcm",
    ]
    capsys.readouterr()
    assert (
        main(
            [
                "detect",
                "--model",
                str(DEMO),
                "--backend",
                "onnxruntime",
                "--threads",
                "1",
                *map(str, series + singles),
            ]
        )
        == 0
    )
    local = {d["sop_instance_uid"]: d for d in map(json.loads, capsys.readouterr().out.splitlines())}
    assert len(local) == len(series) + len(singles)

    with serve(model=DEMO, backend="triton", triton_url=triton.http_url, data_dir=tmp_path / "data") as base:
        ready = readyz(base)
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["backend"] == "triton" and body["self_test"]["passed"] is True
        assert (
            body["engine"]["remote"]["available"] is True and body["engine"]["remote"]["max_batch_size"] == 8
        )
        assert DEMO_SHA[:12] in body["backend_reason"]
        served: dict[str, dict[str, Any]] = {}
        with httpx.Client(timeout=120) as c:
            stow, ctype = multipart([p.read_bytes() for p in series])
            r = c.post(f"{base}/dicomweb/studies", content=stow, headers={"Content-Type": ctype})
            assert r.status_code == 200, r.text
            for path in singles:
                r = c.post(
                    f"{base}/v1/detect",
                    content=path.read_bytes(),
                    headers={"Content-Type": "application/dicom"},
                )
                assert r.status_code == 200, r.text
                served[r.json()["sop_instance_uid"]] = r.json()
            for path in series:
                uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                served[uid] = wait_done(c, base, uid, timeout=120)
    assert served.keys() == local.keys()
    boxes = 0
    for uid, result in served.items():
        assert result.get("backend", "triton") == "triton"
        assert frames(result) == frames(local[uid]), uid  # every label, class, score and box
        boxes += sum(len(f) for f in frames(result))
    assert boxes > len(served)  # the examples do have findings


def test_triton_stopped_while_serving(triton: LocalTriton, tmp_path: Path) -> None:
    """Over gRPC: Triton stops -> /readyz 503 with the reason, STOW-RS instances accepted and pending;
    Triton back -> all of them done, none failed."""
    series = sorted((EXAMPLES / "study_01").glob("*.dcm"))[:4]
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series]
    settings = {
        "backend": "triton",
        "triton_protocol": "grpc",
        "triton_url": triton.grpc_url,
        "triton_probe_interval_s": 0.2,
        "data_dir": tmp_path / "data",
    }
    with serve(model=DEMO, **settings) as base, httpx.Client(timeout=60) as c:
        assert readyz(base).status_code == 200
        triton.stop()
        down = wait_until(
            lambda: (r := readyz(base)).status_code == 503 and r,
            "/readyz 503 after Triton stopped",
            timeout=30,
            interval=0.1,
        )
        assert "Triton at" in down.json()["detail"] and triton.grpc_url in down.json()["detail"]
        r = c.post(
            f"{base}/v1/detect", content=series[0].read_bytes(), headers={"Content-Type": "application/dicom"}
        )
        assert r.status_code == 503 and triton.grpc_url in r.json()["detail"], r.text
        stow, ctype = multipart([p.read_bytes() for p in series])
        r = c.post(f"{base}/dicomweb/studies", content=stow, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        time.sleep(1.0)  # the processor has tried them meanwhile (every 0.25 s): still pending, not failed
        assert [c.get(f"{base}/v1/results/{uid}").status_code for uid in uids] == [202] * len(uids)
        assert readyz(base).status_code == 503
        assert (
            'retinaedge_backend_info{backend="triton",state="unavailable"} 1.0'
            in c.get(f"{base}/metrics").text
        )
        triton.start(90)
        wait_until(
            lambda: readyz(base).status_code == 200,
            "/readyz 200 once Triton is back",
            timeout=30,
            interval=0.1,
        )
        results = [wait_done(c, base, uid, timeout=60) for uid in uids]
    assert [r["sop_instance_uid"] for r in results] == uids
    assert all(len(r["frames"]) == 1 for r in results)


def test_another_bundles_repository_is_refused(triton: LocalTriton, tmp_path: Path) -> None:
    """A model exported from another bundle: the appliance does not become ready, and says both sha256s."""
    import tritonclient.http as th

    client = th.InferenceServerClient(triton.http_url)
    other_sha = client.get_model_config(OTHER)["parameters"]["retinaedge_model_sha256"]["string_value"]
    client.close()
    assert other_sha != DEMO_SHA
    with serve(
        model=DEMO, backend="triton", triton_url=triton.http_url, triton_model=OTHER, data_dir=tmp_path / "d"
    ) as base:
        r = readyz(base)
    assert r.status_code == 503
    detail = r.json()["detail"]
    assert "another bundle" in detail and other_sha in detail and DEMO_SHA in detail, detail


def test_triton_unreachable_at_start(tmp_path: Path) -> None:
    """Nothing on the port: not ready with the reason after triton_start_timeout_s; with
    triton_unreachable=onnxruntime local ONNX Runtime serves instead."""
    url = f"127.0.0.1:{free_port()}"
    with serve(
        model=DEMO, backend="triton", triton_url=url, triton_start_timeout_s=0.5, data_dir=tmp_path / "a"
    ) as base:
        r = readyz(base)
    assert r.status_code == 503 and f"Triton at {url} is unreachable" in r.json()["detail"]
    with serve(
        model=DEMO,
        backend="triton",
        triton_url=url,
        triton_unreachable="onnxruntime",
        data_dir=tmp_path / "b",
    ) as base:
        body = readyz(base).json()
        assert body["status"] == "ready" and body["self_test"]["passed"] is True
        assert (
            body["engine"]["remote"]["available"] is False and "local ONNX Runtime" in body["backend_reason"]
        )
        dicom = (EXAMPLES / "compressed" / "study_01_IM0016_J2K.dcm").read_bytes()
        r = httpx.post(
            f"{base}/v1/detect", content=dicom, headers={"Content-Type": "application/dicom"}, timeout=60
        )
        assert r.status_code == 200 and r.json()["frames"][0]["detections"]


def test_detect_backend_triton_takes_the_service_variables(
    triton: LocalTriton, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``retinaedge detect --backend triton`` reaches Triton through RETINAEDGE_TRITON_*, as the service."""
    dicom = str(EXAMPLES / "compressed" / "study_01_IM0016_J2K.dcm")
    capsys.readouterr()
    assert main(["detect", "--model", str(DEMO), "--backend", "onnxruntime", "--threads", "1", dicom]) == 0
    local = json.loads(capsys.readouterr().out)
    monkeypatch.setenv("RETINAEDGE_TRITON_URL", triton.grpc_url)
    monkeypatch.setenv("RETINAEDGE_TRITON_PROTOCOL", "grpc")
    monkeypatch.setenv("RETINAEDGE_TRITON_TIMEOUT_S", "30")
    assert main(["detect", "--model", str(DEMO), "--backend", "triton", dicom]) == 0
    served = json.loads(capsys.readouterr().out)
    assert frames(served) == frames(local) and frames(served)[0]
    monkeypatch.setenv("RETINAEDGE_TRITON_TIMEOUT_S", "soon")
    assert main(["detect", "--model", str(DEMO), "--backend", "triton", dicom]) == 2
    assert "RETINAEDGE_TRITON_TIMEOUT_S must be a number" in capsys.readouterr().out
