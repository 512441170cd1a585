"""The simulated accelerator (a benchmark instrument): profiles, frame keys, the recorded table, replay and
misses on the real demo model, the control file, stable windows, per-thread CPU, the five figures, and
identity with ``retinaedge detect`` through the benchmark's own service. Nothing here is timed: the
accelerator's busy time is computed from its profile, and speed goals live in benchmark reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from retinaedge.bench.accel_report import accelerator_ratios
from retinaedge.bench.accelerator import (
    NAME,
    PROFILES,
    Profile,
    SimulatedAccelerator,
    frame_key,
    load_table,
    parse_profile,
    save_table,
)
from retinaedge.bench.recording import Recorder
from retinaedge.bench.steady import agree, spread
from retinaedge.bench.threadcpu import (
    MAIN,
    cpu_by_group,
    foreign_cores,
    group_name,
    read_threads,
    read_tree,
    system_busy_s,
)
from retinaedge.runtime.backends import Backend, BackendOptions, open_backend
from retinaedge.runtime.backends.registry import choices
from retinaedge.runtime.bundle import Bundle, load_bundle
from retinaedge.runtime.errors import ConfigError
from support.paths import DEMO, EXAMPLES, REPO_ROOT


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle(DEMO)


@pytest.fixture(scope="module")
def frames(bundle: Bundle) -> np.ndarray:
    """Six distinct frames in 0..1 of the demo model's input shape ``(6, C, H, W)``."""
    spec = bundle.manifest.input
    rng = np.random.default_rng(7)
    return rng.random((6, spec.channels, spec.height, spec.width), dtype=np.float32)


def ort(bundle: Bundle) -> Backend:
    return open_backend("onnxruntime", bundle, BackendOptions(threads=1))


def test_profiles_parse_by_name_or_as_a_and_b() -> None:
    orin = parse_profile("orin-agx-r50-512-fp16")
    assert orin is PROFILES["orin-agx-r50-512-fp16"] and "MLPerf" in orin.source
    assert orin.batch_ms(1) == orin.a_ms + orin.b_ms
    given = parse_profile("1,0.5")
    assert (given.a_ms, given.b_ms) == (1.0, 0.5)
    assert given.capacity_fps(8) == pytest.approx(8e3 / 5.0)
    for bad in ("fast", "1", "1,2,3", "-1,2", "0,0"):
        with pytest.raises(ConfigError):
            parse_profile(bad)


def test_it_is_no_backend_the_service_or_detect_can_choose() -> None:
    assert NAME not in choices()


def test_frame_keys_name_frames(frames: np.ndarray) -> None:
    keys = [frame_key(f) for f in frames]
    assert len(set(keys)) == len(keys) and all(len(k) == 16 for k in keys)
    assert frame_key(frames[0].copy()) == keys[0]
    changed = frames[0].copy()
    changed[0, 0, 0] += 0.5  # a sampled pixel
    assert frame_key(changed) != keys[0]


def test_replay_equals_the_model_and_a_miss_runs_it(
    bundle: Bundle, frames: np.ndarray, tmp_path: Path
) -> None:
    recorder = Recorder(ort(bundle))
    expected = recorder.infer(frames[:4])
    assert len(recorder.table) == 4 and recorder.collisions == 0
    save_table(recorder.table, tmp_path / "t.npz")
    table = load_table(tmp_path / "t.npz")
    profile = Profile("tiny", a_ms=0.0, b_ms=0.001, source="test")
    with SimulatedAccelerator(table, profile, lambda: ort(bundle)) as sim:
        got = sim.infer(frames[[2, 0, 1]])
        for name in expected:
            assert np.array_equal(got[name], expected[name][[2, 0, 1]])
        assert sim.counters.miss_frames == 0 and sim.counters.batches == 1
        assert sim.counters.busy_s == pytest.approx(profile.batch_ms(3) / 1e3)
        unseen = sim.infer(frames[4:6])  # not recorded: the real model, counted
        assert sim.counters.miss_frames == 2 and sim.counters.frames == 5
        assert unseen["boxes"].shape[0] == 2
        facts = sim.describe()["simulated_accelerator"]
        assert facts["profile"]["name"] == "tiny" and facts["counters"]["miss_frames"] == 2
    recorder.close()


