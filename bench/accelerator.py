"""The simulated accelerator: an instrument of the benchmark, never a backend the service can choose.

It stands for an inference engine that runs off the CPU (a TensorRT engine on a Jetson's GPU). A batch of
``n`` frames takes ``a + b * n`` milliseconds of wall time (:class:`Profile`), during which the calling
thread sleeps: it holds neither a core nor the GIL, as a thread waiting on a CUDA stream does. It returns
the outputs ``model.onnx`` gave for the same frames, recorded by :mod:`.recording` in a first pass and
looked up by :func:`frame_key`, so every response is a real result and identity can be checked.

A frame that was not recorded (the golden self-test, the warm-up's zero frames) runs through a real ONNX
Runtime session instead and is counted as a miss; the benchmark checks that its measured levels had none.

The service finds this backend only in the process :mod:`.accel_serve` starts, which registers it under
:data:`NAME` before the service reads its settings; the registry of every other process (``retinaedge
serve``, ``detect``) never knows the name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from retinaedge.runtime.backends.base import Backend, BackendOptions
from retinaedge.runtime.errors import ConfigError

if TYPE_CHECKING:
    from retinaedge.runtime.bundle import Bundle

log = logging.getLogger(__name__)

#: The name the benchmark's own service process registers this backend under.
NAME = "simulated-accelerator"
#: Every report line that shows figures made with it carries these words.
LABEL = "simulated accelerator"
OUTPUTS = ("num_detections", "boxes", "scores", "labels")
#: Stride of the pixel sample a frame key hashes (rows and columns).
KEY_STRIDE = 4
#: How often the accelerator looks whether its control file changed (s).
CONTROL_CHECK_S = 0.05


@dataclass(frozen=True)
class Profile:
    """``a_ms + b_ms * n`` milliseconds per batch of ``n`` frames; ``source`` says where it comes from."""

    name: str
    a_ms: float
    b_ms: float
    source: str

    def batch_ms(self, n: int) -> float:
        """Wall time of one batch of ``n`` frames (ms)."""
        return self.a_ms + self.b_ms * n

    def capacity_fps(self, n: int) -> float:
        """Frames/s when every batch holds ``n`` frames and batches follow each other without a gap."""
        return n * 1e3 / self.batch_ms(n)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: Named profiles (docs/operations.md shows the arithmetic of each).
PROFILES: dict[str, Profile] = {
    "orin-agx-r50-512-fp16": Profile(
        name="orin-agx-r50-512-fp16",
        a_ms=4.0,
        b_ms=5.5,
        source="Jetson AGX Orin, RetinaNet R50-FPN 512x512 FP16, derived from NVIDIA's MLPerf Inference v3.1 "
        "closed edge results for Orin_TRT retinanet (ResNeXt50-FPN 800x800 INT8: SingleStream p50 11.56 ms, "
        "Offline 148.7 samples/s), scaled by pixels (0.41) and INT8->FP16 (x2)",
    ),
    "orin-agx-r50-512-int8": Profile(
        name="orin-agx-r50-512-int8",
        a_ms=2.0,
        b_ms=2.75,
        source="the same MLPerf v3.1 Orin_TRT retinanet figures scaled by pixels only (INT8 kept)",
    ),
}
DEFAULT_PROFILE = "orin-agx-r50-512-fp16"


def parse_profile(text: str) -> Profile:
    """A named profile (:data:`PROFILES`) or ``a,b`` in milliseconds (argparse type)."""
    if text in PROFILES:
        return PROFILES[text]
    parts = text.split(",")
    try:
        a, b = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"--accelerator expects a profile name ({', '.join(PROFILES)}) or 'a,b' in ms, got {text!r}"
        ) from None
    if not (a >= 0 and b >= 0 and a + b > 0):
        raise ConfigError(f"--accelerator a,b must be >= 0 and not both 0, got {text!r}")
    return Profile(name=f"a={a:g} ms, b={b:g} ms", a_ms=a, b_ms=b, source="given on the command line")


def frame_key(image: np.ndarray) -> bytes:
    """16 bytes naming one preprocessed frame ``(C, H, W)`` float32: its shape and a strided pixel sample
    (every :data:`KEY_STRIDE`-th row and column, about 4 % of the pixels: microseconds, not the
    milliseconds hashing a whole 512 x 512 frame takes)."""
    sample = np.ascontiguousarray(image[:, ::KEY_STRIDE, ::KEY_STRIDE])
    h = hashlib.blake2b(repr(image.shape).encode(), digest_size=16)
    h.update(sample.tobytes())
    return h.digest()


Table = dict[bytes, dict[str, np.ndarray]]


def save_table(table: Table, path: Path) -> None:
    """Write the recorded per-frame outputs (``.npz``: keys and the four contract outputs stacked)."""
    keys = list(table)
    arrays: dict[str, Any] = {name: np.stack([table[k][name] for k in keys]) for name in OUTPUTS}
    arrays["keys"] = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), 16)
    np.savez(path, **arrays)


def load_table(path: Path) -> Table:
    """The table :func:`save_table` wrote."""
    with np.load(path) as data:
        keys = [bytes(row) for row in data["keys"]]
        return {k: {name: data[name][i] for name in OUTPUTS} for i, k in enumerate(keys)}


@dataclass
class Counters:
    """What the simulated accelerator did (seconds are wall time unless named cpu)."""

    batches: int = 0
    frames: int = 0
    miss_frames: int = 0
    busy_s: float = 0.0  # simulated batches' wall time (a + b n each)
    cpu_s: float = 0.0  # the calling thread's CPU inside infer (key lookup, stacking, misses)


class SimulatedAccelerator(Backend):
    """Replays recorded outputs after ``a + b * n`` ms of sleep; a miss runs the real model."""

    name = NAME
    providers = (LABEL,)

    def __init__(
        self,
        table: Table,
        profile: Profile,
        open_fallback: Callable[[], Backend],
        control: Path | None = None,
    ) -> None:
        """``control``: a JSON file holding a :class:`Profile`, looked at every :data:`CONTROL_CHECK_S`
        (the benchmark rewrites it to change ``a`` and ``b`` without restarting the service)."""
        self.table = table
        self.profile = profile
        self.reason = f"{LABEL} {profile.name}: a={profile.a_ms:g} ms + b={profile.b_ms:g} ms per frame"
        self._open_fallback = open_fallback
        self._fallback: Backend | None = None
        self.counters = Counters()
        self._lock = threading.Lock()
        self._control = control
        self._control_mtime = -1
        self._control_checked = 0.0
        self._check_control()

    def _check_control(self) -> None:
        now = time.monotonic()
        if self._control is None or now - self._control_checked < CONTROL_CHECK_S:
            return
        self._control_checked = now
        try:
            mtime = self._control.stat().st_mtime_ns
            if mtime != self._control_mtime:
                self.profile = Profile(**json.loads(self._control.read_text()))
                self._control_mtime = mtime
                log.info("%s: profile %s", LABEL, self.profile.name)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("%s: control file unreadable (%s); profile %s kept", LABEL, exc, self.profile.name)

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        t0, c0 = time.perf_counter(), time.thread_time()
        self._check_control()
        rows = [self.table.get(frame_key(img)) for img in images]
        if all(r is not None for r in rows):
            out = {name: np.stack([r[name] for r in rows if r is not None]) for name in OUTPUTS}
            cpu = time.thread_time() - c0
            busy = self.profile.batch_ms(len(rows)) / 1e3
            time.sleep(max(0.0, t0 + busy - time.perf_counter()))
            miss = 0
        else:  # not recorded: the real model, at its real cost
            if self._fallback is None:
                self._fallback = self._open_fallback()
            out = self._fallback.infer(images)
            cpu, busy, miss = time.thread_time() - c0, 0.0, len(rows)
        with self._lock:
            c = self.counters
            c.batches += 1
            c.frames += len(rows)
            c.miss_frames += miss
            c.busy_s += busy
            c.cpu_s += cpu
        return out

    def describe(self) -> dict[str, Any]:
        with self._lock:
            counters = asdict(self.counters)
        return {"simulated_accelerator": {"profile": self.profile.to_json(), "counters": counters}}

    def close(self) -> None:
        if self._fallback is not None:
            self._fallback.close()
            self._fallback = None


#: Set by :mod:`.accel_serve` before the service opens its backend: the table file and the profile file.
_CONFIG: dict[str, Path] = {}


def configure(table_path: Path, control_path: Path) -> None:
    """What :func:`open` will use (called once in the benchmark's service process)."""
    _CONFIG.update(table=table_path, control=control_path)


def open(bundle: Bundle, options: BackendOptions) -> Backend:  # noqa: A001 (the registry's factory name)
    """The registry factory: the configured table and profile, ONNX Runtime for misses."""
    from retinaedge.runtime.backends.registry import open_backend

    if not _CONFIG:
        raise ConfigError(f"{NAME} is the benchmark's instrument: only retinaedge.bench.accel_serve opens it")
    table = load_table(_CONFIG["table"])
    control = _CONFIG["control"]
    profile = Profile(**json.loads(control.read_text()))
    log.info("%s: %d recorded frame(s), profile %s", LABEL, len(table), profile.name)
    return SimulatedAccelerator(
        table,
        profile,
        lambda: open_backend("onnxruntime", bundle, BackendOptions(threads=options.threads)),
        control,
    )
