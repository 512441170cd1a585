"""The engine cache on real files: keys, atomic writes (including SIGKILL mid-write), typed lookups, LRU."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from retinaedge.runtime.backends.tensorrt.cache import EngineCache, cache_key
from retinaedge.runtime.backends.tensorrt.fingerprint import DeviceFingerprint
from retinaedge.runtime.backends.tensorrt.options import BuildOptions
from support.polling import wait_until

ORIN = DeviceFingerprint.from_values(
    gpu_name="Orin",
    compute_capability=(8, 7),
    sm_count=16,
    tensorrt="10.3.0",
    cuda="12.6",
    l4t="36.4.4",
    dla_cores=2,
)
ONNX_SHA = "ab" * 32
OPTS = BuildOptions(precision="fp16", dla_core=0)
ENGINE = bytes(range(256)) * 4096  # 1 MiB of opaque "engine" bytes (the cache never interprets them)


def test_key_is_pinned_and_stable_across_processes() -> None:
    """The canonical JSON and hash are fixed: a changed key would orphan every cached engine in the field."""
    expected = "bb1b57f399e1c1648095a16dd6b63f12fad99243670e33e2e03ad5a58dd45e45"
    assert cache_key(ONNX_SHA, OPTS, ORIN) == expected
    code = textwrap.dedent(
        f"""
        from retinaedge.runtime.backends.tensorrt.cache import cache_key
        from retinaedge.runtime.backends.tensorrt.options import BuildOptions
        from retinaedge.runtime.backends.tensorrt.fingerprint import DeviceFingerprint
        fp = DeviceFingerprint.from_values(gpu_name="Orin", compute_capability="8.7", sm_count=16,
            tensorrt="10.3.0", cuda="12.6", l4t="36.4.4", dla_cores=2)
        print(cache_key({ONNX_SHA!r}, BuildOptions(precision="fp16", dla_core=0), fp))
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == expected


FINGERPRINT_CHANGES = {
    "gpu_name": "Orin NX",
    "compute_capability": "8.6",
    "sm_count": 8,
    "tensorrt": "10.3.1",
    "cuda": "12.4",
    "l4t": "36.3.0",
    "dla_cores": 1,
}
OPTION_CHANGES = {
    "precision": "int8",
    "dla_core": 1,
    "batch_min": 2,
    "batch_opt": 3,
    "batch_max": 8,
    "workspace_mib": 2048,
    "nms": "builtin",
}


def test_key_sensitive_to_every_component() -> None:
    base = cache_key(ONNX_SHA, OPTS, ORIN)
    keys = {base}
    assert {f.name for f in dataclasses.fields(DeviceFingerprint)} == set(FINGERPRINT_CHANGES)
    for name, value in FINGERPRINT_CHANGES.items():
        keys.add(cache_key(ONNX_SHA, OPTS, dataclasses.replace(ORIN, **{name: value})))
    changed_options = set(OPTION_CHANGES) | {"timing_cache"}
    assert {f.name for f in dataclasses.fields(BuildOptions)} == changed_options
    for name, value in OPTION_CHANGES.items():
        keys.add(cache_key(ONNX_SHA, dataclasses.replace(OPTS, **{name: value}), ORIN))
    keys.add(cache_key("cd" * 32, OPTS, ORIN))
    assert len(keys) == 1 + len(FINGERPRINT_CHANGES) + len(OPTION_CHANGES) + 1
    # Only the timing cache file does not change what the engine computes.
    assert cache_key(ONNX_SHA, dataclasses.replace(OPTS, timing_cache=Path("/x/t.cache")), ORIN) == base


def test_store_then_lookup_hits_and_verifies(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    entry = cache.store(ENGINE, ONNX_SHA, OPTS, ORIN, extra={"build": {"seconds": 1.0}})
    found = cache.lookup(ONNX_SHA, OPTS, ORIN)
    assert found.status == "hit" and found.usable and found.entry is not None
    assert found.entry.read_engine() == ENGINE
    manifest = json.loads(entry.manifest_path.read_text())
    assert manifest["engine_sha256"] == hashlib.sha256(ENGINE).hexdigest()
    assert manifest["fingerprint"] == ORIN.to_dict() and manifest["build"] == {"seconds": 1.0}
    assert cache.lookup("cd" * 32, OPTS, ORIN).status == "miss"


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\x00"), "sha256 differs"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(ENGINE) // 2]), "bytes, the manifest says"),
        (lambda p: p.unlink(), "is missing"),
    ],
    ids=["flipped-byte", "truncated", "deleted"],
)
def test_corrupt_engine_is_reported_not_raised(tmp_path: Path, damage: object, words: str) -> None:
    cache = EngineCache(tmp_path)
    entry = cache.store(ENGINE, ONNX_SHA, OPTS, ORIN)
    damage(entry.engine_path)  # type: ignore[operator]
    found = cache.lookup(ONNX_SHA, OPTS, ORIN)
    assert found.status == "corrupt" and not found.usable and words in found.reason


