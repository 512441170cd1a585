"""Orthanc from Debian's packages as a real DICOM peer on 127.0.0.1 (a PACS, or a scanner), for tests.

Nothing on the system changes: ``apt-get download`` fetches ``orthanc`` and ``orthanc-dicomweb`` and the
libraries they depend on that are not installed (``apt-cache depends --recurse``, checked against
``dpkg-query``) into a temporary directory, ``dpkg -x`` unpacks them there, and Orthanc runs as this user
with ``LD_LIBRARY_PATH`` and ``DCMDICTPATH`` pointed into that tree and a JSON configuration: its own
DICOM and HTTP ports, storage in a temporary directory, no authentication, the DICOMweb plugin loaded
from the tree, and ``DicomModalities`` naming the peers it may send to.

:func:`install` returns the tree or the reason it cannot be had (no apt, no package lists, no network);
the ``orthanc_tree`` fixture (``tests/conftest.py``) skips with that reason, or fails when
``REQUIRE_DICOM_PEERS=1`` (``.ci/run`` sets it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.polling import poll

PACKAGES = ("orthanc", "orthanc-dicomweb")
ARCH_LIB = "usr/lib/x86_64-linux-gnu"


def _installed(package: str) -> bool:
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    )
    return r.returncode == 0 and r.stdout.strip().endswith("install ok installed")


def missing_packages(packages: tuple[str, ...]) -> list[str]:
    """``packages`` and the libraries they need (recursively) that this system lacks."""
    r = subprocess.run(
        [
            "apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
            "--no-breaks", "--no-replaces", "--no-enhances", "--no-pre-depends", *packages,
        ],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    names = {line.strip() for line in r.stdout.splitlines() if line and not line[0].isspace()}
    libraries = sorted(n for n in names if n.startswith("lib") and "<" not in n)
    return [*packages, *(n for n in libraries if not _installed(n))]


def install(root: Path) -> Path | str:
    """Download and unpack Orthanc under ``root``; the tree, or why it cannot be done."""
    for tool in ("apt-get", "apt-cache", "dpkg", "dpkg-query"):
        if shutil.which(tool) is None:
            return f"{tool} not found: Orthanc is installed from Debian's packages"
    debs, tree = root / "debs", root / "tree"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        wanted = missing_packages(PACKAGES)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"apt-cache cannot resolve {' '.join(PACKAGES)} (run apt-get update?): {exc}"
    r = subprocess.run(
        ["apt-get", "download", "-q", *wanted], cwd=debs, capture_output=True, text=True, timeout=300
    )
    if r.returncode != 0:
        return f"apt-get download {' '.join(wanted)} failed: {r.stderr.strip()[-500:]}"
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(tree)], check=True, timeout=120)
    binary = tree / "usr/sbin/Orthanc"
    check = subprocess.run([binary, "--version"], env=_env(tree), capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        return f"the unpacked Orthanc does not run: {check.stderr.strip()[-500:]}"
    return tree


def _env(tree: Path) -> dict[str, str]:
    env = {"LD_LIBRARY_PATH": str(tree / ARCH_LIB), "PATH": "/usr/bin:/bin"}
    dictionary = tree / "usr/share/libdcmtk17/dicom.dic"
    if dictionary.exists():  # else the system's DCMTK (libdcmtk17 installed) has its own
        env["DCMDICTPATH"] = str(dictionary)
    return env


@dataclass
class Orthanc:
    """One Orthanc process: ``start()``, ``stop()``, and a few REST calls (httpx)."""

    tree: Path
    workdir: Path
    aet: str = "ORTHANC"
    modalities: dict[str, list[Any]] = field(default_factory=dict)
    #: HTTP users (name -> password); none: no authentication. The REST calls here use the first.
    users: dict[str, str] = field(default_factory=dict)
    #: More configuration options (DICOM TLS, say), over the defaults below.
    extra: dict[str, Any] = field(default_factory=dict)
    dicom_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        from support.servers import free_port

        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        storage = self.workdir / "storage"
        return {
            "Name": self.aet,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "HttpServerEnabled": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomModalities": self.modalities,
            "Plugins": [str(self.tree / "usr/share/orthanc/plugins/libOrthancDicomWeb.so")],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
            "StableAge": 1,
            **self.extra,
        }

    def start(self, timeout: float = 30.0) -> Orthanc:
        import httpx

        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=1))
        with open(self.workdir / "orthanc.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.tree / "usr/sbin/Orthanc"), str(path)],
                env=_env(self.tree),
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"Orthanc exited with {proc.returncode}: {self.log()[-2000:]}")
            try:
                return httpx.get(f"{self.url}/system", auth=self._auth(), timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        if poll(answers, timeout=timeout, interval=0.1):
            return self
        self.stop()
        raise AssertionError(f"Orthanc did not answer within {timeout} s: {self.log()[-2000:]}")

    def stop(self) -> None:
        """Kill it (a graceful stop takes Orthanc seconds; its storage is a test's temporary directory)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None

    def log(self) -> str:
        path = self.workdir / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _auth(self) -> tuple[str, str] | None:
        return next(iter(self.users.items()), None)

    def get(self, path: str) -> Any:
        import httpx

        r = httpx.get(f"{self.url}{path}", auth=self._auth(), timeout=30)
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("content-type", "") else r.content

    def instances(self) -> list[str]:
        """The Orthanc ids of every instance it holds."""
        return list(self.get("/instances"))

    def instance_file(self, orthanc_id: str) -> bytes:
        return bytes(self.get(f"/instances/{orthanc_id}/file"))

    def origin(self, orthanc_id: str) -> str:
        """How the instance arrived (metadata ``Origin``: ``DicomProtocol``, ``RestApi``, ``Plugins``)."""
        return bytes(self.get(f"/instances/{orthanc_id}/metadata/Origin")).decode()
