"""The accelerator phase: the service measured against the simulated accelerator (:mod:`.accelerator`).

1. the first pass (:mod:`.recording`, its own process): ``model.onnx`` on every frame, the reference
   results and the table the accelerator replays;
2. the service (:mod:`.accel_serve`) with ``max_batch_size`` ``--accelerator-batch``; each distinct file
   posted once and compared with the reference (identity);
3. at the profile: 1 client back to back; ``2 x batch`` clients back to back (saturation); the same
   clients paced at 80 % of the accelerator's capacity;
4. a sweep of ``b`` at a fixed ``a`` (``--accelerator-sweep``), saturated, until the service twice in a row
   keeps the accelerator less than 90 % busy. The profile changes in the running service through a control file.

Every level is a :func:`~.steady.run_level` (windows until stable, >= ``--level-requests`` requests);
single-frame instances only. Each level records frames/s with its spread over the windows, latency, the
accelerator's busy fraction, misses, responses that differ from the reference, and the service's CPU by
thread (:mod:`.threadcpu`) minus the accelerator's own CPU inside ``infer``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinaedge.bench.accelerator import CONTROL_CHECK_S, NAME, Profile, parse_profile
from retinaedge.bench.http_phase import Client, Service, running_service
from retinaedge.bench.stats import summarize
from retinaedge.bench.steady import Level, run_level, spread
from retinaedge.bench.threadcpu import cpu_by_group, foreign_cores, read_tree, system_busy_s
from retinaedge.runtime.errors import BenchmarkError

if TYPE_CHECKING:
    from retinaedge.bench.inputs import Instance
    from retinaedge.runtime.bundle import Bundle

log = logging.getLogger(__name__)

#: The service keeps the accelerator at least this busy for a sweep point to count (max_fed_frames_per_s).
FED_BUSY = 0.9
#: The paced level's rate, as a fraction of the accelerator's capacity.
PACED_LOAD = 0.8


def write_control(path: Path, profile: Profile) -> None:
    """Tell the running service's accelerator to use ``profile`` (atomic replace)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.to_json()))
    tmp.replace(path)


@contextlib.contextmanager
def accel_service(
    bundle: Bundle,
    table: Path,
    control: Path,
    threads: int,
    batch: int,
    clients: int,
    work: Path,
    reader_processes: int = 0,
) -> Iterator[Service]:
    """The service with the simulated accelerator as its backend (see :mod:`.accel_serve`)."""
    env = {
        "RETINAEDGE_BACKEND": NAME,
        "RETINAEDGE_QUEUE_SIZE": str(clients + 1),  # the benchmark's clients, never a 503
        "RETINAEDGE_CAPTURES": "never",  # no secondary captures: not the pipeline this phase measures
        "RETINAEDGE_READER_PROCESSES": str(reader_processes),
    }
    prefix = [sys.executable, "-m", "retinaedge.bench.accel_serve", str(table), str(control)]
    model = bundle.root or bundle.model_path
    with running_service(model, threads, batch, work, extra_env=env, command_prefix=prefix) as service:
        yield service


def engine_facts(ready: dict[str, Any]) -> dict[str, Any]:
    """The serving backend's facts in a ``/readyz`` body (under the backend's name)."""
    engine = ready.get("engine") or {}
    return dict(engine.get(str(ready.get("backend")), {}))


def probe_of(service: Service) -> Any:
    """A probe for :func:`run_level`: the time, the service's threads' CPU and the accelerator's counters."""
    client = Client(service.port)

    def probe() -> dict[str, Any]:
        status, body = client.request("GET", "/readyz")
        sim = engine_facts(json.loads(body)).get("simulated_accelerator", {})
        return {
            "t": time.perf_counter(),
            "threads": read_tree(service.proc.pid),  # its reader processes included
            "system_busy_s": system_busy_s(),
            "self_cpu_s": time.process_time(),  # the benchmark's own clients
            **sim,
        }

    return probe


