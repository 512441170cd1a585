"""The accelerator phase in ``report.json`` and ``report.md``: its five headline figures and its levels.

The figures (names are a contract), each ``{value, goal, met, definition, spread, inputs}`` in
``ratios`` beside the CPU-only ratios:

- ``accelerator_fed_fraction``: frames/s through the service, saturated, / the accelerator's capacity at
  the service's batch size, at the named profile (>= 0.95);
- ``max_fed_frames_per_s``: the capacity of the fastest accelerator the service keeps at least 90 % busy
  (>= 500 on 2 cores, single-frame 256 x 256): from the sweep (``b`` falling at a fixed ``a``), the capacity
  at which the accelerator's busy share crosses 90 %, interpolated linearly between the fastest point kept
  above it and the next faster point (:func:`fed_capacity`); the fastest such point when none is faster.
  The sweep's grid steps by 15-35 % in capacity, so a point just above or just below the line would move
  the figure by a whole step between two runs; the crossing does not;
- ``pipeline_cpu_ms_per_frame``: the service process's CPU per frame, all threads, minus the accelerator's
  own CPU inside ``infer``, at saturation (<= 2.0 on the development Xeon);
- ``accelerator_tail_ratio_p99_p50``: p99 / p50 of request latency at 80 % of capacity (<= 2);
- ``accelerator_http_overhead_p50``: (1-client round trip p50 - the accelerator's batch-of-1 time) / that
  time (<= 0.25).

``spread`` is the level's (max - min) / mean of frames/s over its measured windows (:mod:`.steady`).
"""

from __future__ import annotations

from typing import Any

from retinaedge.bench.accelerator import LABEL
from retinaedge.bench.stats import ratio, safe_div

#: Goals: value, higher is better.
ACCEL_GOALS: dict[str, tuple[float, bool]] = {
    "accelerator_fed_fraction": (0.95, True),
    "max_fed_frames_per_s": (500.0, True),
    "pipeline_cpu_ms_per_frame": (2.0, False),
    "accelerator_tail_ratio_p99_p50": (2.0, False),
    "accelerator_http_overhead_p50": (0.25, False),
}


def fed_capacity(points: list[dict[str, Any]], busy_line: float = 0.9) -> float | None:
    """The capacity (frames/s) at which the accelerator's busy share crosses ``busy_line`` over the sweep's
    ``points`` (each with ``capacity_frames_per_s`` and ``accelerator_busy``): linear between the fastest
    point at or above the line and the next faster point below it; that point's capacity when no faster
    point was measured; None when no point reached the line."""
    ordered = sorted(points, key=lambda p: p["capacity_frames_per_s"])
    fed = [i for i, p in enumerate(ordered) if p["accelerator_busy"] >= busy_line]
    if not fed:
        return None
    i = fed[-1]
    lo = ordered[i]
    if i + 1 >= len(ordered):
        return float(lo["capacity_frames_per_s"])
    hi = ordered[i + 1]
    drop = lo["accelerator_busy"] - hi["accelerator_busy"]
    if drop <= 0:
        return float(lo["capacity_frames_per_s"])
    share = (lo["accelerator_busy"] - busy_line) / drop
    return float(
        lo["capacity_frames_per_s"] + share * (hi["capacity_frames_per_s"] - lo["capacity_frames_per_s"])
    )


def accelerator_line(accel: dict[str, Any]) -> str:
    """How the report names the instrument: ``simulated accelerator`` and its profile."""
    p = accel["profile"]
    return f"{LABEL} {p['name']} (a={p['a_ms']:g} ms + b={p['b_ms']:g} ms per frame; {p['source']})"


def _fig(
    name: str,
    value: float | None,
    definition: str,
    level: dict[str, Any] | None,
    inputs: dict[str, Any],
    reason: str | None = None,
) -> dict[str, Any]:
    goal, higher = ACCEL_GOALS[name]
    out = ratio(value, goal=goal, higher_is_better=higher, definition=definition, reason=reason)
    out["spread"] = level.get("spread") if level else None
    out["foreign_cores"] = level.get("foreign_cores") if level else None
    out["stable"] = level.get("stable") if level else None
    out["inputs"] = inputs
    return out


