"""The CPU facts reduced precision depends on: model name and the ISA flags of ``/proc/cpuinfo``.

Whether bf16 and INT8 pay off depends on the instructions the CPU has: AVX2 only, AVX-512, VNNI
(``avx512_vnni``/``avx_vnni``: INT8 dot products), native bf16 (``avx512_bf16``) and AMX (``amx_bf16``,
``amx_int8``: tile matrix units). :func:`parse_cpuinfo` is pure (the text of ``/proc/cpuinfo`` -> facts);
:func:`read_cpu` reads this machine's. The benchmark reports the same facts beside its figures.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The flags reported and keyed on, in the order they are shown (Linux ``/proc/cpuinfo`` names).
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CpuFacts:
    """``model``: the ``model name`` line; ``features``: which of :data:`FEATURES` the CPU has."""

    model: str
    features: tuple[str, ...]

    def has(self, flag: str) -> bool:
        return flag in self.features

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware (AVX512_BF16 or AMX-BF16); without it bf16 is emulated, and slower."""
        return self.has("avx512_bf16") or self.has("amx_bf16")

    @property
    def vnni(self) -> bool:
        """INT8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
        return self.has("avx512_vnni") or self.has("avx_vnni") or self.has("amx_int8")

    def fingerprint(self) -> str:
        """16 hex digits over model and features: what a compiled model is specific to."""
        text = self.model + "|" + ",".join(self.features)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "features": {f: f in self.features for f in FEATURES}}


def parse_cpuinfo(text: str) -> CpuFacts:
    """Facts from the text of ``/proc/cpuinfo`` (the first processor's ``model name`` and ``flags``)."""
    model, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return CpuFacts(model or platform.processor() or "unknown", tuple(f for f in FEATURES if f in flags))


def read_cpu(path: Path = Path("/proc/cpuinfo")) -> CpuFacts:
    """This machine's facts (no flags known off Linux)."""
    try:
        return parse_cpuinfo(path.read_text(errors="replace"))
    except OSError:
        return CpuFacts(platform.processor() or "unknown", ())
