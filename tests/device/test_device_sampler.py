"""TegrastatsSampler: a real subprocess (a stand-in script replaying recorded lines) and energy integration."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from retinaedge.device.sampler import TegrastatsSampler, summarize
from retinaedge.device.tegrastats import TegrastatsSample, parse_tegrastats_line
from support.polling import poll
from support.tegrastats import make_stand_in, recorded


def sample(line: str) -> TegrastatsSample:
    parsed = parse_tegrastats_line(line)
    assert parsed is not None
    return parsed


def test_trapezoidal_energy_matches_hand_computation() -> None:
    # Recorded Thor lines (VDD_CPU_SOC_MSS 4165, 4923, 4544 mW; VIN_SYS_5V0 4126, 4327, 4428 mW)
    # stamped at t = 10.0, 11.0 and 12.5 s.
    lines = [sample(line) for line in recorded("thor_r38")]
    pairs = [(12.5, lines[2]), (10.0, lines[0]), (11.0, lines[1])]  # order of arrival must not matter
    summary = summarize(pairs)
    # (4165 + 4923) / 2 * 1.0 + (4923 + 4544) / 2 * 1.5 = 4544.0 + 7100.25 = 11644.25 mJ
    cpu = summary.rails["VDD_CPU_SOC_MSS"]
    assert cpu.energy_j == pytest.approx(11.64425)
    assert cpu.mean_w == pytest.approx(11.64425 / 2.5)
    assert cpu.peak_w == pytest.approx(4.923)
    # (4126 + 4327) / 2 * 1.0 + (4327 + 4428) / 2 * 1.5 = 4226.5 + 6566.25 = 10792.75 mJ
    assert summary.rails["VIN_SYS_5V0"].energy_j == pytest.approx(10.79275)
    assert summary.rails["VDD_GPU"].energy_j == 0.0
    assert (summary.samples, summary.duration_s) == (3, pytest.approx(2.5))
    assert summary.peak_temperatures_c["cpu"] == 35.25 and summary.peak_temperatures_c["soc012"] == 36.062
    assert summary.peak_gpu_load_pct is None and summary.throttling_seen is None


def test_single_and_no_sample() -> None:
    one = summarize([(5.0, sample(recorded("orin_nx")[0]))])
    assert one.rails["VDD_IN"].energy_j == 0.0 and one.rails["VDD_IN"].mean_w == pytest.approx(5.469)
    assert one.peak_gpu_load_pct == 0
    empty = summarize([])
    assert (empty.samples, empty.rails, empty.duration_s) == (0, {}, 0.0)


def test_sampler_runs_a_real_subprocess_and_integrates(tmp_path: Path) -> None:
    script, pidfile = make_stand_in(tmp_path, "agx_orin_r36")
    sampler = TegrastatsSampler(interval_ms=20, command=[str(script)])
    with sampler:
        # only a failing run waits this long
        poll(lambda: len(sampler.samples) >= 6, timeout=60.0, interval=0.01)
    summary = sampler.summary
    assert summary is not None
    samples = sampler.samples
    assert summary.samples == len(samples) >= 6
    # Hand-computed trapezoid over the arrival times the sampler recorded.
    expected_mj = 0.0
    for (t0, s0), (t1, s1) in zip(samples[:-1], samples[1:], strict=True):
        expected_mj += (
            (s0.rails["VIN_SYS_5V0"].current_mw + s1.rails["VIN_SYS_5V0"].current_mw) / 2 * (t1 - t0)
        )
    duration = samples[-1][0] - samples[0][0]
    assert duration > 0 and summary.duration_s == pytest.approx(duration)
    assert summary.rails["VIN_SYS_5V0"].energy_j == pytest.approx(expected_mj / 1000)
    assert 4.607 <= summary.rails["VIN_SYS_5V0"].mean_w <= 4.707
    # VDD_GPU_SOC is a constant 2412 mW in every recorded line: energy = P * duration.
    assert summary.rails["VDD_GPU_SOC"].energy_j == pytest.approx(2.412 * duration)
    assert summary.peak_temperatures_c["cpu"] == 52.562
    # stop() terminated and reaped the subprocess.
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert sampler.stop() is summary  # idempotent


def test_sampler_ignores_lines_that_are_not_tegrastats(tmp_path: Path) -> None:
    script = tmp_path / "noise"
    script.write_text(f"#!{sys.executable}\nimport time\nprint('hello', flush=True)\ntime.sleep(30)\n")
    script.chmod(0o755)
    sampler = TegrastatsSampler(interval_ms=50, command=[str(script)]).start()
    time.sleep(0.2)
    summary = sampler.stop()
    assert summary.samples == 0 and summary.rails == {}


def test_sampler_missing_command_and_bad_interval(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        TegrastatsSampler(command=[str(tmp_path / "no-such-tegrastats")]).start()
    with pytest.raises(ValueError, match="interval_ms"):
        TegrastatsSampler(interval_ms=0)
    with pytest.raises(RuntimeError, match="not started"):
        TegrastatsSampler().stop()
