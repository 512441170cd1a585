"""The engine cache: serialized TensorRT engines keyed by model, build options and device.

Layout of the cache directory (one entry per key)::

    <key>.json                 manifest: key, model sha256, options, fingerprint, engine file and sha256
    <key>.<sha16>.engine       the serialized engine the manifest names
    <key>.failed               JSON record of the last failed build of that key (time, error)
    .lock                      flock(2) taken while storing or evicting
    .tmp-*                     files being written (never read; stale ones are removed)

``key = sha256(canonical JSON {onnx_sha256, options, fingerprint, dla_core})``. A store writes the engine
under a new name (temp file in the same directory, fsync, ``os.replace``, fsync of the directory), then the
manifest the same way; the manifest replace is the commit. An interrupted store therefore leaves the
previous entry intact and usable, and no partially written file under a name that is ever read.

:meth:`EngineCache.lookup` never raises for a bad entry: it returns a :class:`Lookup` whose ``status`` says
why the entry cannot be used (``corrupt``, ``foreign-device``, ``version-mismatch``) so the caller can fall
back visibly. Everything here is pure Python (hashes, JSON, files): no TensorRT import.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retinaedge.runtime.backends.tensorrt.errors import EngineCacheError
from retinaedge.runtime.backends.tensorrt.fingerprint import DeviceFingerprint
from retinaedge.runtime.backends.tensorrt.options import BuildOptions
from retinaedge.runtime.durable import fsync_path
from retinaedge.runtime.hashing import sha256_file

log = logging.getLogger(__name__)

FORMAT = 1
_CHUNK = 1 << 20
STATUSES = ("hit", "miss", "corrupt", "foreign-device", "version-mismatch")


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def cache_key(onnx_sha256: str, options: BuildOptions, fingerprint: DeviceFingerprint) -> str:
    """Hex sha256 over the canonical JSON of everything an engine depends on."""
    doc = {
        "format": FORMAT,
        "onnx_sha256": onnx_sha256,
        "options": options.key_dict(),
        "fingerprint": fingerprint.to_dict(),
        "dla_core": options.dla_core,
    }
    return hashlib.sha256(canonical_json(doc)).hexdigest()


def atomic_write(path: Path, chunks: Iterable[bytes | memoryview]) -> tuple[str, int]:
    """Write ``chunks`` to ``path`` atomically; return ``(sha256, size)`` of what was written.

    Temp file in the same directory, fsync, ``os.replace``, fsync of the directory. On any exception the
    temp file is removed and ``path`` is untouched.
    """
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)
    return digest.hexdigest(), size


def _chunks(data: bytes | memoryview) -> Iterator[memoryview]:
    view = memoryview(data).cast("B")
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


@dataclass(frozen=True)
class CacheEntry:
    """A verified cache entry: the engine file and its manifest (as a dict)."""

    key: str
    engine_path: Path
    manifest_path: Path
    manifest: dict[str, Any]

    def read_engine(self) -> bytes:
        """The engine bytes, re-checked against the manifest's sha256 (raises EngineCacheError)."""
        data = self.engine_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest["engine_sha256"]:
            raise EngineCacheError(f"{self.engine_path.name} changed since it was verified")
        return data


@dataclass(frozen=True)
class Lookup:
    """The outcome of a lookup: ``status`` in :data:`STATUSES`, a human ``reason``, the entry on a hit."""

    status: str
    reason: str
    key: str
    entry: CacheEntry | None = None
    details: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.status == "hit" and self.entry is not None


