"""Parse one ``tegrastats`` line into a :class:`TegrastatsSample`.

The format differs per module and L4T release (see the recorded lines under
``tests/fixtures/device/tegrastats/``), so the parser looks for token shapes, never for fixed names:

- memory: ``RAM 3408/15657MB`` and ``SWAP 0/7828MB`` (MB);
- CPU cores: ``CPU [0%@960,off,50%@729]`` or the older ``CPU [17%,13%]@408`` (load %, MHz);
- GPU: ``GR3D_FREQ 71%@1300``, ``GR3D_FREQ 0%``, ``GR3D_FREQ 12%@[1300,1300]`` (one clock per GPC) and,
  on Thor, ``GR3D_FREQ @[314,314,314]`` (clocks, no load);
- memory controller: ``EMC_FREQ 2%@1866``, ``EMC_FREQ 0%``, ``EMC_FREQ @4266``;
- temperatures: any ``name@45.5C`` token (``CPU@41.4C``, ``cpu@55C``, ``tj@48.8C``, ``soc012@33.7C``);
  L4T R39 adds the peak since start, ``cpu@52.9C/53.1C``. ``-256C`` means "sensor powered off" and is
  dropped;
- power rails: any upper-case token followed by ``current/average`` in mW, with the unit
  (``VDD_IN 5469mW/5469mW``) or without (``POM_5V_IN 4520/4680``, Xavier's ``GPU 618/566``); L4T R39
  adds a third value, the peak (``VDD_GPU_SOC 5139mW/5139mW/5139mW``).

No recorded format reports thermal or power throttling, so a sample carries no throttling flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: Rails that measure the whole module's input power, by family: Orin NX/Nano, Xavier NX and TX2
#: (VDD_IN), Nano (POM_5V_IN), Thor (VIN). AGX Orin and AGX Xavier have no such rail.
INPUT_RAILS: tuple[str, ...] = ("VDD_IN", "POM_5V_IN", "VIN")

_TIMESTAMP_RE = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")
_RAM_RE = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP_RE = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU_RE = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?", re.IGNORECASE)
_CORE_RE = re.compile(r"^(\d+)%(?:@(\d+))?$")
_GR3D_RE = re.compile(r"\bGR3D_FREQ\s+(?:(\d+)%)?(?:@\[?([\d,]+)\]?)?")
_EMC_RE = re.compile(r"\bEMC_FREQ\s+(?:(\d+)%)?(?:@(\d+))?")
_TEMP_RE = re.compile(
    r"(?<![\w%@])([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C(?:/(-?\d+(?:\.\d+)?)C)?(?![\w])"
)
_RAIL_RE = re.compile(r"(?<![\w/])([A-Z][A-Z0-9_]*)\s+(\d+)(?:mW)?/(\d+)(?:mW)?(?:/(\d+)(?:mW)?)?(?![\w/])")
_SENSOR_OFF_C = -200.0


@dataclass(frozen=True)
class CpuCore:
    """One core: load in %, frequency in MHz (None when not printed), ``online`` False for ``off``."""

    load_pct: int | None
    freq_mhz: int | None
    online: bool


@dataclass(frozen=True)
class PowerRail:
    """One power rail: current and average (since tegrastats started) in mW; peak in mW where printed."""

    current_mw: int
    average_mw: int
    peak_mw: int | None = None


@dataclass(frozen=True)
class TegrastatsSample:
    """One tegrastats line. Memory in MB, loads in %, clocks in MHz, temperatures in °C, power in mW."""

    timestamp: str | None
    ram_used_mb: int | None
    ram_total_mb: int | None
    swap_used_mb: int | None
    swap_total_mb: int | None
    cpus: tuple[CpuCore, ...]
    gpu_load_pct: int | None
    gpu_freq_mhz: tuple[int, ...]
    emc_load_pct: int | None
    emc_freq_mhz: int | None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    rails: dict[str, PowerRail] = field(default_factory=dict)

    @property
    def input_power_mw(self) -> int | None:
        """Current module input power in mW from the first of :data:`INPUT_RAILS` present, else None."""
        for name in INPUT_RAILS:
            rail = self.rails.get(name)
            if rail is not None:
                return rail.current_mw
        return None


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value != "" else None


def _parse_cpus(line: str) -> tuple[CpuCore, ...]:
    match = _CPU_RE.search(line)
    if match is None:
        return ()
    shared_freq = _int(match.group(2))
    cores = []
    for entry in match.group(1).split(","):
        entry = entry.strip()
        if not entry:
            continue
        if entry.lower() == "off":
            cores.append(CpuCore(load_pct=None, freq_mhz=None, online=False))
            continue
        core = _CORE_RE.match(entry)
        if core is None:
            continue
        freq = _int(core.group(2))
        cores.append(CpuCore(load_pct=int(core.group(1)), freq_mhz=freq or shared_freq, online=True))
    return tuple(cores)


def _parse_temperatures(line: str) -> dict[str, float]:
    temps: dict[str, float] = {}
    for name, value, _peak in _TEMP_RE.findall(line):
        celsius = float(value)
        if celsius <= _SENSOR_OFF_C or name in temps:
            continue
        temps[name] = celsius
    return temps


def _parse_rails(line: str) -> dict[str, PowerRail]:
    rails: dict[str, PowerRail] = {}
    for name, current, average, peak in _RAIL_RE.findall(line):
        if name in rails:  # e.g. two unconnected "NC" channels on AGX Orin: keep the first
            continue
        rails[name] = PowerRail(current_mw=int(current), average_mw=int(average), peak_mw=_int(peak))
    return rails


def parse_tegrastats_line(line: str) -> TegrastatsSample | None:
    """Parse one line; None when it is not a tegrastats line (no ``RAM used/totalMB`` token)."""
    ram = _RAM_RE.search(line)
    if ram is None:
        return None
    swap = _SWAP_RE.search(line)
    timestamp = _TIMESTAMP_RE.match(line)
    gr3d = _GR3D_RE.search(line)
    emc = _EMC_RE.search(line)
    gpu_freqs: tuple[int, ...] = ()
    if gr3d is not None and gr3d.group(2):
        gpu_freqs = tuple(int(f) for f in gr3d.group(2).split(",") if f)
    return TegrastatsSample(
        timestamp=timestamp.group(1) if timestamp else None,
        ram_used_mb=int(ram.group(1)),
        ram_total_mb=int(ram.group(2)),
        swap_used_mb=int(swap.group(1)) if swap else None,
        swap_total_mb=int(swap.group(2)) if swap else None,
        cpus=_parse_cpus(line),
        gpu_load_pct=_int(gr3d.group(1)) if gr3d else None,
        gpu_freq_mhz=gpu_freqs,
        emc_load_pct=_int(emc.group(1)) if emc else None,
        emc_freq_mhz=_int(emc.group(2)) if emc else None,
        temperatures_c=_parse_temperatures(line),
        rails=_parse_rails(line),
    )
