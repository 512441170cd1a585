"""``export-triton``: a model bundle -> a Triton Inference Server model repository.

Layout written under ``REPO`` (one model directory; a repository may hold several)::

    REPO/NAME/config.pbtxt              ModelConfig (:mod:`.config`)
    REPO/NAME/1/model.onnx              onnxruntime and python platforms: the bundle's model.onnx, as is
    REPO/NAME/1/model.py                python platform: ONNX Runtime inside Triton's python backend
    REPO/NAME/1/model_smXY.plan         tensorrt platform: engines from the engine cache, one per GPU
                                        compute capability (cc_model_filenames)

``onnxruntime`` is what a GPU server normally runs (Triton's ONNX Runtime backend, optionally with its
TensorRT accelerator); ``tensorrt`` serves engines ``retinaedge build`` already built and validated on
that GPU model; ``python`` is the CPU-only variant for machines whose Triton has the python backend only
(the tritonserver of the ``nvidia-pytriton`` wheel: the tests run it).

The model directory is written beside its final place and renamed into it, so Triton (which may poll the
repository) never sees half a model.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaedge.export.triton.config import (
    CRITERIA_PARAMETER,
    PLATFORMS,
    THREADS_PARAMETER,
    TritonModelConfig,
    default_preferred,
)
from retinaedge.runtime.bundle import PLUGIN_MODEL_FILE, QDQ_MODEL_FILE, Bundle, load_bundle
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.hashing import sha256_file

log = logging.getLogger(__name__)

VERSION_DIR = "1"
PYTHON_MODEL_SOURCE = Path(__file__).with_name("python_model.py")
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class ExportRequest:
    """What ``retinaedge export-triton`` was asked for (see its ``--help``)."""

    model: Path
    out: Path
    name: str | None = None
    max_batch: int = 8
    instances: int = 1
    platform: str = "onnxruntime"
    kind: str | None = None
    preferred: tuple[int, ...] = ()
    queue_delay_us: int = 2000
    threads: int = 0
    engine_cache: Path | None = None
    replace: bool = False

    def validate(self) -> None:
        if self.platform not in PLATFORMS:
            raise ConfigError(f"--platform must be one of {sorted(PLATFORMS)}, got {self.platform!r}")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.instances < 1:
            raise ConfigError(f"--instances must be >= 1, got {self.instances}")
        bad = [b for b in self.preferred if not 1 <= b <= self.max_batch]
        if bad:
            raise ConfigError(f"--preferred-batch sizes {bad} are outside 1..--max-batch ({self.max_batch})")
        if self.queue_delay_us < 0:
            raise ConfigError(f"--max-queue-delay-us must be >= 0, got {self.queue_delay_us}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {self.threads}")
        if self.kind not in (None, "gpu", "cpu"):
            raise ConfigError(f"--kind must be gpu or cpu, got {self.kind!r}")
        if self.platform == "tensorrt" and self.kind == "cpu":
            raise ConfigError("--platform tensorrt runs on the GPU only; --kind cpu does not apply")
        if self.platform == "python" and self.kind == "gpu":
            raise ConfigError("--platform python runs ONNX Runtime on the CPU; --kind gpu does not apply")
        if self.platform == "tensorrt" and self.engine_cache is None:
            raise ConfigError(
                "--platform tensorrt needs --engine-cache DIR (where retinaedge build stored the engines)"
            )


def model_name(bundle: Bundle, name: str | None) -> str:
    """The Triton model name: ``name`` or the manifest's; a directory name Triton accepts."""
    chosen = name or bundle.manifest.name
    if not chosen or set(chosen) - _NAME_OK or chosen.startswith("."):
        raise ConfigError(
            f"model name {chosen!r} is not usable as a Triton model directory (letters, digits, '-', '_', "
            "'.'; not starting with '.'); pass --name"
        )
    return chosen


