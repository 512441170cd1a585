"""Install the runtime the way the images do and serve the demo bundle: catches a missing runtime
dependency without a Docker engine.

The steps are the images' own: a wheel built from the repository's tracked files (``pip wheel --no-deps``),
then docker/install-runtime.sh into a fresh virtual environment (binary wheels only, no extras, and it
fails if torch got in). The environment is then used for real: ``retinaedge --help``, the service on the
demo bundle (``boot``, the images' CMD, once the installed package has that verb; ``serve`` until then), the
image's healthcheck script against it, one example DICOM through ``POST /v1/detect``, and SIGTERM.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.paths import DEMO, REPO_ROOT
from support.servers import free_port, wait_ready

EXAMPLE = REPO_ROOT / "examples" / "study_01" / "IM0015.dcm"  # a glioma and a meningioma (examples/README.md)
TOKEN = "wheel-test-token-0123456789"

pytestmark = pytest.mark.slow


def tracked_copy(dest: Path) -> Path:
    """The repository's tracked files (as they are in the working tree), so untracked files stay out."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout: {exc}")
    for name in listing.decode().split("\0"):
        if not name:
            continue
        source = REPO_ROOT / name
        if not source.is_file():  # deleted in the working tree
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return dest


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without RETINAEDGE_* (and without the test venv's activation)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAEDGE_") and k != "VIRTUAL_ENV"}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """docker/install-runtime.sh into a fresh venv, from a wheel of the tracked files."""
    tmp = tmp_path_factory.mktemp("wheel-install")
    src = tracked_copy(tmp / "src")
    wheels = tmp / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(src)],
        check=True,
        timeout=600,
    )
    assert [p.name.split("-")[0] for p in wheels.glob("*.whl")] == ["retinaedge"]
    target = tmp / "venv"
    result = subprocess.run(
        ["sh", str(REPO_ROOT / "docker" / "install-runtime.sh"), str(wheels), str(target)],
        env=clean_env(PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    yield target


def test_no_torch_and_no_extras(venv: Path) -> None:
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=clean_env())
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    )
    installed = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert "retinaedge" in installed and "onnxruntime" in installed
    assert not installed & {"torch", "torchvision", "tensorrt", "pycuda", "pytest"}


@functools.cache
def installed_verbs(venv: Path) -> tuple[str, ...]:
    """The verbs of the retinaedge installed in ``venv`` (asked once per venv: three tests need them)."""
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import json; from retinaedge.runtime.cli import VERBS; print(json.dumps(list(VERBS)))",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    ).stdout
    return tuple(json.loads(out))


def run_all(commands: list[tuple[list[str], dict[str, str]]]) -> list[subprocess.CompletedProcess[str]]:
    """Run the ``(argv, env)`` commands at the same time (each a new interpreter that spends about a second
    importing); their results in the same order."""
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv, env in commands
    ]
    results = []
    try:
        for (argv, _), proc in zip(commands, procs, strict=True):
            out, err = proc.communicate(timeout=120)
            results.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()  # a no-op for a process that has exited
            proc.wait(30)
    return results


def test_help_lists_the_verbs(venv: Path) -> None:
    verbs = installed_verbs(venv)
    assert {"export", "build", "detect", "serve", "benchmark", "device"} <= set(verbs)
    # The verbs the image's users call most (CMD boot when it exists, serve, detect, device).
    main_verbs = [v for v in ("boot", "serve", "detect", "device") if v in verbs]
    retinaedge = str(venv / "bin" / "retinaedge")
    result, *subs = run_all(
        [([retinaedge, "--help"], clean_env())]
        + [([retinaedge, v, "--help"], clean_env()) for v in main_verbs]
    )
    assert result.returncode == 0, result.stderr
    for verb in verbs:
        assert verb in result.stdout, verb
    for verb, sub in zip(main_verbs, subs, strict=True):
        assert sub.returncode == 0 and "usage:" in sub.stdout, (verb, sub.stderr)


