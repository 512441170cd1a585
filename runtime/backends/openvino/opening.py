"""Open the bundle on OpenVINO: FP32 first (the golden self-test by the export's parity rule, and the
reference), then each reduced precision asked for, gated on this device; serve the one decided.

Every compiled model has its cache entry (:mod:`.cache`); its ``record.json`` gets the settings the
compiled model reported, the CPU's facts and the gate's figures. The backend that serves says its
precision, the reason and the figures (``describe()``: ``/readyz`` and ``/v1/model``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from retinaedge.runtime.backends.base import BackendOptions
from retinaedge.runtime.backends.openvino.cache import (
    CacheEntry,
    CompiledModelCache,
    default_cache_root,
    entry_key,
)
from retinaedge.runtime.backends.openvino.compiled import OpenVinoBackend
from retinaedge.runtime.backends.openvino.cpu import CpuFacts, read_cpu
from retinaedge.runtime.backends.openvino.gate import GateResult
from retinaedge.runtime.backends.openvino.gating import (
    EvalSet,
    gate,
    gate_inputs,
    reference_run,
    relaxed_rate,
    set_timings,
    with_recheck,
)
from retinaedge.runtime.backends.openvino.precision import Decision, check_precision, decide, offered, to_gate
from retinaedge.runtime.backends.openvino.recheck import RecheckedBackend, class_thresholds, recheck_band
from retinaedge.runtime.backends.openvino.variants import int8_model
from retinaedge.runtime.bundle import Bundle, load_golden, self_test
from retinaedge.runtime.errors import BundleError, ConfigError
from retinaedge.runtime.hashing import sha256_file

log = logging.getLogger(__name__)


def _threads(options: BackendOptions) -> int:
    from retinaedge.runtime.backends.onnxruntime import affinity_threads

    return options.threads or affinity_threads()


def device_capabilities(core: Any, overrides: dict[str, Any] | None) -> list[str]:
    """The CPU device's ``OPTIMIZATION_CAPABILITIES`` (``FP32``, ``BF16``, ``INT8``...), or the
    override's (the device-properties hook tests use)."""
    if overrides and "OPTIMIZATION_CAPABILITIES" in overrides:
        return [str(c) for c in overrides["OPTIMIZATION_CAPABILITIES"]]
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


class _Compiler:
    """Compiles ``path`` at ``precision`` into its cache entry and records what it reported."""

    def __init__(
        self, core: Any, bundle: Bundle, cache: CompiledModelCache, cpu: CpuFacts, threads: int, hint: str
    ) -> None:
        import openvino as ov

        self.core, self.bundle, self.cache, self.cpu = core, bundle, cache, cpu
        self.threads, self.hint = threads, hint
        self.version = str(ov.get_version())

    def entry(self, path: Path, precision: str) -> CacheEntry:
        """The cache entry of ``path`` compiled at ``precision`` here (nothing compiled)."""
        model_sha = self.bundle.manifest.model_sha256 if path == self.bundle.model_path else sha256_file(path)
        return self.cache.entry(
            entry_key(
                model_sha256=str(model_sha),
                bundle_sha256=str(self.bundle.manifest.model_sha256),
                precision=precision,
                openvino=self.version,
                cpu=self.cpu.fingerprint(),
            )
        )

    def recorded_gate(self, path: Path, precision: str, inputs: str) -> GateResult | None:
        """The gate recorded in the entry for the same inputs (:func:`.gating.gate_inputs`), or None."""
        record = self.entry(path, precision).read_record()
        doc = (record or {}).get("gate")
        if not isinstance(doc, dict) or doc.get("inputs") != inputs:
            return None
        try:
            result = GateResult.from_dict(doc)
        except (KeyError, TypeError, ValueError):
            return None
        result.reused = True
        return result

    def compile(self, path: Path, precision: str) -> tuple[OpenVinoBackend, Any]:
        entry = self.entry(path, precision)
        cached = entry.exists()
        started = time.perf_counter()
        backend = OpenVinoBackend(
            self.core,
            path,
            precision=precision,
            threads=self.threads,
            hint=self.hint,
            cache_dir=entry.blob_dir,
        )
        backend.details["compile_s"] = round(time.perf_counter() - started, 3)
        backend.details["compiled_from_cache"] = cached
        backend.details["cache_entry"] = str(entry.path)
        return backend, entry

    def record(self, entry: Any, backend: OpenVinoBackend, figures: dict[str, Any]) -> None:
        entry.write_record(
            {
                "model": backend.model_path.name,
                "model_sha256": str(self.bundle.manifest.model_sha256),
                "precision": backend.precision,
                "openvino": self.version,
                "cpu": self.cpu.to_dict(),
                "settings": backend.settings,
                "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **figures,
            }
        )