def level_figures(level: Level, references: list[Any], capacity_fps: float) -> dict[str, Any]:
    """What one level measured (see the module docstring)."""
    before, after = level.before, level.measured[-1].probe
    done = level.done
    frames = sum(d.frames for d in done)
    seconds = level.seconds
    by_thread = cpu_by_group(before["threads"], after["threads"])
    cb, ca = before.get("counters", {}), after.get("counters", {})
    sim_cpu = ca.get("cpu_s", 0.0) - cb.get("cpu_s", 0.0)
    process_cpu = sum(by_thread.values())
    fps = [w.frames_per_s for w in level.measured]
    differ = sum(1 for d in done if d.answer.get("frames") != references[d.body]["frames"])
    foreign = foreign_cores(before, after, process_cpu)
    return {
        "requests": len(done),
        "frames": frames,
        "seconds": round(seconds, 3),
        "frames_per_s": round(frames / seconds, 3),
        "windows": len(level.windows),
        "window_frames_per_s": [round(x, 2) for x in fps],
        "spread": round(spread(fps), 4),
        "stable": level.stable,
        "stopped_by": level.stopped_by,
        "latency_ms": summarize([d.latency_ms for d in done]),
        "accelerator_busy": round((ca.get("busy_s", 0.0) - cb.get("busy_s", 0.0)) / seconds, 4),
        "accelerator_frames_per_batch": round(
            (ca.get("frames", 0) - cb.get("frames", 0)) / max(1, ca.get("batches", 0) - cb.get("batches", 0)),
            3,
        ),
        "capacity_frames_per_s": round(capacity_fps, 3),
        "misses": ca.get("miss_frames", 0) - cb.get("miss_frames", 0),
        # Cores other processes used meanwhile (not the service, not the benchmark's clients): > 0.2
        # means the figures were taken under foreign load.
        "foreign_cores": None if foreign is None else round(foreign, 3),
        "client_cpu_ms_per_frame": round((after["self_cpu_s"] - before["self_cpu_s"]) * 1e3 / frames, 3),
        "responses_differing": differ,
        "cpu_ms_per_frame": {
            "process": round(process_cpu * 1e3 / frames, 3),
            "accelerator_infer": round(sim_cpu * 1e3 / frames, 3),
            # Where /proc counts the process in 10 ms clock ticks (no schedstat), the accelerator's own CPU
            # is finer: on a level too short for the ticks the difference could dip below 0.
            "pipeline": round(max(0.0, process_cpu - sim_cpu) * 1e3 / frames, 3),
            "by_thread": {k: round(v * 1e3 / frames, 3) for k, v in by_thread.items()},
        },
    }


def set_profile(control: Path, profile: Profile, port: int, body: bytes, probe: Any) -> None:
    """Switch the running accelerator to ``profile``: it reads the control file before a batch, so
    requests are posted until it reports the new one (at most 10 s)."""
    write_control(control, profile)
    client = Client(port)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(2 * CONTROL_CHECK_S)
            client.detect(body)
            p = probe().get("profile") or {}
            if p.get("a_ms") == profile.a_ms and p.get("b_ms") == profile.b_ms:
                return
    finally:
        client.close()
    raise BenchmarkError(f"the simulated accelerator did not take profile {profile.name} within 10 s")


def accelerator_phase(
    args: argparse.Namespace, bundle: Bundle, plan: list[Instance], threads: int, work: Path
) -> dict[str, Any]:
    """Run the phase; its raw figures for the report (:mod:`.accel_report`)."""
    from retinaedge.bench.processes import run_process

    profile = parse_profile(args.accelerator)
    batch = args.accelerator_batch
    clients = 2 * batch
    spec = {
        "model": str(bundle.root or bundle.model_path),
        "threads": threads,
        "instances": [[str(i.path.resolve()), i.frames] for i in plan],
    }
    rec = run_process(
        "retinaedge.bench.recording", None, spec, work, args.runner_timeout, "accelerator-record"
    )
    paths = list(rec["results"])
    frames_of = {str(i.path.resolve()): i.frames for i in plan}
    single = [p for p in paths if frames_of[p] == 1] or paths
    bodies = [(Path(p).read_bytes(), frames_of[p]) for p in single]
    references = [rec["results"][p] for p in single]
    control = work / "accelerator-profile.json"
    write_control(control, profile)
    bound = {"min_requests": args.level_requests, "max_seconds": args.level_seconds}
    out: dict[str, Any] = {
        "profile": profile.to_json(),
        "batch_size": batch,
        "clients": clients,
        "recorded_frames": rec["frames"],
        "key_collisions": rec["collisions"],
        "reference_batch_size": rec["batch_size"],
    }
    out["reader_processes"] = args.accelerator_reader_processes
    with accel_service(
        bundle, Path(rec["table"]), control, threads, batch, clients, work, args.accelerator_reader_processes
    ) as service:
        probe = probe_of(service)
        out["identity"] = identity(service.port, paths, rec["results"])
        cap = profile.capacity_fps(batch)
        log.info("accelerator %s: 1 client", profile.name)
        out["one_client"] = level_figures(
            run_level(service.port, bodies, 1, probe=probe, **bound), references, cap
        )
        out["one_client"]["accelerator_batch_ms"] = profile.batch_ms(1)
        log.info("accelerator %s: %d clients", profile.name, clients)
        out["saturated"] = level_figures(
            run_level(service.port, bodies, clients, probe=probe, **bound), references, cap
        )
        rate = PACED_LOAD * cap
        log.info("accelerator %s: %d clients at %.0f requests/s", profile.name, clients, rate)
        out["paced"] = level_figures(
            run_level(service.port, bodies, clients, rate_per_s=rate, probe=probe, **bound), references, cap
        )
        out["paced"]["rate_per_s"] = round(rate, 3)
        out["sweep"] = sweep(args, service.port, bodies, references, clients, batch, control, probe, bound)
        out["startup_s"] = service.startup_s
    out["exit_code"] = service.exit_code
    return out