def test_unreadable_manifest_is_corrupt(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    entry = cache.store(ENGINE, ONNX_SHA, OPTS, ORIN)
    entry.manifest_path.write_text("{not json")
    found = cache.lookup(ONNX_SHA, OPTS, ORIN)
    assert found.status == "corrupt" and "unreadable" in found.reason


def test_engine_for_another_device_or_tensorrt_is_named(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(ENGINE, ONNX_SHA, OPTS, ORIN)
    nano = dataclasses.replace(ORIN, gpu_name="Orin Nano", sm_count=8, dla_cores=0)
    found = cache.lookup(ONNX_SHA, OPTS, nano)
    assert found.status == "foreign-device" and not found.usable
    assert "sm_count: 8 here, 16 recorded" in found.reason and "Orin (sm_87, 16 SMs" in found.reason
    upgraded = dataclasses.replace(ORIN, tensorrt="10.7.0")
    found = cache.lookup(ONNX_SHA, OPTS, upgraded)
    assert found.status == "version-mismatch"
    assert "TensorRT 10.3.0" in found.reason and "10.7.0" in found.reason


def test_manifest_copied_under_this_devices_key_is_foreign(tmp_path: Path) -> None:
    """A cache directory copied between devices with files renamed: the manifest's own record wins."""
    cache = EngineCache(tmp_path)
    entry = cache.store(ENGINE, ONNX_SHA, OPTS, ORIN)
    other = dataclasses.replace(ORIN, sm_count=8)
    forged = json.loads(entry.manifest_path.read_text())
    forged["key"] = cache_key(ONNX_SHA, OPTS, other)
    cache.manifest_path(forged["key"]).write_text(json.dumps(forged))
    entry.manifest_path.unlink()
    found = cache.lookup(ONNX_SHA, OPTS, other)
    assert found.status == "foreign-device" and "sm_count" in found.reason


def _chunks_then_fail(data: bytes, fail_after: int) -> Iterator[bytes]:
    for i in range(0, len(data), 65536):
        if i >= fail_after:
            raise OSError(28, "No space left on device (simulated by the chunk source)")
        yield data[i : i + 65536]


def test_failed_write_leaves_the_previous_entry_valid(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(ENGINE, ONNX_SHA, OPTS, ORIN)
    new = bytes(reversed(ENGINE))
    with pytest.raises(OSError, match="No space left"):
        cache.store(_chunks_then_fail(new, len(new) // 2), ONNX_SHA, OPTS, ORIN)
    found = cache.lookup(ONNX_SHA, OPTS, ORIN)
    assert found.status == "hit" and found.entry is not None and found.entry.read_engine() == ENGINE
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if not n.startswith(".lock")] == sorted(
        [found.entry.engine_path.name, found.entry.manifest_path.name]
    ), names


def test_sigkill_mid_write_leaves_the_previous_entry_valid(tmp_path: Path) -> None:
    """A real process killed while writing the engine: the old entry still hits, nothing partial is read."""
    cache = EngineCache(tmp_path)
    cache.store(ENGINE, ONNX_SHA, OPTS, ORIN)
    marker = tmp_path.parent / "writing.marker"
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from retinaedge.runtime.backends.tensorrt.options import BuildOptions
        from retinaedge.runtime.backends.tensorrt.cache import EngineCache
        from retinaedge.runtime.backends.tensorrt.fingerprint import DeviceFingerprint
        fp = DeviceFingerprint.from_values(gpu_name="Orin", compute_capability="8.7", sm_count=16,
            tensorrt="10.3.0", cuda="12.6", l4t="36.4.4", dla_cores=2)
        def chunks():
            yield b"\\x01" * 300000
            Path({str(marker)!r}).write_text("started")
            time.sleep(60)
            yield b"\\x02" * 300000
        EngineCache({str(tmp_path)!r}).store(chunks(), {ONNX_SHA!r}, BuildOptions(precision="fp16", dla_core=0), fp)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:

        def started() -> bool:
            assert proc.poll() is None, "writer exited early"
            return marker.exists()

        wait_until(started, "the writer started", timeout=60, interval=0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    temps = list(tmp_path.glob(".tmp-*"))
    assert temps, "the killed writer should have left its temp file behind"
    found = cache.lookup(ONNX_SHA, OPTS, ORIN)
    assert found.status == "hit" and found.entry is not None and found.entry.read_engine() == ENGINE
    assert sorted(p.name for p in tmp_path.glob("*.engine")) == [found.entry.engine_path.name]
    # The next store (after the stale-temp age) removes what the killed writer left.
    for t in temps:
        os.utime(t, (time.time() - 7200, time.time() - 7200))
    cache.store(ENGINE, "cd" * 32, OPTS, ORIN)
    assert not list(tmp_path.glob(".tmp-*"))


def test_replacing_an_entry_removes_the_old_engine_file(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    first = cache.store(ENGINE, ONNX_SHA, OPTS, ORIN)
    second = cache.store(ENGINE[::-1], ONNX_SHA, OPTS, ORIN)
    assert first.engine_path != second.engine_path and not first.engine_path.exists()
    assert cache.lookup(ONNX_SHA, OPTS, ORIN).entry.read_engine() == ENGINE[::-1]  # type: ignore[union-attr]


def test_size_budget_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path, max_bytes=int(2.5 * len(ENGINE)))
    shas = ["01" * 32, "02" * 32, "03" * 32]
    entries = []
    for i, sha in enumerate(shas[:2]):
        entries.append(cache.store(ENGINE, sha, OPTS, ORIN))
        os.utime(entries[-1].manifest_path, (1000.0 + i, 1000.0 + i))
    assert cache.lookup(shas[0], OPTS, ORIN).status == "hit"  # refreshes the first entry's use time
    cache.store(ENGINE, shas[2], OPTS, ORIN)  # 3 MiB > 2.5 MiB: the least recently used one goes
    assert [cache.lookup(s, OPTS, ORIN).status for s in shas] == ["hit", "miss", "hit"]
    assert cache.total_bytes() <= cache.max_bytes  # type: ignore[operator]