class EngineCache:
    """Engines under ``root``; ``max_bytes`` (None: unlimited) bounds the engine files' total size."""

    def __init__(self, root: str | Path, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EngineCacheError(f"engine cache {self.root} cannot be created: {exc}") from exc
        if not self.root.is_dir():
            raise EngineCacheError(f"engine cache {self.root} is not a directory")

    # -- paths and locking -------------------------------------------------------------------------
    def manifest_path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # -- lookup ------------------------------------------------------------------------------------
    def lookup(self, onnx_sha256: str, options: BuildOptions, fingerprint: DeviceFingerprint) -> Lookup:
        """Find a usable engine for this model, options and device, or say why there is none."""
        key = cache_key(onnx_sha256, options, fingerprint)
        path = self.manifest_path(key)
        if not path.exists():
            return self._explain_miss(key, onnx_sha256, options, fingerprint)
        try:
            manifest = json.loads(path.read_text())
            if not isinstance(manifest, dict):
                raise ValueError("manifest is not a JSON object")
            recorded = DeviceFingerprint.from_dict(manifest["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return Lookup("corrupt", f"engine manifest {path.name} is unreadable: {exc}", key)
        mismatch = self._mismatch(key, manifest, recorded, onnx_sha256, options, fingerprint)
        if mismatch is not None:
            return mismatch
        name = manifest.get("engine_file")
        if not isinstance(name, str) or "/" in name or not name.endswith(".engine"):
            return Lookup("corrupt", f"engine manifest {path.name} names no engine file", key)
        engine_path = self.root / name
        problem = self._check_engine(engine_path, manifest)
        if problem is not None:
            return Lookup("corrupt", problem, key)
        with contextlib.suppress(OSError):
            os.utime(path)  # least-recently-used order for eviction
        entry = CacheEntry(key, engine_path, path, manifest)
        return Lookup("hit", f"cached engine {key[:12]} built for this device", key, entry)

    def _mismatch(
        self,
        key: str,
        manifest: dict[str, Any],
        recorded: DeviceFingerprint,
        onnx_sha256: str,
        options: BuildOptions,
        fingerprint: DeviceFingerprint,
    ) -> Lookup | None:
        if manifest.get("format") != FORMAT or manifest.get("key") != key:
            return Lookup("corrupt", f"engine manifest {key[:12]} does not describe this key", key)
        if manifest.get("onnx_sha256") != onnx_sha256 or manifest.get("options") != options.key_dict():
            return Lookup("corrupt", f"engine manifest {key[:12]} records another model or options", key)
        return self._fingerprint_verdict(key, fingerprint, recorded)

    @staticmethod
    def _fingerprint_verdict(
        key: str, fingerprint: DeviceFingerprint, recorded: DeviceFingerprint
    ) -> Lookup | None:
        diffs = fingerprint.differences(recorded)
        if not diffs:
            return None
        if recorded.tensorrt != fingerprint.tensorrt:
            return Lookup(
                "version-mismatch",
                f"the cached engine was built with TensorRT {recorded.tensorrt}, this device has "
                f"TensorRT {fingerprint.tensorrt} (engines are not portable across versions; rebuild)",
                key,
                details=diffs,
            )
        return Lookup(
            "foreign-device",
            f"the cached engine was built for another device ({recorded.describe()}); this is "
            f"{fingerprint.describe()}: {'; '.join(diffs)}",
            key,
            details=diffs,
        )

    @staticmethod
    def _check_engine(engine_path: Path, manifest: dict[str, Any]) -> str | None:
        try:
            size = engine_path.stat().st_size
        except OSError:
            return f"engine file {engine_path.name} is missing"
        if size != manifest.get("engine_bytes"):
            return f"engine file {engine_path.name} has {size} bytes, the manifest says {manifest.get('engine_bytes')}"
        if sha256_file(engine_path) != manifest.get("engine_sha256"):
            return f"engine file {engine_path.name} is corrupt (sha256 differs from its manifest)"
        return None

    def _explain_miss(
        self, key: str, onnx_sha256: str, options: BuildOptions, fingerprint: DeviceFingerprint
    ) -> Lookup:
        """No entry under ``key``: is there one for this model and options built elsewhere?"""
        for manifest in self._manifests():
            if manifest.get("onnx_sha256") != onnx_sha256 or manifest.get("options") != options.key_dict():
                continue
            try:
                recorded = DeviceFingerprint.from_dict(manifest["fingerprint"])
            except (KeyError, ValueError, TypeError):
                continue
            verdict = self._fingerprint_verdict(key, fingerprint, recorded)
            if verdict is not None:
                return verdict
        return Lookup("miss", "no engine for this model, options and device in the cache", key)

    def _manifests(self) -> Iterator[dict[str, Any]]:
        for path in sorted(self.root.glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                yield data

    # -- store and evict ---------------------------------------------------------------------------
    def store(
        self,
        engine: bytes | memoryview | Iterable[bytes],
        onnx_sha256: str,
        options: BuildOptions,
        fingerprint: DeviceFingerprint,
        extra: dict[str, Any] | None = None,
    ) -> CacheEntry:
        """Write an engine and its manifest atomically; evict beyond the budget; return the new entry.

        ``engine`` is the serialized engine (bytes, a buffer such as TensorRT's ``IHostMemory`` through
        ``memoryview``, or an iterable of chunks). ``extra`` goes into the manifest (build report,
        validation results).
        """
        key = cache_key(onnx_sha256, options, fingerprint)
        chunks = _chunks(engine) if isinstance(engine, (bytes, bytearray, memoryview)) else engine
        with self._locked():
            self._remove_stale_temps()
            staging = self.root / f"{key}.staging.engine"
            sha, size = atomic_write(staging, chunks)
            engine_path = self.root / f"{key}.{sha[:16]}.engine"
            os.replace(staging, engine_path)
            fsync_path(self.root)
            manifest = {
                "format": FORMAT,
                "key": key,
                "onnx_sha256": onnx_sha256,
                "options": options.key_dict(),
                "fingerprint": fingerprint.to_dict(),
                "engine_file": engine_path.name,
                "engine_sha256": sha,
                "engine_bytes": size,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **(extra or {}),
            }
            manifest_path = self.manifest_path(key)
            atomic_write(manifest_path, [json.dumps(manifest, indent=2, sort_keys=True).encode()])
            self._remove_orphans()
            self.clear_failure(key)
            evicted = self._evict(keep=key)
        if evicted:
            log.info("engine cache over budget: evicted %s", [k[:12] for k in evicted])
        log.info("engine %s stored (%d bytes)", key[:12], size)
        return CacheEntry(key, engine_path, manifest_path, manifest)

    # -- failed builds ---------------------------------------------------------------------------
    def failure_path(self, key: str) -> Path:
        return self.root / f"{key}.failed"

    def record_failure(self, key: str, error: str) -> dict[str, Any]:
        """Remember that building ``key`` failed (so a restart loop does not rebuild it every time)."""
        record = {"key": key, "failed_at": time.time(), "error": error[-4000:]}
        with self._locked():
            atomic_write(self.failure_path(key), [json.dumps(record, indent=2).encode()])
        log.warning("engine %s: build failure recorded: %s", key[:12], error[-500:])
        return record

    def failure(self, key: str) -> dict[str, Any] | None:
        """The recorded failure of ``key`` (``failed_at`` in seconds since the epoch), or None.

        An unreadable record counts as none: it only ever delays a retry, so losing it is harmless.
        """
        try:
            record = json.loads(self.failure_path(key).read_text())
            float(record["failed_at"])
            str(record["error"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return dict(record) if isinstance(record, dict) else None

    def clear_failure(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.failure_path(key).unlink()

    def _remove_stale_temps(self, older_than_s: float = 3600.0) -> None:
        now = time.time()
        for path in list(self.root.glob(".tmp-*")) + list(self.root.glob("*.staging.engine")):
            with contextlib.suppress(OSError):
                if path.name.endswith(".staging.engine") or now - path.stat().st_mtime > older_than_s:
                    path.unlink()

    def _remove_orphans(self) -> None:
        """Delete engine files no manifest names (left by replaced entries or interrupted stores)."""
        named = {str(m.get("engine_file")) for m in self._manifests()}
        for path in self.root.glob("*.engine"):
            if path.name not in named and not path.name.endswith(".staging.engine"):
                with contextlib.suppress(OSError):
                    path.unlink()

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*.engine") if p.is_file())

    def _evict(self, keep: str | None) -> list[str]:
        if self.max_bytes is None:
            return []
        entries = []
        for path in self.root.glob("*.json"):
            try:
                manifest = json.loads(path.read_text())
                entries.append((path.stat().st_mtime, str(manifest["key"]), path, manifest))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        entries.sort(key=lambda e: e[0])  # least recently used first
        evicted = []
        total = self.total_bytes()
        for _, key, path, manifest in entries:
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            engine = self.root / str(manifest.get("engine_file", ""))
            size = engine.stat().st_size if engine.is_file() else 0
            with contextlib.suppress(OSError):
                path.unlink()  # manifest first: an entry without its manifest is never read
                engine.unlink()
            fsync_path(self.root)
            total -= size
            evicted.append(key)
        return evicted

    def evict(self) -> list[str]:
        """Enforce the size budget now; returns the evicted keys."""
        with self._locked():
            return self._evict(keep=None)
