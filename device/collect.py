"""Collect a :class:`DeviceReport` from a filesystem root and a few commands.

Files are read under ``root`` (``/`` on a real device, a fake tree in tests); commands run through a
:class:`CommandRunner` with a timeout. Anything missing (file, command, permission, timeout) leaves the
corresponding field None: collecting never raises for an absent fact.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from retinaedge.device.l4t import L4TRelease, parse_nv_tegra_release
from retinaedge.device.linux import (
    CpuInfo,
    MemInfo,
    NvidiaGpu,
    parse_cpuinfo,
    parse_meminfo,
    parse_nvidia_smi,
)
from retinaedge.device.module import ModuleInfo, identify_module, parse_compatible, parse_device_tree_model
from retinaedge.device.power import ClockState, PowerMode, parse_jetson_clocks, parse_nvpmodel
from retinaedge.device.timesync import TimeSync, time_sync

log = logging.getLogger(__name__)

#: Runs ``argv`` and returns its stdout, or None when it cannot (missing, failed, timed out).
Runner = Callable[[Sequence[str]], "str | None"]

NVIDIA_SMI_QUERY = ("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader")

#: Python distributions that carry each runtime; the first one installed gives the version.
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11"),
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
    "pycuda": ("pycuda",),
}


class CommandRunner:
    """Run a command found on ``search_path`` (``PATH`` when None) with a timeout in seconds."""

    def __init__(self, search_path: str | None = None, timeout_s: float = 5.0) -> None:
        self.search_path = search_path
        self.timeout_s = timeout_s

    def __call__(self, argv: Sequence[str]) -> str | None:
        executable = shutil.which(argv[0], path=self.search_path)
        if executable is None:
            log.debug("%s: not found", argv[0])
            return None
        try:
            proc = subprocess.run(
                [executable, *argv[1:]], capture_output=True, text=True, timeout=self.timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            log.warning("%s timed out after %.1f s", argv[0], self.timeout_s)
            return None
        except OSError as exc:
            log.warning("%s could not run: %s", argv[0], exc)
            return None
        if proc.returncode != 0:
            log.info("%s exited with %d: %s", argv[0], proc.returncode, proc.stderr.strip()[:200])
            return None
        return proc.stdout


@dataclass(frozen=True)
class JetsonInfo:
    """Jetson-specific facts: L4T/JetPack, module, power mode and clock state."""

    l4t: L4TRelease | None
    module: ModuleInfo | None
    power_mode: PowerMode | None
    clocks: ClockState | None


@dataclass(frozen=True)
class SoftwareVersions:
    """Versions of the inference stack; None when not installed."""

    python: str
    cuda: str | None
    tensorrt: str | None
    onnxruntime: str | None
    pycuda: str | None


@dataclass(frozen=True)
class DeviceReport:
    """Everything ``retinaedge device`` reports. ``cpu_affinity`` is the CPU count this process may use."""

    root: str
    kernel: str | None
    machine: str | None
    cpu: CpuInfo | None
    cpu_affinity: int | None
    memory: MemInfo | None
    jetson: JetsonInfo | None
    nvidia_gpus: tuple[NvidiaGpu, ...]
    versions: SoftwareVersions
    #: Whether the system clock is synchronised (read-only, :mod:`.timesync`); None for another ``root``.
    time_sync: TimeSync | None = None


def _read(root: Path, relative: str) -> bytes | None:
    try:
        return (root / relative).read_bytes()
    except OSError:
        return None


def _read_text(root: Path, relative: str) -> str | None:
    data = _read(root, relative)
    return None if data is None else data.decode("utf-8", errors="replace")


def distribution_version(names: Sequence[str]) -> str | None:
    """Version of the first installed distribution among ``names`` (importlib.metadata, no import)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cuda_version(root: Path) -> str | None:
    """CUDA toolkit version from ``usr/local/cuda/version.json`` (CUDA >= 11) or ``version.txt``."""
    text = _read_text(root, "usr/local/cuda/version.json")
    if text is not None:
        try:
            version = json.loads(text).get("cuda", {}).get("version")
        except (ValueError, AttributeError):
            version = None
        if isinstance(version, str):
            return version
    text = _read_text(root, "usr/local/cuda/version.txt")
    if text is not None and text.strip():
        return text.strip().split()[-1]  # "CUDA Version 10.2.300"
    return None


def _affinity() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def collect_jetson(root: Path, runner: Runner) -> JetsonInfo | None:
    """Jetson facts, or None when ``root`` has neither ``etc/nv_tegra_release`` nor a Tegra device tree."""
    release_text = _read_text(root, "etc/nv_tegra_release")
    compatible_raw = _read(root, "proc/device-tree/compatible")
    compatible = parse_compatible(compatible_raw) if compatible_raw is not None else ()
    is_tegra = any(entry.startswith("nvidia,tegra") for entry in compatible)
    if release_text is None and not is_tegra:
        return None
    model_raw = _read(root, "proc/device-tree/model")
    model = parse_device_tree_model(model_raw) if model_raw is not None else None
    nvpmodel = runner(["nvpmodel", "-q"])
    clocks = runner(["jetson_clocks", "--show"])  # needs root; None otherwise
    return JetsonInfo(
        l4t=parse_nv_tegra_release(release_text) if release_text is not None else None,
        module=identify_module(compatible, model) if compatible or model else None,
        power_mode=parse_nvpmodel(nvpmodel) if nvpmodel is not None else None,
        clocks=parse_jetson_clocks(clocks) if clocks is not None else None,
    )


def collect(root: Path | str = "/", runner: Runner | None = None, *, timeout_s: float = 5.0) -> DeviceReport:
    """Collect the device report from ``root`` and the commands ``runner`` finds (never raises)."""
    root = Path(root)
    run = runner if runner is not None else CommandRunner(timeout_s=timeout_s)
    live = root.resolve() == Path("/")
    cpuinfo = _read_text(root, "proc/cpuinfo")
    meminfo = _read_text(root, "proc/meminfo")
    kernel = _read_text(root, "proc/sys/kernel/osrelease")
    jetson = collect_jetson(root, run)
    gpus: tuple[NvidiaGpu, ...] = ()
    if jetson is None:  # Jetson iGPUs are not nvidia-smi devices
        smi = run(list(NVIDIA_SMI_QUERY))
        gpus = parse_nvidia_smi(smi) if smi is not None else ()
    return DeviceReport(
        root=str(root),
        kernel=kernel.strip() if kernel else None,
        machine=(platform.machine() or None) if live else None,
        cpu=parse_cpuinfo(cpuinfo) if cpuinfo is not None else None,
        cpu_affinity=_affinity(),
        memory=parse_meminfo(meminfo) if meminfo is not None else None,
        jetson=jetson,
        nvidia_gpus=gpus,
        versions=SoftwareVersions(
            python=platform.python_version(),
            cuda=cuda_version(root),
            tensorrt=distribution_version(_DISTRIBUTIONS["tensorrt"]),
            onnxruntime=distribution_version(_DISTRIBUTIONS["onnxruntime"]),
            pycuda=distribution_version(_DISTRIBUTIONS["pycuda"]),
        ),
        time_sync=time_sync() if live else None,
    )
