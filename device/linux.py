"""Generic Linux facts for any machine: ``/proc/cpuinfo``, ``/proc/meminfo`` and ``nvidia-smi``."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: (CPU implementer, CPU part) from an Arm ``/proc/cpuinfo`` -> core name (Arm/NVIDIA technical
#: reference manuals, MIDR part numbers). Only the cores found on Jetson modules.
ARM_CORES: dict[tuple[str, str], str] = {
    ("0x41", "0xd07"): "Cortex-A57",
    ("0x41", "0xd42"): "Cortex-A78AE",
    ("0x4e", "0x003"): "Denver 2",
    ("0x4e", "0x004"): "Carmel",
}

_KEY_VALUE_RE = re.compile(r"^([^:\n]+?)[ \t]*:[ \t]*(.*)$", re.MULTILINE)
_MEMINFO_RE = re.compile(r"^(\w+):\s+(\d+)\s*kB", re.MULTILINE)
_MIB_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*MiB\s*$")


@dataclass(frozen=True)
class CpuInfo:
    """CPU model name (x86 ``model name``, or the Arm core from implementer/part) and logical CPU count."""

    model: str | None
    logical_cpus: int


@dataclass(frozen=True)
class MemInfo:
    """Memory in MiB (``/proc/meminfo`` reports kB = KiB)."""

    total_mb: float | None
    available_mb: float | None
    swap_total_mb: float | None


@dataclass(frozen=True)
class NvidiaGpu:
    """One discrete NVIDIA GPU as ``nvidia-smi`` lists it; memory in MiB."""

    name: str
    memory_total_mb: float | None
    driver_version: str | None


def parse_cpuinfo(text: str) -> CpuInfo:
    """``/proc/cpuinfo`` -> model name and the number of ``processor`` entries."""
    count = 0
    model: str | None = None
    implementer: str | None = None
    part: str | None = None
    for key, value in _KEY_VALUE_RE.findall(text):
        key = key.strip()
        value = value.strip()
        if key == "processor":
            count += 1
        elif key in ("model name", "Model name") and model is None and value:
            model = value
        elif key == "CPU implementer" and implementer is None:
            implementer = value.lower()
        elif key == "CPU part" and part is None:
            part = value.lower()
    if model is None and implementer is not None and part is not None:
        model = ARM_CORES.get((implementer, part), f"Arm implementer {implementer} part {part}")
    return CpuInfo(model=model, logical_cpus=count)


def parse_meminfo(text: str) -> MemInfo:
    """``/proc/meminfo`` -> total, available and swap memory in MiB."""
    values = {key: int(kb) / 1024 for key, kb in _MEMINFO_RE.findall(text)}
    return MemInfo(
        total_mb=values.get("MemTotal"),
        available_mb=values.get("MemAvailable"),
        swap_total_mb=values.get("SwapTotal"),
    )


def parse_nvidia_smi(text: str) -> tuple[NvidiaGpu, ...]:
    """``nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader`` -> GPUs.

    Each line is ``name, memory, driver`` (``NVIDIA A100-SXM4-80GB, 81920 MiB, 535.104.05``); ``[N/A]``
    fields become None.
    """
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) != 3 or not parts[0]:
            continue
        name, memory, driver = parts
        mem_match = _MIB_RE.match(memory)
        gpus.append(
            NvidiaGpu(
                name=name,
                memory_total_mb=float(mem_match.group(1)) if mem_match else None,
                driver_version=None if driver in ("", "[N/A]") else driver,
            )
        )
    return tuple(gpus)
