"""``retinaedge device``: the collector on fake roots, with stand-in commands that print recorded outputs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from retinaedge.device.collect import CommandRunner, collect
from retinaedge.device.device_cli import add_arguments, run
from support.paths import DEVICE_FIXTURES

ORIN_NANO = DEVICE_FIXTURES / "trees" / "orin_nano"
X86 = DEVICE_FIXTURES / "trees" / "x86"
NOT_ROOT = "Error: Run this script(/usr/bin/jetson_clocks) as a root user\n"


def recorded_output(path: Path) -> str:
    """A recorded command output: everything after the one-line '# source:' header."""
    return path.read_text().partition("\n")[2]


def stand_in(bin_dir: Path, name: str, stdout: str = "", exit_code: int = 0, sleep_s: float = 0.0) -> None:
    """A small executable that prints ``stdout`` (a recorded output) and exits with ``exit_code``."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(
        f"#!{sys.executable}\nimport sys, time\ntime.sleep({sleep_s})\n"
        f"sys.stdout.write({stdout!r})\nsys.exit({exit_code})\n"
    )
    script.chmod(0o755)


def namespace(root: Path, bin_dir: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--root", str(root), "--command-path", str(bin_dir), *extra])


def test_orin_nano_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bin_dir = tmp_path / "bin"
    stand_in(bin_dir, "nvpmodel", recorded_output(DEVICE_FIXTURES / "nvpmodel" / "nano_maxn.txt"))
    stand_in(bin_dir, "jetson_clocks", NOT_ROOT, exit_code=1)
    stand_in(bin_dir, "nvidia-smi", "must not be asked on a Jetson, 1 MiB, 0\n")
    assert run(namespace(ORIN_NANO, bin_dir)) == 0
    report = json.loads(capsys.readouterr().out)
    jetson = report["jetson"]
    assert jetson["l4t"]["version"] == "36.4.4" and jetson["l4t"]["jetpack"] == "6.2.1"
    module = jetson["module"]
    assert module["model"] == "NVIDIA Jetson Orin Nano Developer Kit"
    assert module["part_number"] == "p3767-0005" and module["soc"] == "tegra234"
    assert module["compatible"] == ["nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0005", "nvidia,tegra234"]
    assert jetson["power_mode"] == {"name": "MAXN", "id": 0}
    assert jetson["clocks"] is None  # jetson_clocks --show refused: not root
    assert report["nvidia_gpus"] == []
    assert report["cpu"] == {"model": "Cortex-A78AE", "logical_cpus": 6}
    assert report["memory"]["total_mb"] == 7620.0
    assert report["kernel"] == "5.15.148-tegra" and report["machine"] is None
    assert report["versions"]["cuda"] == "12.6.68"
    assert report["versions"]["tensorrt"] is None  # not installed here: null, not an error
    assert isinstance(report["cpu_affinity"], int) and report["cpu_affinity"] >= 1


def test_orin_nano_pinned_clocks_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bin_dir = tmp_path / "bin"
    stand_in(bin_dir, "nvpmodel", recorded_output(DEVICE_FIXTURES / "nvpmodel" / "nano_maxn.txt"))
    stand_in(bin_dir, "jetson_clocks", recorded_output(DEVICE_FIXTURES / "jetson_clocks" / "tx1_pinned.txt"))
    assert run(namespace(ORIN_NANO, bin_dir, "--table")) == 0
    out = capsys.readouterr().out
    assert "L4T / JetPack  36.4.4 / 6.2.1" in out
    assert "Jetson Orin Nano 8GB (devkit, SD) (p3767-0005)" in out
    assert "power mode     MAXN (id 0)" in out
    assert "clocks pinned  yes" in out
    assert "clock in sync  ?" in out  # another root: the live clock is not read


def test_x86_with_nvidia_smi(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bin_dir = tmp_path / "bin"
    stand_in(bin_dir, "nvidia-smi", "NVIDIA A100-SXM4-80GB, 81920 MiB, 535.104.05\n")
    assert run(namespace(X86, bin_dir)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["jetson"] is None
    assert report["nvidia_gpus"] == [
        {"name": "NVIDIA A100-SXM4-80GB", "memory_total_mb": 81920.0, "driver_version": "535.104.05"}
    ]
    assert report["cpu"] == {"model": "AMD EPYC", "logical_cpus": 2}
    assert report["memory"]["total_mb"] == pytest.approx(24683656 / 1024)
    assert report["versions"]["cuda"] is None


def test_missing_files_and_commands_give_nulls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty_root = tmp_path / "root"
    empty_root.mkdir()
    (empty_root / "etc").mkdir()
    (empty_root / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 3.0, GCID: 1\n")
    assert run(namespace(empty_root, tmp_path / "no-bin")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cpu"] is None and report["memory"] is None and report["kernel"] is None
    assert report["jetson"]["l4t"]["jetpack"] == "6.0"
    assert report["jetson"]["module"] is None
    assert report["jetson"]["power_mode"] is None and report["jetson"]["clocks"] is None


def test_command_timeout_gives_none(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    stand_in(bin_dir, "nvpmodel", "NV Power Mode: 15W\n0\n", sleep_s=10)
    runner = CommandRunner(search_path=str(bin_dir), timeout_s=0.3)
    assert runner(["nvpmodel", "-q"]) is None
    report = collect(ORIN_NANO, runner)
    assert report.jetson is not None and report.jetson.power_mode is None


def test_bad_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(namespace(tmp_path / "missing", tmp_path)) == 2
    assert "not a directory" in capsys.readouterr().err


def test_module_entry_point_without_heavy_imports() -> None:
    code = textwrap.dedent(
        f"""
        import json, sys, io, contextlib
        from retinaedge.device import collect, sampler
        from retinaedge.device import device_cli as cli
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            status = cli.main(["--root", {str(X86)!r}, "--command-path", ""])
        heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "tensorrt", "pycuda", "onnxruntime")]
        others = [m for m in sys.modules if m.startswith("retinaedge.") and not m.startswith("retinaedge.device")]
        print(json.dumps({{"status": status, "heavy": heavy, "others": others, "report": json.loads(buf.getvalue())}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == 0 and out["heavy"] == [] and out["others"] == []
    assert out["report"]["cpu"]["model"] == "AMD EPYC"
