"""Build the x86_64 image (docker/Dockerfile) with podman and run it the way docker/compose.yaml runs a
container, for everything that applies off a Jetson.

Skipped, with the reason, where podman cannot build and run (no podman, no runc, no mmdebstrap and no
cached base); with ``REQUIRE_CONTAINER=1`` (``.ci/run`` as root) those tests FAIL instead.

- The base: Docker Hub (``python:3.11-slim-trixie``) is not reachable from the CI machines, so the base
  is made locally with mmdebstrap (Debian bookworm, Python 3.11) and imported into podman's store under
  a tag that contains the sha256 of the recipe: built once per machine, reused afterwards. The image
  gets it through the Dockerfile's ``PYTHON_IMAGE`` build argument.
- The image: built from a clean copy of the tracked files (as a fresh clone would have them), with the
  flags this machine type needs (``PODMAN_BUILD_FLAGS`` below; docker/README.md). podman's layer cache
  makes a rebuild of unchanged sources quick.
- The container: read-only root, tmpfs ``/tmp``, the token from a secret file
  (``RETINAEDGE_API_TOKEN_FILE``), both named volumes, the port published on 127.0.0.1 only.

The host-side test of the exit status after SIGTERM (``test_serve_sigterm_exits_0``) needs no podman.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from support.paths import DEMO, REPO_ROOT
from support.polling import poll

STUDY = REPO_ROOT / "examples" / "study_01"
J2K = REPO_ROOT / "examples" / "compressed" / "study_01_IM0016_J2K.dcm"
TOKEN = "container-test-token-0123456789"
REQUIRED = os.environ.get("REQUIRE_CONTAINER") == "1"

CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# The base image: Debian bookworm's Python 3.11, pip and venv, without manual pages, translations and
# documentation (the copyright files stay): 50 MB less than the plain recipe. The tag carries the recipe's hash, so a
# changed recipe makes (and caches) another base.
BASE_RECIPE = [
    "mmdebstrap",
    "--variant=minbase",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates",
    "bookworm",
]
BASE_TAG = "localhost/retinaedge-base:" + hashlib.sha256(" ".join(BASE_RECIPE).encode()).hexdigest()[:24]
IMAGE = "localhost/retinaedge:container-test"
# The OCI runtime: crun fails on this machine type's hybrid cgroups.
RUNTIME = ["--runtime", "runc"]
# --format docker keeps the HEALTHCHECK (podman drops it from OCI images); host network and chroot
# isolation for the build steps; the machine's CA bundle, without which the package indexes are not
# reachable from the build.
PODMAN_BUILD_FLAGS = [
    "--format",
    "docker",
    "--network",
    "host",
    "--isolation",
    "chroot",
    "-v",
    f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
]
STOP_GRACE_S = 45  # compose.yaml's stop_grace_period

pytestmark = pytest.mark.slow
container = pytest.mark.container  # every test but the host-side one

FIGURES: dict[str, object] = {}  # timings and sizes, written to $RETINAEDGE_CONTAINER_FIGURES if set


def _run(
    cmd: list[str], timeout: float, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd[:4])} ... exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["podman", *args], timeout=timeout, check=check)


def _unusable_reason() -> str | None:
    """Why podman cannot build and run the image here, or None."""
    if os.geteuid() != 0:
        # Rootless podman is set up differently on every machine (subuids, storage, networking); the
        # test is written for, and required on, the CI machines' rootful podman.
        return "needs root (rootful podman; rootless podman is not covered)"
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install podman runc mmdebstrap; see docker/README.md)"
    try:
        info = subprocess.run(["podman", *RUNTIME, "info"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman info failed: {exc}"
    if info.returncode != 0:
        return f"podman info failed: {info.stderr.strip()[-300:]}"
    exists = subprocess.run(["podman", "image", "exists", BASE_TAG], capture_output=True, timeout=60)
    if exists.returncode != 0:
        if shutil.which("mmdebstrap") is None:
            return f"mmdebstrap is not installed and the base {BASE_TAG} is not in podman's store"
    if not Path(CA_BUNDLE).is_file():
        return f"no CA bundle at {CA_BUNDLE} for the build"
    return None


@pytest.fixture(scope="module")
def usable() -> None:
    reason = _unusable_reason()
    if reason is None:
        return
    if REQUIRED:
        pytest.fail(f"REQUIRE_CONTAINER=1 but podman cannot build and run the image: {reason}")
    pytest.skip(f"podman cannot build and run the image: {reason}")


def ensure_base() -> str:
    """The base image, made once per machine (mmdebstrap + podman import) and kept in podman's store."""
    if podman("image", "exists", BASE_TAG, check=False).returncode == 0:
        FIGURES["base_build_s"] = "cached"
        return BASE_TAG
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="retinaedge-base-") as tmp:
        tar = Path(tmp) / "base.tar"
        _run([*BASE_RECIPE, str(tar)], timeout=900)
        podman("import", str(tar), BASE_TAG, timeout=300)
    FIGURES["base_build_s"] = round(time.monotonic() - start, 1)
    return BASE_TAG


