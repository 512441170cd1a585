"""Which Jetson module this is, from the device tree (``/proc/device-tree/model`` and ``compatible``).

``model`` is one NUL-terminated string ("NVIDIA Jetson Orin Nano Developer Kit"). ``compatible`` is a
NUL-separated list, most specific first, for example::

    nvidia,p3768-0000+p3767-0005\\0nvidia,p3767-0005\\0nvidia,tegra234\\0

where ``p3768-0000`` is the carrier board, ``p3767-0005`` the module (part number) and ``tegra234`` the
SoC. A ``-super`` suffix (``p3767-0005-super``) marks the JetPack 6.2 "Super" power modes.

Module table. Source: NVIDIA Jetson module data sheets and the Jetson Linux Developer Guide's "Jetson
Module" lists (part numbers P3448, P3310, P3489, P3636, P2180, P2888, P3668, P3701, P3767, P3834),
cross-checked against jetson_stats' table of part numbers (jtop/core/jetson_variables.py).

==========  ==================================  ==========  ======================
Part        Module                              SoC         GPU architecture
==========  ==================================  ==========  ======================
p3448-0000  Jetson Nano (devkit, SD)            tegra210    Maxwell
p3448-0002  Jetson Nano (eMMC)                  tegra210    Maxwell
p3448-0003  Jetson Nano 2GB                     tegra210    Maxwell
p2180-1000  Jetson TX1                          tegra210    Maxwell
p3310-1000  Jetson TX2                          tegra186    Pascal
p3489-0000  Jetson TX2i                         tegra186    Pascal
p3489-0888  Jetson TX2 4GB                      tegra186    Pascal
p3636-0001  Jetson TX2 NX                       tegra186    Pascal
p2888-0001  Jetson AGX Xavier 16GB              tegra194    Volta
p2888-0004  Jetson AGX Xavier 32GB              tegra194    Volta
p2888-0005  Jetson AGX Xavier 64GB              tegra194    Volta
p2888-0008  Jetson AGX Xavier Industrial        tegra194    Volta
p3668-0000  Jetson Xavier NX (devkit, SD)       tegra194    Volta
p3668-0001  Jetson Xavier NX (eMMC)             tegra194    Volta
p3668-0003  Jetson Xavier NX 16GB               tegra194    Volta
p3701-0000  Jetson AGX Orin (devkit)            tegra234    Ampere
p3701-0004  Jetson AGX Orin 32GB                tegra234    Ampere
p3701-0005  Jetson AGX Orin 64GB                tegra234    Ampere
p3701-0008  Jetson AGX Orin Industrial          tegra234    Ampere
p3767-0000  Jetson Orin NX 16GB                 tegra234    Ampere
p3767-0001  Jetson Orin NX 8GB                  tegra234    Ampere
p3767-0003  Jetson Orin Nano 8GB                tegra234    Ampere
p3767-0004  Jetson Orin Nano 4GB                tegra234    Ampere
p3767-0005  Jetson Orin Nano 8GB (devkit, SD)   tegra234    Ampere
p3834-0008  Jetson AGX Thor (devkit, T5000)     tegra264    Blackwell
==========  ==================================  ==========  ======================
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Module part number -> module name (see the module docstring for the source).
MODULES: dict[str, str] = {
    "p3448-0000": "Jetson Nano (devkit, SD)",
    "p3448-0002": "Jetson Nano (eMMC)",
    "p3448-0003": "Jetson Nano 2GB",
    "p2180-1000": "Jetson TX1",
    "p3310-1000": "Jetson TX2",
    "p3489-0000": "Jetson TX2i",
    "p3489-0888": "Jetson TX2 4GB",
    "p3636-0001": "Jetson TX2 NX",
    "p2888-0001": "Jetson AGX Xavier 16GB",
    "p2888-0004": "Jetson AGX Xavier 32GB",
    "p2888-0005": "Jetson AGX Xavier 64GB",
    "p2888-0008": "Jetson AGX Xavier Industrial",
    "p3668-0000": "Jetson Xavier NX (devkit, SD)",
    "p3668-0001": "Jetson Xavier NX (eMMC)",
    "p3668-0003": "Jetson Xavier NX 16GB",
    "p3701-0000": "Jetson AGX Orin (devkit)",
    "p3701-0004": "Jetson AGX Orin 32GB",
    "p3701-0005": "Jetson AGX Orin 64GB",
    "p3701-0008": "Jetson AGX Orin Industrial",
    "p3767-0000": "Jetson Orin NX 16GB",
    "p3767-0001": "Jetson Orin NX 8GB",
    "p3767-0003": "Jetson Orin Nano 8GB",
    "p3767-0004": "Jetson Orin Nano 4GB",
    "p3767-0005": "Jetson Orin Nano 8GB (devkit, SD)",
    "p3834-0008": "Jetson AGX Thor (devkit, T5000)",
}

#: SoC compatible -> (family name, GPU architecture).
SOCS: dict[str, tuple[str, str]] = {
    "tegra210": ("Nano/TX1", "Maxwell"),
    "tegra186": ("TX2", "Pascal"),
    "tegra194": ("Xavier", "Volta"),
    "tegra234": ("Orin", "Ampere"),
    "tegra264": ("Thor", "Blackwell"),
}

_PART_RE = re.compile(r"\b(p\d{4}-\d{4})(-super)?\b")
_SOC_RE = re.compile(r"^nvidia,(tegra\d+)$")


@dataclass(frozen=True)
class ModuleInfo:
    """A Jetson module as the device tree describes it (any field None when unknown)."""

    model: str | None
    compatible: tuple[str, ...]
    part_number: str | None
    carrier: str | None
    module: str | None
    super_mode: bool
    soc: str | None
    soc_family: str | None
    gpu_architecture: str | None


def _text(data: bytes | str) -> str:
    return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data


def parse_device_tree_model(data: bytes | str) -> str | None:
    """``/proc/device-tree/model`` (NUL-terminated) -> the model string, or None when empty."""
    text = _text(data).replace("\x00", "").strip()
    return text or None


def parse_compatible(data: bytes | str) -> tuple[str, ...]:
    """``/proc/device-tree/compatible`` (NUL-separated) -> its entries, most specific first."""
    return tuple(entry.strip() for entry in _text(data).split("\x00") if entry.strip())


def identify_module(compatible: tuple[str, ...], model: str | None = None) -> ModuleInfo:
    """Part number, carrier, module name and SoC from the compatible list (and the model string)."""
    part: str | None = None
    carrier: str | None = None
    super_mode = False
    soc: str | None = None
    for entry in compatible:
        name = entry.split(",", 1)[-1]
        soc_match = _SOC_RE.match(entry)
        if soc_match and soc is None:
            soc = soc_match.group(1)
            continue
        boards = name.split("+")
        found = [m for m in (_PART_RE.fullmatch(b) for b in boards) if m is not None]
        if not found:
            continue
        if len(found) > 1 and carrier is None:
            carrier = found[0].group(1)
        if part is None:
            # "carrier+module": the module is the last part.
            part = found[-1].group(1)
        super_mode = super_mode or any(m.group(2) for m in found)
    family, arch = SOCS.get(soc, (None, None)) if soc else (None, None)
    return ModuleInfo(
        model=model,
        compatible=compatible,
        part_number=part,
        carrier=carrier,
        module=MODULES.get(part) if part else None,
        super_mode=super_mode,
        soc=soc,
        soc_family=family,
        gpu_architecture=arch,
    )
