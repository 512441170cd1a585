"""The compiled-model cache: one directory per model file, precision, CPU and OpenVINO version.

Layout under the cache root (``openvino_cache_dir``; default ``RETINAEDGE_DATA_DIR/openvino``)::

    <key>/ov/           OpenVINO's own compiled-blob cache (``CACHE_DIR``): a second start imports the
                        compiled model instead of compiling it again
    <key>/record.json   what the entry is for (model sha256, precision, OpenVINO version, CPU), the
                        settings the compiled model reported and the precision gate's figures

``key`` = sha256 over the canonical JSON of the model file's sha256, the bundle's ``model.onnx`` sha256,
the precision, the OpenVINO version and the CPU fingerprint (model name and ISA flags,
:mod:`.cpu`), like the TensorRT engine cache's key (model, options, device). A new bundle, another CPU
or another OpenVINO release is a new key; nothing stale is ever imported. ``record.json`` is written
atomically (temporary file, fsync, rename). Pure Python: no OpenVINO import.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = 1
RECORD_FILE = "record.json"


def entry_key(*, model_sha256: str, bundle_sha256: str, precision: str, openvino: str, cpu: str) -> str:
    """Hex sha256 of everything a compiled model depends on."""
    doc = {
        "format": FORMAT,
        "model_sha256": model_sha256,
        "bundle_sha256": bundle_sha256,
        "precision": precision,
        "openvino": openvino,
        "cpu": cpu,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    """One key's directory: ``blob_dir`` for OpenVINO's ``CACHE_DIR``, ``record_path`` for the record."""

    key: str
    path: Path

    @property
    def blob_dir(self) -> Path:
        return self.path / "ov"

    @property
    def record_path(self) -> Path:
        return self.path / RECORD_FILE

    def exists(self) -> bool:
        """Whether a model was compiled into this entry before (OpenVINO imports it instead)."""
        return self.blob_dir.is_dir() and any(self.blob_dir.iterdir())

    def read_record(self) -> dict[str, Any] | None:
        """The recorded facts and gate figures, or None (missing or unreadable: it is rewritten)."""
        try:
            doc = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and doc.get("key") == self.key else None

    def write_record(self, record: dict[str, Any]) -> None:
        """Replace ``record.json`` atomically with ``record`` (``key`` added)."""
        self.path.mkdir(parents=True, exist_ok=True)
        data = json.dumps({**record, "key": self.key}, indent=2, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.record_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class CompiledModelCache:
    """The cache root; :meth:`entry` names the directory of one key (created on use)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def entry(self, key: str) -> CacheEntry:
        path = self.root / key[:24]
        path.mkdir(parents=True, exist_ok=True)
        return CacheEntry(key, path)


def default_cache_root() -> Path:
    """``RETINAEDGE_OPENVINO_CACHE_DIR``, else ``RETINAEDGE_DATA_DIR/openvino``, else
    ``retinaedge-data/openvino`` (the service's data directory default)."""
    explicit = os.environ.get("RETINAEDGE_OPENVINO_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("RETINAEDGE_DATA_DIR", "retinaedge-data")) / "openvino"