def tracked_copy(dest: Path) -> Path:
    """The tracked files as they are in the working tree (a fresh clone's content plus uncommitted edits
    of tracked files; untracked files stay out)."""
    listing = _run(["git", "ls-files", "-z"], timeout=60, cwd=REPO_ROOT).stdout
    for name in listing.split("\0"):
        source = REPO_ROOT / name
        if not name or not source.is_file():  # deleted in the working tree
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return dest


@pytest.fixture(scope="module")
def image(usable: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = ensure_base()
    context = tracked_copy(tmp_path_factory.mktemp("container-context"))
    start = time.monotonic()
    podman(
        "build",
        *PODMAN_BUILD_FLAGS,
        "--build-arg",
        f"PYTHON_IMAGE={base}",
        "-f",
        "docker/Dockerfile",
        "-t",
        IMAGE,
        str(context),
        timeout=1200,
    )
    FIGURES["image_build_s"] = round(time.monotonic() - start, 1)
    FIGURES["image_bytes"] = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
    FIGURES["base_bytes"] = int(podman("image", "inspect", "--format", "{{.Size}}", base).stdout.strip())
    yield IMAGE
    out = os.environ.get("RETINAEDGE_CONTAINER_FIGURES")
    if out:
        Path(out).write_text(json.dumps(FIGURES, indent=2) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Container:
    name: str
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> dict[str, object]:
        out = podman("inspect", "--format", "{{json .State}}", self.name).stdout
        return dict(json.loads(out))

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return (result.stdout + result.stderr)[-4000:]

    def wait_healthy(self, timeout: float = 120) -> None:
        """Bounded: `podman healthcheck run` (the image's HEALTHCHECK) until it passes."""

        def healthy() -> bool:
            if not self.state().get("Running"):
                pytest.fail(f"{self.name} is not running: {self.state()}\n{self.logs()}")
            return podman("healthcheck", "run", self.name, check=False, timeout=30).returncode == 0

        if not poll(healthy, timeout=timeout, interval=0.5):
            pytest.fail(f"{self.name} not healthy within {timeout} s:\n{self.logs()}")


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def run_args(
    name: str, port: int, secret: Path, volumes: tuple[str, str], read_only: bool = True
) -> list[str]:
    """`podman run` as docker/compose.yaml runs the service (minus the Jetson's runtime and L4T file)."""
    args = [*RUNTIME, "run", "-d", "--name", name]
    if read_only:
        args.append("--read-only")
    return [
        *args,
        "--tmpfs",
        "/tmp:size=512m,mode=1777",
        "-e",
        "RETINAEDGE_API_TOKEN_FILE=/run/secrets/retinaedge_api_token",
        "-v",
        f"{secret}:/run/secrets/retinaedge_api_token:ro",
        "-v",
        f"{volumes[0]}:/var/lib/retinaedge",
        "-v",
        f"{volumes[1]}:/var/cache/retinaedge/engines",
        "-p",
        f"127.0.0.1:{port}:8080",
        "--stop-timeout",
        str(STOP_GRACE_S),
    ]


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("container-secret") / "api_token"
    path.write_text(TOKEN + "\n")
    # As docker/README.md says for the compose secret: readable by uid 10001 (rootless: by anyone).
    if os.geteuid() == 0:
        os.chown(path, 10001, 10001)
        path.chmod(0o400)
    else:
        path.chmod(0o444)
    return path


@contextmanager
def start(image: str, secret: Path, read_only: bool = True) -> Iterator[Container]:
    tag = uuid.uuid4().hex[:8]
    name = f"retinaedge-test-{tag}"
    volumes = (f"retinaedge-test-data-{tag}", f"retinaedge-test-engines-{tag}")
    port = free_port()
    try:
        podman(*run_args(name, port, secret, volumes, read_only), image)
        yield Container(name, port)
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
        podman("volume", "rm", "-f", *volumes, check=False)


@pytest.fixture(scope="module")
def service(image: str, secret: Path) -> Iterator[Container]:
    """The compose-like container, healthy."""
    with start(image, secret) as c:
        t0 = time.monotonic()
        c.wait_healthy()
        FIGURES["healthy_after_s"] = round(time.monotonic() - t0, 1)
        yield c


def multipart(parts: list[bytes], boundary: str) -> bytes:
    chunks = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part, b"\r\n"]
    return b"".join([*chunks, f"--{boundary}--\r\n".encode()])


def stow(c: Container, parts: list[bytes], timeout: float = 120) -> list[str]:
    """STOW-RS of the instances ``parts``; the acknowledged SOP Instance UIDs (ReferencedSOPSequence)."""
    boundary = "retinaedge-" + uuid.uuid4().hex
    response = httpx.post(
        f"{c.base}/dicomweb/studies",
        content=multipart(parts, boundary),
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', **AUTH},
        timeout=timeout,
    )
    assert response.status_code == 200, response.text[:2000]
    return [item["00081155"]["Value"][0] for item in response.json()["00081199"]["Value"]]


def renumbered(path: Path, series_uid: str) -> tuple[str, bytes]:
    """The instance at ``path`` as a new instance of the series ``series_uid``: (its UID, its bytes)."""
    ds = dcmread(path)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SeriesInstanceUID = series_uid
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return uid, buf.getvalue()


def wait_results(c: Container, uids: list[str], timeout: float = 180) -> dict[str, dict[str, object]]:
    """Bounded: GET /v1/results/{uid} until none is pending."""
    results: dict[str, dict[str, object]] = {}

    def all_done() -> bool:
        for uid in [u for u in uids if u not in results]:
            r = httpx.get(f"{c.base}/v1/results/{uid}", headers=AUTH, timeout=30)
            assert r.status_code in (200, 202), (uid, r.status_code, r.text[:500])
            if r.status_code == 200:
                results[uid] = r.json()
        return len(results) == len(uids)

    poll(all_done, timeout=timeout, interval=0.5)
    missing = sorted(set(uids) - set(results))
    assert not missing, f"{len(missing)} result(s) still pending after {timeout} s:\n{c.logs()}"
    return results


@container
def test_image_size(image: str) -> None:
    """The figures of the build (and the image is there); the components are measured in the README."""
    assert FIGURES["image_bytes"] > FIGURES["base_bytes"]  # type: ignore[operator]
    listing = podman(*RUNTIME, "run", "--rm", "--entrypoint", "/opt/venv/bin/python", image, "-c",
                     "import importlib.util as u; print(u.find_spec('torch') is None)").stdout  # fmt: skip
    assert listing.strip() == "True"


@container
def test_image_has_the_working_tree_code(image: str) -> None:
    """The installed package is this source, not a layer cached from an earlier build (podman does not
    key a RUN's cache on the content of a bind mount from another stage; see docker/Dockerfile)."""
    script = (
        "import hashlib, json, pathlib, retinaedge.service as s; root = pathlib.Path(s.__file__).parents[1]; "
        "print(json.dumps({str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() "
        "for p in sorted(root.rglob('*.py'))}))"
    )
    out = podman(*RUNTIME, "run", "--rm", "--entrypoint", "/opt/venv/bin/python", image, "-c", script).stdout
    installed = json.loads(out.splitlines()[-1])
    packages = {"export": "export", "runtime": "runtime", "device": "device", "service": "service"}
    local = {
        f"{name}/{p.relative_to(REPO_ROOT / src)}": hashlib.sha256(p.read_bytes()).hexdigest()
        for name, src in packages.items()
        for p in sorted((REPO_ROOT / src).rglob("*.py"))
        if "__pycache__" not in p.parts
    }
    assert {k: installed.get(k) for k in local} == local


@container
def test_healthy_and_the_token(service: Container) -> None:
    assert podman("healthcheck", "run", service.name, check=False).returncode == 0
    assert httpx.get(f"{service.base}/readyz", timeout=10).status_code == 401
    ready = httpx.get(f"{service.base}/readyz", headers=AUTH, timeout=10)
    assert ready.status_code == 200, ready.text
    assert httpx.get(f"{service.base}/healthz", timeout=10).status_code == 200
    inspect = json.loads(podman("inspect", service.name).stdout)[0]
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True
    assert inspect["Config"]["User"] == "10001:10001"
    bindings = inspect["HostConfig"]["PortBindings"]["8080/tcp"]
    assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]