#: What serves: one compiled model, or a reduced precision with its FP32 re-check (:mod:`.recheck`).
Served = OpenVinoBackend | RecheckedBackend


def open_gated(bundle: Bundle, options: BackendOptions, extra: dict[str, Any]) -> Served:
    """See the module docstring; ``extra`` as :func:`retinaedge.runtime.backends.openvino._extra` returns it."""
    if extra.get("gate_bundle"):
        return _open_by_proxy(bundle, options, extra, Path(extra["gate_bundle"]))
    return _open(bundle, options, extra, None)


def _open_by_proxy(bundle: Bundle, options: BackendOptions, extra: dict[str, Any], proxy: Path) -> Served:
    """The benchmark's ``--gate-model``: which precisions pass is decided by the gate on ``proxy`` (a trained
    bundle, with its annotated DICOM); ``bundle`` (e.g. a random-weight benchmark model, whose near-threshold
    detections say nothing about fidelity) then serves the requested precision if it passed there (``auto``:
    the fastest that passed there, timed on ``bundle``). ``bundle``'s own gates still run on its golden
    frames and are reported (``gates`` in ``describe()``), but do not decide."""
    from retinaedge.runtime.bundle import load_bundle

    proof = _open(load_bundle(proxy), options, {**extra, "gate_bundle": None}, None)
    try:
        decided, why = proof.precision, proof.reason
        facts = {
            "bundle": str(proxy),
            "precision": decided,
            "reason": why,
            "gates": proof.details.get("gates"),
        }
    finally:
        proof.close()
    own = {**extra, "gate_bundle": None, "gate_annotations": None, "gate_eval": ()}
    return _open(bundle, options, own, facts)


def _open(
    bundle: Bundle, options: BackendOptions, extra: dict[str, Any], proof: dict[str, Any] | None
) -> Served:
    """Open ``bundle``; ``proof``: a decision made on another bundle (:func:`_open_by_proxy`) to apply."""
    import openvino as ov

    requested = check_precision(str(extra["precision"]))
    core = ov.Core()
    cpu = read_cpu()
    cache = CompiledModelCache(
        Path(extra["cache_dir"]) if extra["cache_dir"] else options.cache_dir or default_cache_root()
    )
    compiler = _Compiler(core, bundle, cache, cpu, _threads(options), str(extra["performance_hint"]))
    check = _eval_set(extra)
    caps = device_capabilities(core, extra["device_properties"])
    int8_path, int8_problem = int8_model(bundle, str(extra["int8_model"]))
    availability = offered(caps, cpu, int8_problem)
    paths = {
        p: (int8_path if p == "int8" and int8_path is not None else bundle.model_path)
        for p in ("bf16", "int8")
    }
    fp32, fp32_entry = compiler.compile(bundle.model_path, "fp32")
    try:
        golden = _golden(bundle)
        if golden is None:
            fp32.reason = "precision fp32" + (
                "" if requested == "fp32" else f" ({requested} needs the golden frames of a bundle directory)"
            )
            compiler.record(fp32_entry, fp32, {"self_test": None})
            return fp32
        images, expected = golden
        reports = self_test(fp32, bundle)  # the export's parity rule against the recorded PyTorch detections
        todo = to_gate(requested, availability)
        bands = {p: recheck_band(p, extra["recheck_band"]) for p in todo}
        inputs = {p: gate_inputs(bundle, check, bands[p]) for p in todo}
        recorded = {p: r for p in todo if (r := compiler.recorded_gate(paths[p], p, inputs[p])) is not None}
        # The annotated DICOM is run again only for a precision whose gate is not recorded for these inputs.
        need_eval = check if any(p not in recorded for p in todo) else None
        reference = reference_run(fp32, bundle, images, need_eval, options.batch_size)
        compiler.record(
            fp32_entry,
            fp32,
            {
                "self_test": [r.to_dict() for r in reports],
                "ms_per_frame": reference.ms_per_frame,
                "map50": reference.map50,
            },
        )
    except Exception:
        fp32.close()
        raise
    gates: dict[str, GateResult] = {}
    candidates: dict[str, Served] = {}
    thresholds = class_thresholds(bundle.manifest.class_names, bundle.manifest.operating_point)
    for precision in todo:
        compiled, entry = compiler.compile(paths[precision], precision)
        backend: Served = compiled
        if bands[precision] > 0:  # served with its FP32 re-check of undecided frames (.recheck)
            cap = bundle.manifest.postprocess.detections_per_img
            backend = RecheckedBackend(compiled, fp32, thresholds, bands[precision], cap)
        candidates[precision] = backend
        if precision in recorded:
            result = recorded[precision]  # timings are this start's
            set_timings(result, backend, images, reference.ms_per_frame)
            log.info(
                "precision gate %s: recorded for the same inputs, reused: %s", precision, result.summary()
            )
        else:
            result = gate(precision, backend, reference, bundle, images, check, options.batch_size)
            result.inputs = inputs[precision]
        gates[precision] = result
        compiler.record(entry, compiled, {"gate": result.to_dict()})
    deciding = gates if proof is None else _proxy_verdicts(gates, proof, reference.ms_per_frame)
    decision = decide(requested, availability, deciding, reference.ms_per_frame)
    if proof is not None:
        own = "; ".join(g.summary() for g in gates.values()) or "none"
        decision = Decision(
            decision.precision,
            f"{decision.reason}; pass/fail from the gate on {proof['bundle']}, this bundle's own gates "
            f"(not deciding): {own}",
            decision.fallback,
        )
    chosen: Served = candidates.pop(decision.precision, fp32) if decision.precision != "fp32" else fp32
    for other in candidates.values():  # not chosen; a re-checked one shares the FP32 model
        if isinstance(other, RecheckedBackend):
            other.release_fast()
        else:
            other.close()
    if chosen is not fp32 and not isinstance(chosen, RecheckedBackend):
        fp32.close()
    (log.warning if decision.fallback else log.info)("openvino: %s", decision.reason)
    chosen.reason = decision.reason
    chosen.details.update(
        {
            "requested_precision": requested,
            "offered": {p: ("yes" if why is None else why) for p, why in availability.items()},
            "gates": {p: g.to_dict() for p, g in gates.items()},
            "fp32_ms_per_frame": reference.ms_per_frame,
            "cpu": cpu.to_dict(),
            "capabilities": caps,
            "openvino": compiler.version,
            **({"gate_bundle": proof} if proof is not None else {}),
        }
    )
    if chosen is not fp32:
        rate = relaxed_rate(expected, _rerun(chosen, images))
        chosen.self_test_criteria = {
            "iou_min": 0.5,
            "score_tol": 0.1,
            "min_match_rate": max(0.0, rate - 1e-9),
        }
    return chosen


