"""Power mode (``nvpmodel -q``) and clock state (``jetson_clocks --show``).

``nvpmodel -q`` prints the mode name and, on the next line, its id (warnings may come first)::

    NVPM WARN: fan mode is not set!
    NV Power Mode: MAXN
    0

``jetson_clocks --show`` prints one line per CPU and one for the GPU and the EMC, frequencies in kHz for
CPUs and Hz for GPU/EMC, for example::

    cpu0: Online=1 Governor=schedutil MinFreq=729600 MaxFreq=1510400 CurrentFreq=1510400 IdleStates: ...
    GPU MinFreq=306000000 MaxFreq=624750000 CurrentFreq=306000000
    EMC MinFreq=204000000 MaxFreq=2133000000 CurrentFreq=2133000000 FreqOverride=1

``jetson_clocks`` (without ``--show``) pins each clock by raising its minimum to its maximum, so the
clocks count as *pinned* when every online CPU and the GPU have MinFreq == MaxFreq. All frequencies in
the results are in MHz.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_MODE_RE = re.compile(r"^\s*NV Power Mode\s*:\s*(.+?)\s*$", re.MULTILINE)
_KV_RE = re.compile(r"(\w+)=(\S+)")
_CPU_LINE_RE = re.compile(r"^\s*cpu(\d+)\s*:(.*)$", re.MULTILINE)
_DOMAIN_LINE_RE = re.compile(r"^\s*(GPU|EMC)\s+(.*)$", re.MULTILINE)
_HEADER_RE = re.compile(r"SOC family\s*:\s*(\S+)\s+Machine\s*:\s*(.+?)\s*$", re.MULTILINE)
_TPC_RE = re.compile(r"^\s*Active GPU TPCs\s*:\s*(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class PowerMode:
    """An nvpmodel power mode: its name ("MAXN", "15W", "MAXN_SUPER") and numeric id (None if absent)."""

    name: str
    id: int | None


@dataclass(frozen=True)
class CpuClock:
    """One CPU core's DVFS state; frequencies in MHz, ``online`` None when the line does not say."""

    cpu: int
    online: bool | None
    governor: str | None
    min_mhz: float | None
    max_mhz: float | None
    current_mhz: float | None


@dataclass(frozen=True)
class ClockRange:
    """GPU or EMC clock range in MHz."""

    min_mhz: float | None
    max_mhz: float | None
    current_mhz: float | None


@dataclass(frozen=True)
class ClockState:
    """What ``jetson_clocks --show`` reports; ``pinned`` None when it shows no CPU or GPU range."""

    soc_family: str | None
    machine: str | None
    cpus: tuple[CpuClock, ...]
    gpu: ClockRange | None
    emc: ClockRange | None
    emc_override: bool | None
    active_gpu_tpcs: int | None
    power_mode: str | None
    pinned: bool | None


def parse_nvpmodel(text: str) -> PowerMode | None:
    """``nvpmodel -q`` output -> :class:`PowerMode`; None when it names no mode."""
    match = _MODE_RE.search(text)
    if match is None:
        return None
    mode_id: int | None = None
    for line in text[match.end() :].splitlines():
        line = line.strip()
        if not line:
            continue
        if line.isdigit():
            mode_id = int(line)
        break
    return PowerMode(name=match.group(1), id=mode_id)


def _mhz(value: str | None, scale: float) -> float | None:
    if value is None:
        return None
    try:
        return int(value) / scale
    except ValueError:
        return None


def _governor(fields: dict[str, str]) -> str | None:
    # L4T 28 prints the key misspelt as "Gonvernor".
    return fields.get("Governor") or fields.get("Gonvernor")


def _is_pinned(cpus: tuple[CpuClock, ...], gpu: ClockRange | None) -> bool | None:
    ranges = [(c.min_mhz, c.max_mhz) for c in cpus if c.online is not False]
    if gpu is not None:
        ranges.append((gpu.min_mhz, gpu.max_mhz))
    ranges = [(lo, hi) for lo, hi in ranges if lo is not None and hi is not None]
    if not ranges:
        return None
    return all(lo == hi for lo, hi in ranges)


def parse_jetson_clocks(text: str) -> ClockState | None:
    """``jetson_clocks --show`` output -> :class:`ClockState`; None when it shows no clocks at all."""
    cpus = []
    for match in _CPU_LINE_RE.finditer(text):
        fields = dict(_KV_RE.findall(match.group(2)))
        online = fields.get("Online")
        cpus.append(
            CpuClock(
                cpu=int(match.group(1)),
                online=None if online is None else online == "1",
                governor=_governor(fields),
                min_mhz=_mhz(fields.get("MinFreq"), 1e3),
                max_mhz=_mhz(fields.get("MaxFreq"), 1e3),
                current_mhz=_mhz(fields.get("CurrentFreq"), 1e3),
            )
        )
    cpus.sort(key=lambda c: c.cpu)
    domains: dict[str, ClockRange] = {}
    emc_override: bool | None = None
    for match in _DOMAIN_LINE_RE.finditer(text):
        fields = dict(_KV_RE.findall(match.group(2)))
        domains[match.group(1)] = ClockRange(
            min_mhz=_mhz(fields.get("MinFreq"), 1e6),
            max_mhz=_mhz(fields.get("MaxFreq"), 1e6),
            current_mhz=_mhz(fields.get("CurrentFreq"), 1e6),
        )
        if match.group(1) == "EMC" and "FreqOverride" in fields:
            emc_override = fields["FreqOverride"] == "1"
    if not cpus and not domains:
        return None
    header = _HEADER_RE.search(text)
    tpcs = _TPC_RE.search(text)
    mode = parse_nvpmodel(text)
    cpu_tuple = tuple(cpus)
    gpu = domains.get("GPU")
    return ClockState(
        soc_family=header.group(1) if header else None,
        machine=header.group(2) if header else None,
        cpus=cpu_tuple,
        gpu=gpu,
        emc=domains.get("EMC"),
        emc_override=emc_override,
        active_gpu_tpcs=int(tpcs.group(1)) if tpcs else None,
        power_mode=mode.name if mode else None,
        pinned=_is_pinned(cpu_tuple, gpu),
    )