def accelerator_ratios(accel: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
    """The five figures from the phase's raw results (all None, with ``reason``, without the phase)."""
    if accel is None:
        return {
            name: _fig(name, None, "not measured", None, {}, reason=reason or "no accelerator phase")
            for name in ACCEL_GOALS
        }
    batch = accel["batch_size"]
    p = accel["profile"]
    capacity = batch * 1e3 / (p["a_ms"] + p["b_ms"] * batch)
    sat, one, paced, sweep = accel["saturated"], accel["one_client"], accel["paced"], accel["sweep"]
    one_ms = p["a_ms"] + p["b_ms"]
    best = sweep.get("best")
    lat = paced["latency_ms"]
    line = f" ({LABEL} {p['name']})"
    return {
        "accelerator_fed_fraction": _fig(
            "accelerator_fed_fraction",
            safe_div(sat["frames_per_s"], capacity),
            f"frames/s through the service with {accel['clients']} clients / the accelerator's capacity at "
            f"batch {batch}{line}",
            sat,
            {"service_frames_per_s": sat["frames_per_s"], "capacity_frames_per_s": round(capacity, 3)},
        ),
        "max_fed_frames_per_s": _fig(
            "max_fed_frames_per_s",
            fed_capacity(sweep.get("points", [])) if best else None,
            f"capacity of the fastest accelerator (a={sweep['a_ms']:g} ms, b swept) the service keeps >= 90 % "
            f"busy (interpolated between sweep points), {accel['clients']} clients, single-frame instances "
            f"({LABEL})",
            best,
            {
                "b_ms": best["b_ms"] if best else None,
                "busy": best["accelerator_busy"] if best else None,
                "fastest_fed_point_frames_per_s": best["capacity_frames_per_s"] if best else None,
            },
            reason=None if best else "no point of the sweep was kept 90 % busy",
        ),
        "pipeline_cpu_ms_per_frame": _fig(
            "pipeline_cpu_ms_per_frame",
            sat["cpu_ms_per_frame"]["pipeline"],
            "the service process's CPU per frame (all threads, /proc/<pid>/task/*/schedstat, and its child "
            f"processes' threads) minus the accelerator's own CPU inside infer, saturated{line}",
            sat,
            sat["cpu_ms_per_frame"],
        ),
        "accelerator_tail_ratio_p99_p50": _fig(
            "accelerator_tail_ratio_p99_p50",
            safe_div(lat["p99"], lat["p50"]),
            f"p99 / p50 of request latency (from each request's scheduled send) at {paced['rate_per_s']:g} "
            f"requests/s, 80 % of capacity{line}",
            paced,
            {"p50_ms": lat["p50"], "p99_ms": lat["p99"], "requests": lat["n"]},
        ),
        "accelerator_http_overhead_p50": _fig(
            "accelerator_http_overhead_p50",
            safe_div(one["latency_ms"]["p50"] - one_ms, one_ms),
            f"(1-client round trip p50 - the accelerator's {one_ms:g} ms for a batch of 1) / {one_ms:g} ms{line}",
            one,
            {"round_trip_p50_ms": one["latency_ms"]["p50"], "accelerator_ms": one_ms},
        ),
    }


def _level_row(name: str, lvl: dict[str, Any]) -> str:
    cpu = lvl["cpu_ms_per_frame"]
    threads = ", ".join(f"{k} {v:.2f}" for k, v in cpu["by_thread"].items())
    foreign = lvl.get("foreign_cores")
    return (
        f"| {name} | {lvl['requests']} | {lvl['frames_per_s']:.1f} | {lvl['spread']:.3f} "
        f"({'stable' if lvl['stable'] else 'not stable'}) | {lvl['latency_ms']['p50']:.2f} | "
        f"{lvl['latency_ms']['p99']:.2f} | {lvl['accelerator_busy']:.3f} | "
        f"{lvl['accelerator_frames_per_batch']:.2f} | {cpu['pipeline']:.2f} | {threads} | "
        f"{'–' if foreign is None else f'{foreign:.2f}'} |"
    )


#: Cores taken by other processes during a level above which the report warns.
FOREIGN_WARN = 0.2


def accelerator_markdown(report: dict[str, Any]) -> list[str]:
    """The report.md section of the accelerator phase (empty without one)."""
    accel = report.get("accelerator")
    if not accel:
        return []
    idt = accel["identity"]
    lines = [
        f"## Serving against a {LABEL}",
        "",
        f"- accelerator: {accelerator_line(accel)}; service max_batch_size {accel['batch_size']}, "
        f"{accel['clients']} clients when saturated; single-frame instances; reader processes "
        f"{accel.get('reader_processes', 0)}",
        f"- identity: {idt['equal']}/{idt['files']} files answered exactly as `retinaedge detect` "
        f"(batch {accel['reference_batch_size']}) answers them; responses differing in the levels: "
        f"{sum(lvl['responses_differing'] for lvl in levels(accel))}; frames not recorded (run for real): "
        f"{sum(lvl['misses'] for lvl in levels(accel))}",
        *foreign_warning(accel),
        "",
        "| level | requests | frames/s | spread | p50 ms | p99 ms | busy | frames/batch | pipeline CPU "
        "ms/frame | CPU ms/frame by thread | foreign cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        _level_row("1 client", accel["one_client"]),
        _level_row(f"{accel['clients']} clients", accel["saturated"]),
        _level_row(f"paced {accel['paced']['rate_per_s']:.0f}/s", accel["paced"]),
    ]
    for pt in accel["sweep"]["points"]:
        lines.append(_level_row(f"sweep b={pt['b_ms']:g} ({pt['capacity_frames_per_s']:.0f}/s)", pt))
    return [*lines, ""]


def levels(accel: dict[str, Any]) -> list[dict[str, Any]]:
    """Every level of the phase."""
    return [accel["one_client"], accel["saturated"], accel["paced"], *accel["sweep"]["points"]]


def foreign_warning(accel: dict[str, Any]) -> list[str]:
    """A warning line when other processes took more than :data:`FOREIGN_WARN` cores during a level."""
    worst = max((lvl.get("foreign_cores") or 0.0 for lvl in levels(accel)), default=0.0)
    if worst <= FOREIGN_WARN:
        return []
    return [
        f"- **warning**: other processes took up to {worst:.2f} cores during these levels (foreign "
        "cores: the machine's busy CPU minus the service's and the benchmark's own): the CPU figures "
        "are inflated and the rates lowered"
    ]