@container
def test_stow_study_gives_a_result_per_instance(service: Container) -> None:
    paths = sorted(STUDY.glob("*.dcm"))
    assert len(paths) == 27
    uids = stow(service, [p.read_bytes() for p in paths])
    assert sorted(uids) == sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths)
    results = wait_results(service, uids)
    assert all(r["state"] == "done" for r in results.values()), results


def host_detections(path: Path, cwd: Path) -> list[dict[str, object]]:
    out = _run(
        [sys.executable, "-m", "retinaedge.runtime.cli", "detect", "--model", str(DEMO), str(path)],
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("RETINAEDGE_")},
        cwd=cwd,
    ).stdout
    (line,) = out.splitlines()
    return list(json.loads(line)["frames"])


def assert_same_detections(got: list[dict[str, object]], want: list[dict[str, object]]) -> None:
    assert len(got) == len(want)
    for frame_got, frame_want in zip(got, want, strict=True):

        def key(d: dict[str, object]) -> tuple[object, ...]:
            return (d["class_id"], -float(d["score"]))  # type: ignore[arg-type]

        a = sorted(frame_got["detections"], key=key)  # type: ignore[arg-type]
        b = sorted(frame_want["detections"], key=key)  # type: ignore[arg-type]
        assert [d["label"] for d in a] == [d["label"] for d in b]
        for x, y in zip(a, b, strict=True):
            assert abs(x["score"] - y["score"]) <= 1e-4, (x, y)
            # Boxes are rounded to 3 decimals in the JSON: allow the one rounding step.
            assert all(abs(p - q) <= 1e-3 + 1e-9 for p, q in zip(x["box"], y["box"], strict=True)), (x, y)