def test_serves_the_demo_bundle(venv: Path, tmp_path: Path) -> None:
    port = free_port()
    secret = tmp_path / "api_token"
    secret.write_text(TOKEN + "\n")
    env = clean_env(
        RETINAEDGE_DATA_DIR=str(tmp_path / "data"),
        RETINAEDGE_ENGINE_CACHE_DIR=str(tmp_path / "engines"),
        RETINAEDGE_BACKEND="onnxruntime",
        PYTHONDONTWRITEBYTECODE="1",
    )
    if "boot" in installed_verbs(venv):
        # As the image runs it: everything from the environment, the token from a secret file.
        command = [str(venv / "bin" / "retinaedge"), "boot"]
        env.update(
            RETINAEDGE_MODEL=str(DEMO),
            RETINAEDGE_HOST="127.0.0.1",
            RETINAEDGE_PORT=str(port),
            RETINAEDGE_API_TOKEN_FILE=str(secret),
        )
    else:
        command = [str(venv / "bin" / "retinaedge"), "serve", "--model", str(DEMO), "--port", str(port)]
        env["RETINAEDGE_API_TOKEN"] = TOKEN
    log_path = tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_ready(proc, base, headers=auth, log_path=log_path)

        # The image's HEALTHCHECK command, run with the venv's Python as in the image.
        def healthcheck(**extra: str) -> subprocess.CompletedProcess[str]:
            hc_env = clean_env(RETINAEDGE_HOST="0.0.0.0", RETINAEDGE_PORT=str(port), **extra)
            return subprocess.run(
                [str(venv / "bin" / "python"), str(REPO_ROOT / "docker" / "healthcheck.py")],
                env=hc_env,
                capture_output=True,
                text=True,
                timeout=30,
            )

        ok = healthcheck(RETINAEDGE_API_TOKEN_FILE=str(secret))
        assert ok.returncode == 0 and "readyz 200" in ok.stdout, ok
        assert healthcheck().returncode == 1  # no token: 401
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-token-at-all-000")
        assert healthcheck(RETINAEDGE_API_TOKEN_FILE=str(wrong)).returncode == 1

        body = EXAMPLE.read_bytes()
        unauthorised = httpx.post(
            f"{base}/v1/detect", content=body, headers={"Content-Type": "application/dicom"}, timeout=60
        )
        assert unauthorised.status_code == 401
        response = httpx.post(
            f"{base}/v1/detect",
            content=body,
            headers={"Content-Type": "application/dicom", **auth},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        result = response.json()
        detections = [d for frame in result["frames"] for d in frame["detections"]]
        classes = json.loads((DEMO / "manifest.json").read_text())["class_names"]
        assert detections and all(d["label"] in classes for d in detections)
        assert max(d["score"] for d in detections) >= 0.5
        assert "glioma" in {d["label"] for d in detections if d["score"] >= 0.5}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"no exit within 45 s of SIGTERM: {log_path.read_text()[-3000:]}")
    # A graceful stop: uvicorn finishes the shutdown, then re-raises the SIGTERM it caught, so the process
    # ends by that signal (-15 here; 143 from tini in the container) unless the verb exits 0 itself.
    log_text = log_path.read_text()
    assert code in (0, -signal.SIGTERM), log_text[-3000:]
    assert "Application shutdown complete" in log_text, log_text[-3000:]


def test_boot_refuses_a_bad_configuration(venv: Path, tmp_path: Path) -> None:
    """The image's entrypoint on bad configuration: exit 78 (EX_CONFIG), one JSON error line, no serving."""
    if "boot" not in installed_verbs(venv):
        pytest.skip("this retinaedge has no boot verb yet")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    base = {
        "RETINAEDGE_MODEL": str(DEMO),
        "RETINAEDGE_DATA_DIR": str(tmp_path / "data"),
        "RETINAEDGE_ENGINE_CACHE_DIR": str(tmp_path / "engines"),
        "RETINAEDGE_BACKEND": "onnxruntime",
        "RETINAEDGE_HOST": "0.0.0.0",
        "RETINAEDGE_API_TOKEN": TOKEN,
    }
    cases = {
        "misspelt variable": {"RETINAEDGE_MODLE": str(DEMO)},
        "no token beyond loopback": {"RETINAEDGE_API_TOKEN": ""},
        "missing bundle": {"RETINAEDGE_MODEL": str(tmp_path / "no-such-bundle")},
        "read-only engine cache": {"RETINAEDGE_ENGINE_CACHE_DIR": str(readonly / "engines")},
    }
    if os.geteuid() == 0:  # root writes anywhere: the read-only case cannot fail here
        del cases["read-only engine cache"]
    # The refusals at once (each fails on its own configuration, whatever the others wrote), then the good one.
    check = [str(venv / "bin" / "retinaedge"), "boot", "--check"]
    envs = [clean_env(**{**base, **change}) for change in cases.values()]
    results = run_all([(check, {k: v for k, v in env.items() if v != ""}) for env in envs])
    for case, result in zip(cases, results, strict=True):
        assert result.returncode == 78, (case, result.stdout, result.stderr[-2000:])
        (line,) = result.stdout.splitlines()
        assert "error" in json.loads(line), case
    ok = subprocess.run(
        [str(venv / "bin" / "retinaedge"), "boot", "--check"],
        env=clean_env(**base),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout.splitlines()[-1])["decision"] == "onnxruntime-configured"
