"""dcmtk (echoscu, storescu ...) from Debian's packages for the tests, without changing the system.

:func:`dcmtk` runs ``apt-get download`` for ``dcmtk`` and every package of its ``Depends``/``Pre-Depends``
closure that is not installed here (on Debian bookworm: ``libdcmtk17`` and ``libwrap0``), unpacks them
with ``dpkg -x`` into a cache directory keyed by the package versions
(``$RETINAEDGE_TEST_CACHE`` or ``~/.cache/retinaedge-tests``, then ``dcmtk-<key>``; a later run with the
same versions reuses it) and returns the tools with ``LD_LIBRARY_PATH`` and ``DCMDICTPATH`` pointing
there. Where that is impossible (no apt, no package lists, no network) the calling test is skipped with
the reason, or fails when ``REQUIRE_DICOM_PEERS=1`` (``.ci/run`` sets it after ``apt-get update``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT_PACKAGE = "dcmtk"
_DEPENDS = ("Depends:", "PreDepends:")
_APT_OPTIONS = ("--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces")


@dataclass(frozen=True)
class Dcmtk:
    """The unpacked tools: ``run("echoscu", ...)`` with the environment they need."""

    root: Path
    env: dict[str, str]
    version: str

    def tool(self, name: str) -> str:
        return str(self.root / "usr" / "bin" / name)

    def run(self, name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a dcmtk tool to completion; stdout and stderr together in ``stdout``."""
        return subprocess.run(
            [self.tool(name), *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )

    def popen(self, name: str, *args: str) -> subprocess.Popen[str]:
        """Start a dcmtk tool; its log lines (stdout and stderr) readable from ``stdout`` as they come."""
        return subprocess.Popen(
            [self.tool(name), *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )


def unavailable(reason: str) -> Any:
    """Skip the test with ``reason``, or fail it when ``REQUIRE_DICOM_PEERS=1``."""
    if os.environ.get("REQUIRE_DICOM_PEERS") == "1":
        pytest.fail(f"REQUIRE_DICOM_PEERS=1 but {reason}")
    pytest.skip(reason)


def _run(*argv: str, cwd: Path | None = None, timeout: float = 300) -> str:
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed: {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


def _installed() -> set[str]:
    """Every package installed here (one ``dpkg-query``)."""
    out = _run("dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n")
    return {name for name, _, status in (ln.partition(" ") for ln in out.splitlines()) if status[:2] == "ii"}


def _dependency_groups() -> dict[str, list[list[str]]]:
    """Each package of dcmtk's closure -> its Depends/Pre-Depends as groups of alternatives (a virtual
    name followed by its providers), from one ``apt-cache depends --recurse``."""
    graph: dict[str, list[list[str]]] = {}
    groups: list[list[str]] = []
    current: list[str] = []
    last_virtual = False
    for line in _run("apt-cache", "depends", "--recurse", *_APT_OPTIONS, ROOT_PACKAGE).splitlines():
        text = line.strip()
        if not line.startswith(" "):  # a package's block starts
            groups, current, last_virtual = [], [], False
            graph[text.strip("<>")] = groups
            continue
        if line.startswith("    ") and last_virtual and groups:  # a provider of the virtual package
            groups[-1].append(text)
            continue
        alternative = text.startswith("|")
        kind, _, name = text.lstrip("|").partition(" ")
        if kind not in _DEPENDS:
            last_virtual = False
            continue
        last_virtual = name.startswith("<")
        current.append(name.strip("<>").split(":")[0])
        if not alternative:
            groups.append(current)
            current = []
    return graph


def _needed() -> list[str]:
    """``dcmtk`` and the packages of its dependency closure that are not installed here."""
    installed, graph = _installed(), _dependency_groups()
    needed, queue, seen = [], [ROOT_PACKAGE], {ROOT_PACKAGE}
    while queue:
        package = queue.pop(0)
        needed.append(package)
        for group in graph.get(package, []):
            if any(p in installed for p in group):
                continue
            pick = group[0]
            if pick not in seen:
                seen.add(pick)
                queue.append(pick)
    return needed


def _candidates(packages: list[str]) -> dict[str, str]:
    """The version apt would download of each package (one ``apt-cache policy``)."""
    versions: dict[str, str] = {}
    current = None
    for line in _run("apt-cache", "policy", *packages).splitlines():
        if not line.startswith(" ") and line.endswith(":"):
            current = line[:-1].split(":")[0]
        elif current is not None and line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                versions[current] = version
    missing = [p for p in packages if p not in versions]
    if missing:
        raise RuntimeError(f"apt knows no candidate for {', '.join(missing)} (run apt-get update)")
    return versions


def _unpack(packages: list[str], target: Path) -> None:
    """``apt-get download`` + ``dpkg -x`` into ``target`` (made atomically: a temporary sibling renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        debs = work / "debs"
        debs.mkdir()
        _run("apt-get", "download", "-q", *packages, cwd=debs)
        root = work / "root"
        for deb in sorted(debs.glob("*.deb")):
            _run("dpkg", "-x", str(deb), str(root))
        try:
            os.rename(root, target)
        except OSError:
            if not (target / "usr" / "bin" / "storescu").exists():  # else another run unpacked it first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _environment(root: Path) -> dict[str, str]:
    libs = sorted({str(p.parent) for p in (root / "usr" / "lib").rglob("libdcm*.so*")})
    dicts = sorted((root / "usr" / "share").rglob("dicom.dic"))
    if not libs or not dicts:
        raise RuntimeError(f"the unpacked dcmtk in {root} has no libraries or no dicom.dic")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    env["DCMDICTPATH"] = str(dicts[0])
    return env


@functools.cache
def _prepare() -> Dcmtk | str:
    """The tools, or why they cannot be had (cached for the session)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        return "dcmtk comes from Debian packages here and this system has no apt-get/dpkg"
    try:
        packages = _needed()
        candidates = _candidates(packages)
        versions = [f"{p}={candidates[p]}" for p in sorted(packages)]
        key = hashlib.sha256(" ".join(versions).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("RETINAEDGE_TEST_CACHE", Path.home() / ".cache" / "retinaedge-tests"))
        root = cache / f"dcmtk-{key}"
        if not (root / "usr" / "bin" / "storescu").exists():
            _unpack(packages, root)
        tools = Dcmtk(root, _environment(root), candidates[ROOT_PACKAGE])
        check = tools.run("storescu", "--version", timeout=30)
        if check.returncode != 0:
            return f"the unpacked storescu does not run: {check.stdout.strip()[-300:]}"
        return tools
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"dcmtk could not be fetched from the Debian packages: {exc}"


def dcmtk() -> Dcmtk:
    """The tools for a test (skip or, with ``REQUIRE_DICOM_PEERS=1``, fail when they cannot be had)."""
    got = _prepare()
    if isinstance(got, str):
        unavailable(got)
    assert isinstance(got, Dcmtk)
    return got
