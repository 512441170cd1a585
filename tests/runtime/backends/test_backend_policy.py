"""The candidate policy as a pure function: a table of facts -> ordered candidates with reasons.

:func:`retinaedge.runtime.backends.policy.plan_candidates` reads no clock and does no I/O; the same facts give the
same candidates. Every decision of :data:`~retinaedge.runtime.backends.policy.DECISIONS` is reached here, in
modes ``auto`` (TensorRT first, ONNX Runtime as the fallback) and ``tensorrt`` (raises instead).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from retinaedge.runtime.backends.policy import DECISIONS, FALLBACK_REASON, Candidate, Facts, plan_candidates
from retinaedge.runtime.backends.tensorrt.errors import (
    BuildOptionsError,
    MissingExtraError,
    NoCudaDeviceError,
)
from retinaedge.runtime.backends.tensorrt.planning import BackendPlan, plan_backend
from retinaedge.runtime.errors import ConfigError, MissingDependencyError, RetinaEdgeError

NOW = 1_800_000_000.0
HIT = Facts(lookup_status="hit", lookup_reason="cached engine abc built for this device", usable=True)
MISS = Facts(lookup_status="miss", lookup_reason="no engine for this model and options")

# name: (facts, expected first candidate (backend, action, decision), words in its reason)
TABLE: dict[str, tuple[Facts, tuple[str, str, str], str]] = {
    "no-tensorrt": (
        Facts(probe_error=MissingExtraError("TensorRT")),
        ("onnxruntime", "open", "onnxruntime-no-tensorrt"),
        "TensorRT not used: TensorRT is not installed (pip install '.[trt]'",
    ),
    "no-gpu": (
        Facts(probe_error=NoCudaDeviceError("no CUDA device")),
        ("onnxruntime", "open", "onnxruntime-no-tensorrt"),
        "TensorRT not used: no CUDA device",
    ),
    "probe-bug": (
        Facts(probe_error=KeyError("x")),
        ("onnxruntime", "open", "onnxruntime-no-tensorrt"),
        "TensorRT not used: KeyError: 'x'",
    ),
    "options-refused": (
        Facts(options_error=BuildOptionsError("DLA core 1 requested but Orin has no DLA")),
        ("onnxruntime", "open", "onnxruntime-options-refused"),
        "TensorRT not used: DLA core 1 requested",
    ),
    "cache-hit": (
        Facts(**{**HIT.__dict__, "precision": "fp16", "nms": "plugin"}),
        ("tensorrt", "load", "cache-hit"),
        "cached engine abc built for this device (fp16, plugin NMS)",
    ),
    "first": (
        Facts(**{**MISS.__dict__, "cache_empty": True, "cache_root": "/data/engines"}),
        ("tensorrt", "build", "build-first"),
        "the engine cache /data/engines is empty (first start on this device)",
    ),
    "new-model": (MISS, ("tensorrt", "build", "build-new-model"), "no engine for this model and options"),
    "foreign-device": (
        Facts(lookup_status="foreign-device", lookup_reason="built for another device"),
        ("tensorrt", "build", "build-fingerprint-changed"),
        "built for another device",
    ),
    "version-mismatch": (
        Facts(lookup_status="version-mismatch", lookup_reason="built with TensorRT 10.3.0"),
        ("tensorrt", "build", "build-fingerprint-changed"),
        "built with TensorRT 10.3.0",
    ),
    "corrupt": (
        Facts(lookup_status="corrupt", lookup_reason="is corrupt (sha256 differs from its manifest)"),
        ("tensorrt", "build", "build-corrupt"),
        "is corrupt",
    ),
    "build-disabled": (
        Facts(**{**MISS.__dict__, "allow_build": False}),
        ("onnxruntime", "open", "onnxruntime-build-disabled"),
        "building at start-up is disabled (engine_build=false): run `retinaedge build`",
    ),
    "failed-earlier": (
        Facts(**{**MISS.__dict__, "failed_at": NOW - 60, "failed_error": "out of memory", "now": NOW}),
        ("onnxruntime", "open", "onnxruntime-build-failed-earlier"),
        "(out of memory); not retried before engine_build_retry_s=86400 s",
    ),
    "failed-long-ago": (
        Facts(**{**MISS.__dict__, "failed_at": NOW - 90000, "failed_error": "out of memory", "now": NOW}),
        ("tensorrt", "build", "build-new-model"),
        "no engine for this model and options",
    ),
}


@pytest.mark.parametrize("case", list(TABLE))
def test_auto(case: str) -> None:
    facts, (backend, action, decision), words = TABLE[case]
    got = plan_candidates("auto", facts)
    first = got[0]
    assert (first.backend, first.action, first.decision) == (backend, action, decision)
    assert words in first.reason
    if backend == "tensorrt":  # auto: ONNX Runtime follows every TensorRT candidate
        assert got[1:] == [Candidate("onnxruntime", "open", decision, FALLBACK_REASON)]
    else:
        assert len(got) == 1
    assert plan_candidates("auto", facts) == got  # pure: same facts, same answer


@pytest.mark.parametrize("case", list(TABLE))
def test_tensorrt_mode_raises_instead_of_planning_onnxruntime(case: str) -> None:
    facts, (backend, action, decision), words = TABLE[case]
    if backend == "tensorrt":
        assert plan_candidates("tensorrt", facts) == [
            Candidate("tensorrt", action, decision, plan_candidates("auto", facts)[0].reason)
        ]
        return
    with pytest.raises(Exception) as info:
        plan_candidates("tensorrt", facts)
    if case == "probe-bug":  # not ours: raised as it came
        assert info.value is facts.probe_error
        return
    assert words.removeprefix("TensorRT not used: ") in str(info.value)
    if case == "no-tensorrt":
        assert isinstance(info.value, MissingDependencyError) and "retinaedge[trt]" in str(info.value)
    elif case == "options-refused":
        assert isinstance(info.value, ConfigError)
    else:
        assert isinstance(info.value, RetinaEdgeError)


def test_onnxruntime_mode_ignores_every_fact() -> None:
    for facts, _, _ in TABLE.values():
        assert plan_candidates("onnxruntime", facts) == [
            Candidate("onnxruntime", "open", "onnxruntime-configured", "backend=onnxruntime in the settings")
        ]


def test_unknown_mode() -> None:
    with pytest.raises(ConfigError, match="backend must be one of"):
        plan_candidates("openvino", Facts())


def test_every_decision_is_reached() -> None:
    # backend-configured: plan_backend's, for a registry backend outside this policy (tests/test_triton_*.py)
    reached = {entry[1][2] for entry in TABLE.values()} | {"onnxruntime-configured", "backend-configured"}
    assert reached == set(DECISIONS)


def test_plan_backend_carries_the_candidates(tmp_path: Path) -> None:
    def no_trt() -> tuple[object, object]:
        raise MissingExtraError("TensorRT")

    plan = plan_backend(
        None,  # type: ignore[arg-type]  (not reached: the probe fails first)
        mode="auto",
        options=None,  # type: ignore[arg-type]
        cache_root=tmp_path,
        cache_max_bytes=None,
        allow_build=True,
        probe=no_trt,
    )
    assert isinstance(plan, BackendPlan) and [c.backend for c in plan.candidates] == ["onnxruntime"]
    assert (plan.action, plan.decision) == ("onnxruntime", "onnxruntime-no-tensorrt")
    assert plan.reason == plan.candidates[0].reason