@container
def test_detect_j2k_matches_the_host(service: Container, tmp_path: Path) -> None:
    response = httpx.post(
        f"{service.base}/v1/detect",
        content=J2K.read_bytes(),
        headers={"Content-Type": "application/dicom", **AUTH},
        timeout=120,
    )
    assert response.status_code == 200, response.text[:2000]
    frames = response.json()["frames"]
    assert any(frame["detections"] for frame in frames)
    assert_same_detections(frames, host_detections(J2K, tmp_path))


@container
def test_kill_during_stow_then_start(service: Container) -> None:
    """SIGKILL while STOW-RS requests stream in; after `podman start` every acknowledged instance has
    exactly one result (done: not pending, not failed), and so does every instance that was stored."""
    paths = sorted(STUDY.glob("*.dcm"))
    # Several instances per request: the kill, right after an acknowledgement, then finds some of them
    # still queued for inference, and the restart has to pick them up from the spool.
    PER_REQUEST = 4  # noqa: N806
    series_uid = generate_uid()  # new instances of a new series: nothing here was processed before
    acknowledged: list[str] = []
    sent: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def sender() -> None:
        try:
            for i in range(100):  # PER_REQUEST instances per request; bounded
                if stop.is_set():
                    return
                batch = [
                    renumbered(paths[(i * PER_REQUEST + k) % len(paths)], series_uid)
                    for k in range(PER_REQUEST)
                ]
                sent.extend(uid for uid, _ in batch)
                acknowledged.extend(stow(service, [body for _, body in batch], timeout=30))
        except (httpx.HTTPError, AssertionError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    poll(lambda: len(acknowledged) >= 2 * PER_REQUEST or not thread.is_alive(), timeout=60, interval=0.005)
    assert len(acknowledged) >= 2 * PER_REQUEST, (errors, service.logs())
    before = httpx.get(f"{service.base}/v1/series/{series_uid}", headers=AUTH, timeout=30).json()
    podman("kill", "-s", "KILL", service.name)
    stop.set()
    FIGURES["kill_pending_before_kill"] = before["instances"]["pending"]
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert errors, "the stream was not cut by the kill"
    acked = list(acknowledged)
    assert len(set(acked)) == len(acked) and set(acked) <= set(sent)
    t0 = time.monotonic()
    podman("start", service.name)
    service.wait_healthy()
    FIGURES["healthy_after_kill_s"] = round(time.monotonic() - t0, 1)
    first = httpx.get(f"{service.base}/v1/series/{series_uid}", headers=AUTH, timeout=30).json()
    FIGURES["kill_acknowledged"] = len(acked)
    FIGURES["kill_pending_after_start"] = first["instances"]["pending"]
    results = wait_results(service, acked)
    assert all(r["state"] == "done" for r in results.values()), results
    assert {r["sop_instance_uid"] for r in results.values()} == set(acked)

    # Nothing pending or failed in the series after the restart; besides the acknowledged instances at
    # most those of the one request in flight, none twice.
    def series_counts() -> dict[str, int]:
        body = httpx.get(f"{service.base}/v1/series/{series_uid}", headers=AUTH, timeout=30).json()
        return dict(body["instances"])

    counts = poll(series_counts, lambda counts: counts["pending"] == 0, timeout=120, interval=0.5)
    assert counts["pending"] == 0 and counts["failed"] == 0, counts
    assert len(acked) <= counts["received"] == counts["done"] <= len(acked) + PER_REQUEST, (
        counts,
        len(acked),
    )


@container
def test_sigterm_exits_0_within_the_grace_period(service: Container) -> None:
    t0 = time.monotonic()
    podman("stop", "-t", str(STOP_GRACE_S), service.name, timeout=STOP_GRACE_S + 30)
    took = time.monotonic() - t0
    FIGURES["stop_s"] = round(took, 1)
    state = service.state()
    assert state["ExitCode"] == 0, (state, service.logs())
    assert took < STOP_GRACE_S
    assert "Application shutdown complete" in service.logs()


@container
def test_misspelt_variable_exits_78(image: str, secret: Path) -> None:
    result = podman(
        *RUNTIME, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "-e", "RETINAEDGE_MODLE=x",
        "-e", "RETINAEDGE_API_TOKEN_FILE=/run/secrets/retinaedge_api_token",
        "-v", f"{secret}:/run/secrets/retinaedge_api_token:ro", image,
        check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 78, (result.stdout, result.stderr[-2000:])
    (line,) = result.stdout.splitlines()
    assert "RETINAEDGE_MODLE" in json.loads(line)["error"]["message"]
    refused = [ln for ln in result.stderr.splitlines() if "configuration refused" in ln]
    assert len(refused) == 1 and "RETINAEDGE_MODLE" in refused[0], result.stderr


@container
def test_writes_nothing_outside_tmp_and_the_volumes(image: str, secret: Path) -> None:
    """A writable root this time: `podman diff` lists what the service wrote into the image's filesystem."""
    with start(image, secret, read_only=False) as c:
        c.wait_healthy()
        uids = stow(c, [p.read_bytes() for p in sorted(STUDY.glob("*.dcm"))[:3]])
        wait_results(c, uids)
        r = httpx.post(
            f"{c.base}/v1/detect",
            content=J2K.read_bytes(),
            headers={"Content-Type": "application/dicom", **AUTH},
            timeout=120,
        )
        assert r.status_code == 200
        for uid in uids:  # the DICOM SR too (highdicom)
            sr = httpx.get(f"{c.base}/v1/results/{uid}", headers={**AUTH, "Accept": "application/dicom"})
            assert sr.status_code == 200
        podman("stop", "-t", str(STOP_GRACE_S), c.name, timeout=STOP_GRACE_S + 30)
        assert c.state()["ExitCode"] == 0
        changes = podman("diff", "--format", "json", c.name).stdout
        changed = {path for paths in json.loads(changes or "{}").values() for path in paths or []}
        # The mount points podman itself creates for a container (the secret's target, /run/.containerenv
        # and the directories above them) are not writes of the service.
        podman_made = {"/run", "/run/secrets", "/run/secrets/retinaedge_api_token", "/run/.containerenv",
                       "/etc", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/tmp"}  # fmt: skip
        allowed = ("/tmp/", "/var/lib/retinaedge", "/var/cache/retinaedge")
        stray = sorted(p for p in changed - podman_made if not p.startswith(allowed))
        assert not stray, stray


def test_serve_sigterm_exits_0(tmp_path: Path) -> None:
    """Host side, no podman: `retinaedge serve` stopped by SIGTERM exits 0 after its graceful shutdown
    (uvicorn re-raises the SIGTERM it caught; the image's tini would turn that into status 143)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAEDGE_")}
    env.update(RETINAEDGE_DATA_DIR=str(tmp_path / "data"), RETINAEDGE_BACKEND="onnxruntime")
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "retinaedge.runtime.cli", "serve", "--model", str(DEMO),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )  # fmt: skip
    try:

        def ready() -> bool | None:
            if proc.poll() is not None:
                return None  # exited: the assertion below shows its log
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        up = poll(ready, lambda up: up is not False, timeout=120, interval=0.2)
        assert up, log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=STOP_GRACE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "Application shutdown complete" in text