def sweep(
    args: argparse.Namespace,
    port: int,
    bodies: list[tuple[bytes, int]],
    references: list[Any],
    clients: int,
    batch: int,
    control: Path,
    probe: Any,
    bound: dict[str, Any],
) -> dict[str, Any]:
    """Saturated levels at ``a`` fixed and ``b`` falling, until two in a row keep the accelerator less than
    90 % busy."""
    a = args.accelerator_sweep_a
    points = []
    for b in sorted(args.accelerator_sweep, reverse=True):
        profile = Profile(name=f"sweep a={a:g} b={b:g}", a_ms=a, b_ms=b, source="sweep")
        set_profile(control, profile, port, bodies[0][0], probe)
        log.info("accelerator sweep: a=%g ms, b=%g ms (%.0f frames/s)", a, b, profile.capacity_fps(batch))
        level = run_level(port, bodies, clients, probe=probe, **bound)
        point = {"a_ms": a, "b_ms": b, **level_figures(level, references, profile.capacity_fps(batch))}
        points.append(point)
        if len(points) >= 2 and all(p["accelerator_busy"] < FED_BUSY for p in points[-2:]):
            break  # two in a row: one point just under the line may be noise
    fed = [p for p in points if p["accelerator_busy"] >= FED_BUSY]
    best = max(fed, key=lambda p: p["capacity_frames_per_s"], default=None)
    return {"a_ms": a, "points": points, "best": best}


def identity(port: int, paths: list[str], results: dict[str, Any]) -> dict[str, Any]:
    """Each distinct file posted once: does the service's answer equal the first pass's, every box?"""
    client = Client(port)
    differing = []
    try:
        for p in paths:
            answer = client.detect(Path(p).read_bytes())[1]
            if answer.get("frames") != results[p]["frames"]:
                differing.append(Path(p).name)
    finally:
        client.close()
    return {"files": len(paths), "equal": len(paths) - len(differing), "differing": differing}


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 0, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The accelerator phase's options of the ``benchmark`` verb."""
    from retinaedge.bench.accelerator import DEFAULT_PROFILE, PROFILES

    p.add_argument(
        "--accelerator",
        default=DEFAULT_PROFILE,
        help="the simulated accelerator the service is measured against (a benchmark instrument, never a "
        f"backend): a profile ({', '.join(PROFILES)}; docs/operations.md) or 'a,b' (a + b*n ms per batch of "
        "n frames) (default %(default)s)",
    )
    p.add_argument("--no-accelerator", action="store_true", help="skip the simulated-accelerator phase")
    p.add_argument(
        "--accelerator-batch",
        type=int,
        default=8,
        help="the service's max_batch_size in that phase (default 8)",
    )
    p.add_argument(
        "--accelerator-sweep",
        type=_float_list,
        default=[8.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.75, 0.5],
        help="b values (ms per frame) of the sweep behind max_fed_frames_per_s, run from the largest down until "
        "two in a row keep the accelerator less than 90 %% busy (default 8,6,4,3,2,1.5,1,0.75,0.5)",
    )
    p.add_argument(
        "--accelerator-sweep-a", type=float, default=1.0, help="a (ms per batch) during the sweep (default 1)"
    )
    p.add_argument(
        "--accelerator-reader-processes",
        type=int,
        default=0,
        help="the service's reader_processes during this phase (default 0: readers in threads)",
    )
    p.add_argument(
        "--level-requests",
        type=int,
        default=200,
        help="requests in a level's measured windows, at least (default 200): a level runs until its last "
        "three windows agree within 10 %% in frames/s",
    )
    p.add_argument(
        "--level-seconds",
        type=float,
        default=60.0,
        help="a level stops after this long, stable or not (default 60)",
    )


def check_options(args: argparse.Namespace) -> None:
    """Refuse impossible values before anything runs (ConfigError)."""
    from retinaedge.runtime.errors import ConfigError

    if args.no_accelerator:
        return
    parse_profile(args.accelerator)
    if args.accelerator_batch < 1:
        raise ConfigError(f"--accelerator-batch must be >= 1, got {args.accelerator_batch}")
    if args.accelerator_reader_processes < 0:
        raise ConfigError(
            f"--accelerator-reader-processes must be >= 0, got {args.accelerator_reader_processes}"
        )
    if args.level_requests < 3:
        raise ConfigError(f"--level-requests must be >= 3 (one per window), got {args.level_requests}")
    if not args.level_seconds > 0:
        raise ConfigError(f"--level-seconds must be > 0, got {args.level_seconds}")
    if not args.accelerator_sweep_a >= 0 or (args.accelerator_sweep_a == 0 and 0 in args.accelerator_sweep):
        raise ConfigError("--accelerator-sweep-a must be >= 0, and a + b > 0 at every sweep point")