def _proxy_verdicts(
    gates: dict[str, GateResult], proof: dict[str, Any], fp32_ms: float
) -> dict[str, GateResult]:
    """The proxy bundle's gate figures and verdicts, with this bundle's timings (what ``auto`` compares);
    a re-checked precision's time counts the proxy's re-check rate (measured on its trained model and
    annotated DICOM), not this bundle's own (e.g. a random-weight model's golden frame)."""
    verdicts = proof.get("gates") or {}
    name = Path(proof["bundle"]).name
    out = {}
    for precision, ours in gates.items():
        theirs = verdicts.get(precision)
        if theirs is None:
            out[precision] = replace(ours, reasons=[f"not gated on {name}"])
            continue
        out[precision] = GateResult(
            f"{precision} (gated on {name})",
            frames=int(theirs["frames"]),
            reference_findings=int(theirs["reference_findings"]),
            kept=int(theirs["kept"]),
            new=[{}] * int(theirs.get("new_count", len(theirs["new"]))),
            map50=theirs.get("map50"),
            ms_per_frame=with_recheck(ours.reduced_ms_per_frame or 0.0, theirs.get("recheck_rate"), fp32_ms)
            if ours.reduced_ms_per_frame is not None
            else ours.ms_per_frame,
            reasons=list(theirs["reasons"]),
            recheck_band=float(theirs.get("recheck_band") or 0.0),
            recheck_rate=theirs.get("recheck_rate"),
            reduced_ms_per_frame=ours.reduced_ms_per_frame,
        )
    return out


def _rerun(backend: Served, images: Any) -> list[Any]:
    from retinaedge.runtime.detections import split_outputs

    return split_outputs(backend.infer(images))


def _golden(bundle: Bundle) -> tuple[Any, Any] | None:
    """``(images, recorded detections)`` of the bundle's golden input, or None for a bare model.onnx."""
    try:
        images, expected, _criteria = load_golden(bundle)
    except BundleError:
        if bundle.root is not None:
            raise
        return None
    return images, expected


def _eval_set(extra: dict[str, Any]) -> EvalSet | None:
    annotations, files = extra["gate_annotations"], tuple(Path(f) for f in extra["gate_eval"] or ())
    if bool(annotations) != bool(files):
        raise ConfigError("the gate's annotations and its annotated DICOM files go together")
    return EvalSet(Path(annotations), files) if annotations else None
