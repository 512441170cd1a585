"""Running a detector over the files of an evaluation: ``retinaedge eval`` and the accuracy check of
``retinaedge quantize`` both use :func:`detect_all`, so what is measured is computed one way."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinaedge.runtime.dicomio import DEFAULT_LIMITS, Limits, open_dicom
from retinaedge.runtime.errors import ConfigError, RetinaEdgeError
from retinaedge.runtime.evaluate import EvalFrame

log = logging.getLogger(__name__)


def peek_uid(path: Path, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """The file's SOP Instance UID from its header, or ``None`` if the header cannot be read."""
    try:
        with open_dicom(path, limits) as src:
            return str(src.ds.get("SOPInstanceUID", "")) or None
    except Exception:  # any reason: this is only a best-effort look
        return None


@dataclass
class Detected:
    """What running the model over the inputs produced."""

    frames: list[EvalFrame] = field(default_factory=list)
    frames_per_instance: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> frames
    instances: int = 0
    rejected: int = 0
    rejected_uids: set[str] = field(default_factory=set)  # of rejected files whose header was readable


class InputRejected(Exception):
    """A file was rejected and ``--skip-rejected`` was not given; carries what to print."""

    def __init__(self, path: Path, error: dict[str, str], config: bool) -> None:
        super().__init__(error["message"])
        self.path = path
        self.error = error
        self.config = config


def detect_all(det: Any, files: Sequence[Path], *, skip_rejected: bool) -> Detected:
    """Run ``det`` over ``files``; rejected files raise :class:`InputRejected` unless ``skip_rejected``."""
    out = Detected()
    where: dict[str, Path] = {}
    for number, path in enumerate(files):
        try:
            result = det.detect(path)
        except Exception as exc:
            if isinstance(exc, RetinaEdgeError):
                error = exc.to_dict()
            else:  # a bug, not the input: say so, with the traceback in the log
                log.exception("internal error on input #%d (%s)", number, path)
                error = {"type": "internal-error", "message": f"{type(exc).__name__}: {exc}"}
            if not skip_rejected:
                raise InputRejected(path, error, isinstance(exc, ConfigError)) from exc
            out.rejected += 1
            log.warning("skipping rejected input %s: %s", path, error["type"])
            uid = peek_uid(path, det.limits)
            if uid:
                out.rejected_uids.add(uid)
            continue
        uid = result.sop_instance_uid
        if not uid:
            log.warning("input %s has no SOP Instance UID: its frames count as unannotated", path)
        elif uid in where:
            raise ConfigError(
                f"{where[uid]} and {path} are the same instance (same SOP Instance UID); give each file once"
            )
        else:
            where[uid] = path
            out.frames_per_instance[uid] = len(result.frames)
        out.instances += 1
        out.frames += [EvalFrame(uid, f.index, f.detections) for f in result.frames]
        log.debug("evaluated input #%d: %s (%d frames)", number, path, len(result.frames))
    return out
