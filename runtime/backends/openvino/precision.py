"""Which precisions this CPU and bundle offer, and which one serves: pure functions, no I/O.

``fp32`` is always offered and is the reference every other precision is gated against. ``bf16`` needs
the device to report it (OpenVINO's ``OPTIMIZATION_CAPABILITIES`` lists ``BF16``) and native bf16 in the
CPU (AVX512_BF16 or AMX-BF16): emulated bf16 is slower than FP32, so it is never run. ``int8`` needs an
INT8 model in the bundle (the NNCF model or the accepted Q/DQ model) and ``INT8`` in the capabilities.

``auto`` gates every offered reduced precision and serves the fastest of FP32 and those that passed,
by the time measured on the golden frames. An explicitly requested precision that is not offered or
fails its gate falls back to FP32, with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from retinaedge.runtime.backends.openvino.cpu import CpuFacts
from retinaedge.runtime.backends.openvino.gate import GateResult
from retinaedge.runtime.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "int8", "auto")
REDUCED = ("bf16", "int8")
#: A reduced precision whose FP32 re-check (:mod:`.recheck`) re-ran more than this share of the gate's
#: frames is not served even when asked for: it would be FP32 in disguise, and slower.
MAX_RECHECK_RATE = 0.5


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def offered(capabilities: Sequence[str], cpu: CpuFacts, int8_problem: str | None) -> dict[str, str | None]:
    """Reduced precision -> None when offered here, else why not. ``int8_problem``: why the bundle's
    INT8 model cannot be used (None: there is one)."""
    caps = {c.upper() for c in capabilities}
    out: dict[str, str | None] = {}
    if "BF16" not in caps:
        out["bf16"] = "the OpenVINO CPU device does not offer BF16 on this CPU (no emulated bf16)"
    elif not cpu.native_bf16:
        out["bf16"] = "this CPU has no native bf16 (avx512_bf16, amx_bf16): emulated bf16 is slower than FP32"
    else:
        out["bf16"] = None
    if "INT8" not in caps:
        out["int8"] = "the OpenVINO CPU device does not offer INT8"
    else:
        out["int8"] = int8_problem
    return out


def to_gate(requested: str, availability: Mapping[str, str | None]) -> list[str]:
    """The reduced precisions to compile and gate for ``requested``."""
    if requested == "auto":
        return [p for p in REDUCED if availability.get(p) is None]
    if requested in REDUCED and availability.get(requested) is None:
        return [requested]
    return []


@dataclass(frozen=True)
class Decision:
    """The precision that serves and why (for ``/readyz``, ``/v1/model`` and the log);
    ``fallback``: a requested reduced precision was not used."""

    precision: str
    reason: str
    fallback: bool = False


def decide(
    requested: str,
    availability: Mapping[str, str | None],
    gates: Mapping[str, GateResult],
    fp32_ms: float | None,
) -> Decision:
    """The precision to serve given what was requested, offered and gated."""
    if requested == "fp32":
        return Decision("fp32", "precision fp32 (requested)")
    if requested in REDUCED:
        why = availability.get(requested)
        if why is not None:
            return Decision("fp32", f"precision {requested} not used: {why}; serving fp32", True)
        gate = gates[requested]
        if not gate.passed:
            return Decision(
                "fp32", f"precision {requested} not used: gate failed ({gate.summary()}); serving fp32", True
            )
        if gate.recheck_rate is not None and gate.recheck_rate > MAX_RECHECK_RATE:
            return Decision(
                "fp32",
                f"precision {requested} not used: its fp32 re-check re-ran more than {MAX_RECHECK_RATE:.0%} of "
                f"the gate's frames ({gate.summary()}); serving fp32",
                True,
            )
        return Decision(requested, f"precision {requested}: gate passed ({gate.summary()})")
    passed = {p: g for p, g in gates.items() if g.passed}
    timings = {p: g.ms_per_frame for p, g in passed.items() if g.ms_per_frame is not None}
    if fp32_ms is not None:
        timings["fp32"] = fp32_ms
    notes = [g.summary() for g in gates.values()] + [
        f"{p}: {why}" for p, why in availability.items() if why is not None
    ]
    if not timings:
        return Decision(
            "fp32", "precision auto: fp32 (" + "; ".join(notes or ["no reduced precision offered"]) + ")"
        )
    best = min(timings, key=lambda p: timings[p])
    measured = ", ".join(f"{p} {ms:.1f} ms/frame" for p, ms in sorted(timings.items(), key=lambda kv: kv[1]))
    return Decision(
        best, f"precision auto: {best}, the fastest that passed ({measured}; " + "; ".join(notes) + ")"
    )
