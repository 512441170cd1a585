"""The benchmark's energy meter on a real subprocess replaying recorded tegrastats lines of real modules."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from retinaedge.bench.worker import EnergyMeter
from retinaedge.device.tegrastats import parse_tegrastats_line
from support.polling import wait_until
from support.tegrastats import make_stand_in, recorded


def workload(meter: EnergyMeter, seconds: float, min_samples: int) -> None:
    """At least ``seconds`` of "work", and on until the stand-in's lines reached ``min_samples`` inside the
    window (a loaded machine starts the stand-in late: waited for, not assumed)."""
    time.sleep(seconds)
    wait_until(
        lambda: sum(t >= meter.window[0] for t, _ in meter.sampler.samples) >= min_samples,
        f"{min_samples} tegrastats lines in the window",
        timeout=60,
        interval=0.01,
    )


@pytest.mark.parametrize(("fixture", "rail"), [("orin_nx", "VDD_IN"), ("nano", "POM_5V_IN")])
def test_energy_per_frame_from_the_input_rail(tmp_path: Path, fixture: str, rail: str) -> None:
    script, _ = make_stand_in(tmp_path, fixture)
    watts = [parse_tegrastats_line(line).rails[rail].current_mw / 1000 for line in recorded(fixture)]  # type: ignore[union-attr]
    started = time.monotonic()
    with EnergyMeter(interval_ms=40, command=(str(script),)) as meter:
        workload(meter, 0.8, min_samples=5)
    elapsed = time.monotonic() - started  # the with-block and its pads, measured from outside
    result = meter.result(frames=16)
    assert result["available"] is True and result["input_rail"] == rail
    assert result["samples_during_workload"] >= 5
    assert 0.795 <= result["workload_s"] <= elapsed + 0.001  # the block's time, not the pads'
    assert result["workload_s"] < elapsed - 2 * meter.pad_s + 0.01
    mean_w = result["rails"][rail]["mean_w"]
    assert min(watts) - 1e-9 <= mean_w <= max(watts) + 1e-9  # a time-weighted mean of recorded values
    assert result["energy_per_frame_j"] == pytest.approx(
        mean_w * result["workload_s"] / 16, rel=2e-3
    )  # workload_s: ms
    assert result["peak_temperatures_c"] and result["peak_ram_used_mb"] > 0


def test_agx_orin_has_no_input_rail_and_says_so(tmp_path: Path) -> None:
    script, _ = make_stand_in(tmp_path, "agx_orin_64gb")
    with EnergyMeter(interval_ms=40, command=(str(script),)) as meter:
        workload(meter, 0.4, min_samples=2)
    result = meter.result(frames=4)
    assert result["available"] is True and result["input_rail"] is None
    assert result["energy_per_frame_j"] is None and "input rail" in result["reason"] and result["rails"]


def test_without_tegrastats_the_reason_is_recorded() -> None:
    with EnergyMeter(command=("retinaedge-no-such-tegrastats",)) as meter:
        pass
    result = meter.result(frames=4)
    assert result == {
        "available": False,
        "reason": "retinaedge-no-such-tegrastats not found (not a Jetson, or not on PATH)",
    }