def test_the_control_file_changes_the_profile(bundle: Bundle, frames: np.ndarray, tmp_path: Path) -> None:
    recorder = Recorder(ort(bundle))
    recorder.infer(frames[:1])
    control = tmp_path / "profile.json"
    control.write_text(json.dumps(Profile("first", 0.0, 0.001, "test").to_json()))
    sim = SimulatedAccelerator(
        recorder.table, Profile("start", 0.0, 0.001, "test"), lambda: ort(bundle), control
    )
    assert sim.profile.name == "first"
    control.write_text(json.dumps(Profile("second", 0.002, 0.0, "test").to_json()))
    os.utime(control, ns=(1, 1))  # a new modification time, whatever the clock's resolution
    sim._control_checked = -1e9  # do not wait for the next look
    sim.infer(frames[:1])
    assert sim.profile.name == "second" and sim.counters.busy_s == pytest.approx(0.002e-3)
    sim.close()
    recorder.close()


def test_windows_agree_within_the_tolerance() -> None:
    assert agree([100.0, 105.0, 95.0], 0.10) and not agree([100.0, 120.0, 80.0], 0.10)
    assert spread([90.0, 100.0, 110.0]) == pytest.approx(0.2)


def test_per_thread_cpu_by_name() -> None:
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    before = read_threads(os.getpid())
    t = threading.Thread(target=spin)
    t.start()
    for _ in range(100_000):  # until the clock ticks have counted some CPU
        after = read_threads(os.getpid())
        if sum(cpu for _, cpu in after.values()) - sum(cpu for _, cpu in before.values()) >= 0.05:
            break
    stop.set()
    t.join()
    assert after[os.getpid()][0] == MAIN
    groups = cpu_by_group(before, after)
    assert sum(groups.values()) > 0 and list(groups.values()) == sorted(groups.values(), reverse=True)
    assert group_name("retinaedge-prepare_3") == "retinaedge-prepare" and group_name("python") == "python"