def export_repository(req: ExportRequest) -> dict[str, Any]:
    """Write ``req.out/NAME`` (see the module docstring); return a report (paths, sha256s, config)."""
    req.validate()
    bundle = load_bundle(req.model)  # verifies model.onnx against the manifest's sha256
    name = model_name(bundle, req.name)
    final = req.out / name
    if final.exists() and not req.replace:
        raise ConfigError(f"{final} exists; pass --replace to overwrite it")
    kind = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}[req.kind or ("cpu" if req.platform == "python" else "gpu")]
    staging = req.out / f".{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / VERSION_DIR).mkdir(parents=True)
    try:
        files, cc_files, extra = _write_version(req, bundle, staging / VERSION_DIR)
        config = TritonModelConfig(
            name=name,
            platform=req.platform,
            manifest=bundle.manifest,
            max_batch=req.max_batch,
            preferred=req.preferred or default_preferred(req.max_batch),
            queue_delay_us=req.queue_delay_us,
            instances=req.instances,
            kind=kind,
            cc_files=cc_files,
            extra=extra,
        )
        (staging / "config.pbtxt").write_text(config.to_pbtxt())
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("Triton model %s written to %s (%s)", name, final, req.platform)
    return {
        "repository": str(req.out),
        "model": name,
        "platform": req.platform,
        "config": str(final / "config.pbtxt"),
        "files": {k: str(final / VERSION_DIR / k) for k in files},
        "model_sha256": bundle.manifest.model_sha256,
        "max_batch_size": req.max_batch,
        "preferred_batch_size": list(config.preferred),
        "instances": req.instances,
        "kind": kind,
        "cc_model_filenames": cc_files,
    }


def _write_version(
    req: ExportRequest, bundle: Bundle, version: Path
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Fill the version directory -> (file names, cc_model_filenames, extra parameters)."""
    if req.platform in ("onnxruntime", "python"):
        shutil.copyfile(bundle.model_path, version / "model.onnx")
        copied = sha256_file(version / "model.onnx")
        if copied != bundle.manifest.model_sha256:
            raise ConfigError(f"copying {bundle.model_path} changed it (sha256 {copied}); disk problem?")
        if req.platform == "onnxruntime":
            return ["model.onnx"], {}, {}
        shutil.copyfile(PYTHON_MODEL_SOURCE, version / "model.py")
        return ["model.onnx", "model.py"], {}, {THREADS_PARAMETER: str(req.threads)}
    from retinaedge.export.triton.engines import pick_engines

    assert req.engine_cache is not None  # validate() checked
    picked = pick_engines(bundle, _bundle_onnx_sha256s(bundle), req.engine_cache, req.max_batch)
    cc_files: dict[str, str] = {}
    engines: dict[str, Any] = {}
    for cc, entry in sorted(picked.items()):
        filename = f"model_sm{cc.replace('.', '')}.plan"
        (version / filename).write_bytes(entry.read_engine())  # re-checked against its sha256
        cc_files[cc] = filename
        engines[cc] = {
            "key": entry.key,
            "engine_sha256": entry.manifest["engine_sha256"],
            "tensorrt": entry.manifest["fingerprint"].get("tensorrt"),
            "gpu": entry.manifest["fingerprint"].get("gpu_name"),
            "options": entry.manifest["options"],
        }
    extra = {"retinaedge_engines": json.dumps(engines, sort_keys=True)}
    criteria = _loosest([e.manifest.get("validation", {}).get("criteria") for e in picked.values()])
    if criteria:  # reduced-precision engines: the criteria they were accepted with at build
        extra[CRITERIA_PARAMETER] = json.dumps(criteria, sort_keys=True)
    return sorted(cc_files.values()), cc_files, extra


def _loosest(criteria: list[Any]) -> dict[str, float]:
    """The loosest of the engines' acceptance criteria (Triton picks the engine by GPU, unknown here)."""
    known = [c for c in criteria if isinstance(c, dict)]
    if not known:
        return {}
    return {
        "iou_min": min(float(c["iou_min"]) for c in known),
        "score_tol": max(float(c["score_tol"]) for c in known),
        "min_match_rate": min(float(c["min_match_rate"]) for c in known),
    }


def _bundle_onnx_sha256s(bundle: Bundle) -> set[str]:
    """sha256 of every ONNX file of the bundle an engine may have been built from."""
    root = bundle.model_path.parent
    shas = {str(bundle.manifest.model_sha256)}
    for extra in (PLUGIN_MODEL_FILE, QDQ_MODEL_FILE):
        if (root / extra).is_file():
            shas.add(sha256_file(root / extra))
    return shas