def test_the_service_cpu_includes_its_child_processes() -> None:
    """Reader processes' CPU counts as the service's (read_tree): a child's threads, by their own names."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        threads = poll_tree(child.pid)
        assert child.pid in threads and threads[child.pid][0] != MAIN
        assert os.getpid() in threads and threads[os.getpid()][0] == MAIN
    finally:
        child.kill()
        child.wait()


def poll_tree(pid: int) -> dict[int, tuple[str, float]]:
    for _ in range(200):  # the child shows once it has started (bounded)
        threads = read_tree(os.getpid())
        if pid in threads:
            return threads
        time.sleep(0.01)
    return read_tree(os.getpid())


def test_foreign_cores_are_what_neither_the_service_nor_the_benchmark_used() -> None:
    busy = system_busy_s()
    assert busy is not None and busy > 0
    before = {"t": 10.0, "system_busy_s": 100.0, "self_cpu_s": 1.0}
    after = {"t": 12.0, "system_busy_s": 103.0, "self_cpu_s": 1.5}
    assert foreign_cores(before, after, service_cpu_s=1.5) == pytest.approx(0.5)
    assert foreign_cores(before, after, service_cpu_s=5.0) == 0.0
    assert foreign_cores({**before, "system_busy_s": None}, after, 1.0) is None


def _level(fps: float, p50: float, p99: float, cpu: float, busy: float) -> dict[str, Any]:
    return {
        "frames_per_s": fps,
        "latency_ms": {"p50": p50, "p99": p99, "n": 200},
        "cpu_ms_per_frame": {"pipeline": cpu, "process": cpu + 0.1, "by_thread": {}},
        "accelerator_busy": busy,
        "spread": 0.05,
        "stable": True,
    }


def test_the_five_figures_from_the_levels() -> None:
    accel = {
        "profile": Profile("p", 4.0, 5.5, "test").to_json(),
        "batch_size": 8,
        "clients": 16,
        "saturated": _level(150.0, 100.0, 120.0, 1.8, 0.96),
        "one_client": _level(80.0, 11.4, 14.0, 2.5, 0.7),
        "paced": {**_level(133.0, 20.0, 50.0, 2.0, 0.8), "rate_per_s": 133.3},
        "sweep": {
            "a_ms": 1.0,
            "points": [
                {**_level(240.0, 50.0, 60.0, 2.0, 0.95), "capacity_frames_per_s": 242.4, "b_ms": 4.0},
                {**_level(300.0, 50.0, 60.0, 2.0, 0.6), "capacity_frames_per_s": 470.6, "b_ms": 2.0},
            ],
        },
    }
    accel["sweep"]["best"] = accel["sweep"]["points"][0]
    r = accelerator_ratios(accel, None)
    assert r["accelerator_fed_fraction"]["value"] == pytest.approx(150.0 / (8e3 / 48.0), abs=1e-4)
    assert r["accelerator_fed_fraction"]["met"] is False
    # Where the busy share crosses 90 % between the two points: 95 % at 242.4, 60 % at 470.6 frames/s.
    crossing = 242.4 + (0.95 - 0.9) / (0.95 - 0.6) * (470.6 - 242.4)
    assert r["max_fed_frames_per_s"]["value"] == pytest.approx(crossing, abs=0.1)
    assert r["max_fed_frames_per_s"]["met"] is False
    assert r["pipeline_cpu_ms_per_frame"]["value"] == 1.8 and r["pipeline_cpu_ms_per_frame"]["met"] is True
    assert r["accelerator_tail_ratio_p99_p50"]["value"] == 2.5
    assert r["accelerator_http_overhead_p50"]["value"] == pytest.approx(0.2)
    assert all("simulated accelerator" in f["definition"] and f["spread"] == 0.05 for f in r.values())
    skipped = accelerator_ratios(None, "--no-accelerator")
    assert all(f["value"] is None and f["reason"] == "--no-accelerator" for f in skipped.values())


def test_answers_through_the_simulated_accelerator_equal_detect(bundle: Bundle, tmp_path: Path) -> None:
    """The first pass, then the benchmark's own service on it: every box of every file equals what
    ``retinaedge detect`` prints for the same files."""
    from retinaedge.bench.accel_phase import accel_service, identity, write_control
    from retinaedge.bench.http_phase import Client
    from retinaedge.bench.recording import record

    files = [
        *sorted((EXAMPLES / "study_01").glob("*.dcm"))[:3],
        *sorted((EXAMPLES / "study_01_multiframe").glob("*.dcm")),
    ]
    rec = record({"model": str(DEMO), "threads": 1, "instances": [[str(f), 1] for f in files]}, tmp_path)
    control = tmp_path / "profile.json"
    write_control(control, Profile("tiny", 0.5, 0.1, "test"))
    detect = subprocess.run(
        [sys.executable, "-m", "retinaedge.runtime.cli", "detect", "--model", str(DEMO), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert detect.returncode == 0, detect.stderr[-2000:]
    printed = [json.loads(line) for line in detect.stdout.strip().splitlines()]
    assert sum(len(d["detections"]) for p in printed for d in p["frames"]) > 0
    with accel_service(bundle, Path(rec["table"]), control, 1, 4, 2, tmp_path) as service:
        assert identity(service.port, [str(f) for f in files], rec["results"])["equal"] == len(files)
        client = Client(service.port)
        try:
            for path, expected in zip(files, printed, strict=True):
                answer = client.detect(path.read_bytes())[1]
                assert answer["frames"] == expected["frames"], path.name
                assert answer["sop_instance_uid"] == expected["sop_instance_uid"]
            status, body = client.request("GET", "/readyz")
        finally:
            client.close()
        ready = json.loads(body)
        assert ready["backend"] == NAME
        counters = ready["engine"][NAME]["simulated_accelerator"]["counters"]
        # The self-test and warm-up ran for real (misses); every posted frame was replayed.
        posted = sum(len(p["frames"]) for p in printed)
        assert counters["frames"] - counters["miss_frames"] == 2 * posted
    assert service.exit_code == 0


def test_max_fed_is_where_the_busy_share_crosses_the_line_between_sweep_points() -> None:
    from retinaedge.bench.accel_report import fed_capacity

    def pt(fps: float, busy: float) -> dict[str, float]:
        return {"capacity_frames_per_s": fps, "accelerator_busy": busy}

    # 96 % busy at 242 frames/s, 84 % at 320: the line is crossed half-way.
    assert fed_capacity([pt(320, 0.84), pt(242, 0.96), pt(180, 0.99)]) == pytest.approx(281.0)
    assert fed_capacity([pt(242, 0.96)]) == 242.0  # nothing faster measured
    assert fed_capacity([pt(320, 0.80), pt(242, 0.85)]) is None  # never fed
    # A faster point that was busier (noise) does not extrapolate: the crossing is past the last fed point.
    assert fed_capacity([pt(242, 0.91), pt(320, 0.93), pt(400, 0.70)]) == pytest.approx(
        320 + 0.03 / 0.23 * 80
    )
