"""Device parsers on recorded outputs of real Jetsons (each fixture file names its source)."""

from __future__ import annotations

from pathlib import Path

import pytest
from retinaedge.device.l4t import jetpack_for_l4t, parse_nv_tegra_release
from retinaedge.device.linux import parse_cpuinfo, parse_meminfo, parse_nvidia_smi
from retinaedge.device.module import identify_module, parse_compatible, parse_device_tree_model
from retinaedge.device.power import parse_jetson_clocks, parse_nvpmodel
from retinaedge.device.tegrastats import TegrastatsSample, parse_tegrastats_line
from support.paths import DEVICE_FIXTURES

TEGRASTATS = DEVICE_FIXTURES / "tegrastats"
TREES = DEVICE_FIXTURES / "trees"


def recorded_lines(name: str) -> list[str]:
    """The recorded tegrastats lines of a fixture (header lines start with '#')."""
    text = (TEGRASTATS / f"{name}.txt").read_text()
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def recorded_output(path: Path) -> str:
    """A recorded command output or file: everything after the one-line '# source:' header."""
    header, _, body = path.read_text().partition("\n")
    assert header.startswith("# source: https://github.com/"), path
    return body


def first(name: str) -> TegrastatsSample:
    sample = parse_tegrastats_line(recorded_lines(name)[0])
    assert sample is not None
    return sample


# --- tegrastats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(TEGRASTATS.glob("*.txt")), ids=lambda p: p.stem)
def test_every_recorded_line_parses_with_a_source(path: Path) -> None:
    assert path.read_text().startswith("# source: https://github.com/")
    lines = recorded_lines(path.stem)
    assert lines
    for line in lines:
        sample = parse_tegrastats_line(line)
        assert sample is not None
        assert sample.ram_total_mb and sample.cpus and sample.rails and sample.temperatures_c


def test_jetson_nano_pom_rails_without_units() -> None:
    s = first("nano")
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb, s.swap_total_mb) == (1180, 3965, 149, 1024)
    assert [c.load_pct for c in s.cpus] == [30, 33, 28, 26] and {c.freq_mhz for c in s.cpus} == {1036}
    assert (s.gpu_load_pct, s.gpu_freq_mhz, s.emc_load_pct, s.emc_freq_mhz) == (0, (76,), 10, 1600)
    assert s.temperatures_c == {
        "PLL": 57.0,
        "CPU": 60.5,
        "PMIC": 100.0,
        "GPU": 59.0,
        "AO": 65.0,
        "thermal": 59.75,
    }
    assert s.rails["POM_5V_IN"].current_mw == 4520 and s.rails["POM_5V_IN"].average_mw == 4680
    assert s.rails["POM_5V_CPU"].current_mw == 1078 and s.rails["POM_5V_CPU"].average_mw == 1205
    assert s.rails["POM_5V_GPU"].current_mw == 0
    assert s.input_power_mw == 4520
    assert s.timestamp is None


def test_jetson_tx2_vdd_rails_without_units() -> None:
    s = first("tx2")
    assert [c.load_pct for c in s.cpus] == [55, 14, 27, 55, 47, 45]
    assert [c.freq_mhz for c in s.cpus] == [2035, 2034, 2034, 2035, 2035, 2035]
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (71, (1300,))
    assert s.temperatures_c["BCPU"] == 45.0 and s.temperatures_c["thermal"] == 46.4
    assert set(s.rails) == {"VDD_IN", "VDD_CPU", "VDD_GPU", "VDD_SOC", "VDD_WIFI", "VDD_DDR"}
    assert (s.rails["VDD_GPU"].current_mw, s.rails["VDD_GPU"].average_mw) == (6854, 6903)
    assert s.input_power_mw == 14025


def test_agx_xavier_short_rail_names() -> None:
    s = first("xavier_agx")
    assert (s.ram_used_mb, s.ram_total_mb) == (2086, 15825)
    assert len(s.cpus) == 8 and s.cpus[1].freq_mhz == 2229
    assert (s.gpu_load_pct, s.gpu_freq_mhz, s.emc_freq_mhz) == (0, (905,), 2133)
    assert s.temperatures_c["CPU"] == 31.5 and s.temperatures_c["Tdiode"] == 33.0
    assert set(s.rails) == {"GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"}
    assert (s.rails["GPU"].current_mw, s.rails["GPU"].average_mw) == (618, 540)
    assert s.rails["SYS5V"].current_mw == 2934
    assert s.input_power_mw is None  # AGX modules have no single input rail


def test_xavier_nx_mw_rails() -> None:
    s = first("xavier_nx")
    assert s.timestamp == "06-25-2025 09:41:10"
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb) == (2170, 6855, 283)
    assert len(s.cpus) == 6 and s.cpus[0].freq_mhz == 1420
    assert (s.gpu_freq_mhz, s.emc_freq_mhz) == ((1109,), 1866)
    assert s.temperatures_c["CPU"] == 41.5 and s.temperatures_c["PMIC"] == 50.0
    assert (s.rails["VDD_CPU_GPU_CV"].current_mw, s.rails["VDD_CPU_GPU_CV"].average_mw) == (940, 919)
    assert s.input_power_mw == 5480


def test_orin_nx_bracketed_gpc_clock_and_lowercase_sensors() -> None:
    s = first("orin_nx")
    assert (s.ram_used_mb, s.ram_total_mb) == (3408, 15657)
    assert [c.freq_mhz for c in s.cpus] == [960, 806, 806, 806, 729, 729, 729, 729]
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, (305,))
    assert s.temperatures_c["tj"] == 55.5 and s.temperatures_c["cv2"] == 51.25
    assert set(s.rails) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    assert (s.rails["VDD_CPU_GPU_CV"].current_mw, s.rails["VDD_CPU_GPU_CV"].average_mw) == (1011, 990)
    assert s.input_power_mw == 5469


def test_agx_orin_32gb_drops_powered_off_sensors() -> None:
    s = first("agx_orin_32gb")
    assert (s.ram_used_mb, s.ram_total_mb) == (6589, 30587)
    assert len(s.cpus) == 12 and s.cpus[4].load_pct == 33
    assert (s.gpu_load_pct, s.gpu_freq_mhz, s.emc_freq_mhz) == (0, (1300,), 3199)
    assert "CV0" not in s.temperatures_c and "CV1" not in s.temperatures_c  # printed as -256C
    assert s.temperatures_c["CPU"] == 52.593 and s.temperatures_c["tj"] == 52.593
    assert s.rails["VDD_GPU_SOC"].current_mw == 4368 and s.rails["VIN_SYS_5V0"].current_mw == 4233
    assert s.rails["VDDQ_VDD2_1V8AO"].current_mw == 403 and s.rails["NC"].current_mw == 0


def test_agx_orin_64gb_two_gpc_clocks() -> None:
    s = first("agx_orin_64gb")
    assert (s.ram_used_mb, s.ram_total_mb) == (25620, 62841)
    assert s.gpu_freq_mhz == (1300, 1300)
    assert s.temperatures_c["tboard"] == 34.375 and s.temperatures_c["gpu"] == 39.781
    assert set(s.rails) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"}
    assert s.rails["VDD_GPU_SOC"].current_mw == 5191


def test_agx_orin_r36_average_differs_from_current() -> None:
    s = parse_tegrastats_line(recorded_lines("agx_orin_r36")[1])
    assert s is not None
    assert s.timestamp == "05-09-2026 18:42:07"
    assert [c.load_pct for c in s.cpus][:4] == [16, 6, 4, 4]
    assert (s.emc_load_pct, s.emc_freq_mhz, s.gpu_freq_mhz) == (3, 2133, (0, 0))
    assert (s.rails["VIN_SYS_5V0"].current_mw, s.rails["VIN_SYS_5V0"].average_mw) == (4607, 4657)


def test_agx_orin_r39_peak_values() -> None:
    s = first("agx_orin_r39")
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb) == (20642, 62817, None)
    assert (s.gpu_load_pct, s.gpu_freq_mhz, s.emc_load_pct, s.emc_freq_mhz) == (12, (1300, 1300), 3, 3199)
    assert s.temperatures_c == {"cpu": 52.968, "soc2": 48.406, "soc0": 49.531, "gpu": 47.625}
    rail = s.rails["VDD_GPU_SOC"]
    assert (rail.current_mw, rail.average_mw, rail.peak_mw) == (5139, 5139, 5139)
    assert s.rails["VIN_SYS_5V0"].current_mw == 5500


def test_thor_gpu_clocks_without_load() -> None:
    s = first("thor_r38")
    assert (s.ram_used_mb, s.ram_total_mb) == (4208, 125773)
    assert len(s.cpus) == 14 and s.cpus[10].load_pct == 3
    assert (s.gpu_load_pct, s.gpu_freq_mhz, s.emc_freq_mhz) == (None, (0, 0, 0), 665)
    assert s.temperatures_c == {"cpu": 34.468, "tj": 34.5, "soc012": 33.781, "soc345": 34.5}
    assert set(s.rails) == {"VDD_GPU", "VDD_CPU_SOC_MSS", "VIN_SYS_5V0"}
    second = parse_tegrastats_line(recorded_lines("thor_r38")[1])
    assert second is not None
    assert (second.rails["VDD_CPU_SOC_MSS"].current_mw, second.rails["VDD_CPU_SOC_MSS"].average_mw) == (
        4923,
        4544,
    )
    assert second.cpus[9].freq_mhz == 2601


def test_offline_cores_and_non_tegrastats_lines() -> None:
    line = "RAM 2690/6854MB (lfb 6x1MB) CPU [3%@1904,off,off] EMC_FREQ 0%@1600 VDD_IN 5079mW/5079mW"
    s = parse_tegrastats_line(line)
    assert s is not None
    assert [c.online for c in s.cpus] == [True, False, False] and s.cpus[1].load_pct is None
    assert parse_tegrastats_line("NVPM WARN: fan mode is not set!") is None
    assert parse_tegrastats_line("") is None


# --- /etc/nv_tegra_release -----------------------------------------------------------------------------


def test_l4t_r32_nano() -> None:
    release = parse_nv_tegra_release(recorded_output(DEVICE_FIXTURES / "nv_tegra_release" / "r32_5_1.txt"))
    assert release is not None
    assert (release.version, release.major, release.revision) == ("32.5.1", 32, "5.1")
    assert (release.board, release.gcid, release.jetpack) == ("t210ref", "26202423", "4.5.1")
    assert release.date == "Fri Feb 19 16:45:52 UTC 2021"


def test_l4t_r36_orin_and_r38_thor() -> None:
    orin = parse_nv_tegra_release(recorded_output(DEVICE_FIXTURES / "nv_tegra_release" / "r36_4_4.txt"))
    thor = parse_nv_tegra_release(recorded_output(DEVICE_FIXTURES / "nv_tegra_release" / "r38_4_0.txt"))
    assert orin is not None and thor is not None
    assert (orin.version, orin.board, orin.gcid, orin.jetpack) == ("36.4.4", "generic", "41062509", "6.2.1")
    assert (thor.version, thor.jetpack) == ("38.4.0", "7.1")


def test_l4t_full_file_and_garbage() -> None:
    release = parse_nv_tegra_release((TREES / "orin_nano" / "etc" / "nv_tegra_release").read_text())
    assert release is not None and release.version == "36.4.4"
    assert parse_nv_tegra_release("TARGET_USERSPACE_LIB_DIR=nvidia\n") is None


@pytest.mark.parametrize(
    ("l4t", "jetpack"),
    [
        ("35.4.1", "5.1.2"),
        ("35.6.2", "5.1.x"),
        ("36.2", "6.0 DP"),
        ("36.3.0", "6.0"),
        ("36.4.0", "6.1"),
        ("36.4.3", "6.2"),
        ("36.4.7", "6.1/6.2"),
        ("38.2.0", "7.0"),
        ("38.9.1", "7.x"),
        ("39.2.0", "7.2"),
        ("28.1.0", None),
    ],
)
def test_jetpack_table(l4t: str, jetpack: str | None) -> None:
    assert jetpack_for_l4t(l4t) == jetpack


# --- device tree --------------------------------------------------------------------------------------


def test_orin_nano_device_tree() -> None:
    dt = TREES / "orin_nano" / "proc" / "device-tree"
    model = parse_device_tree_model((dt / "model").read_bytes())
    compatible = parse_compatible((dt / "compatible").read_bytes())
    assert model == "NVIDIA Jetson Orin Nano Developer Kit"
    assert compatible == ("nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0005", "nvidia,tegra234")
    info = identify_module(compatible, model)
    assert (info.part_number, info.carrier, info.module) == (
        "p3767-0005",
        "p3768-0000",
        "Jetson Orin Nano 8GB (devkit, SD)",
    )
    assert (info.soc, info.soc_family, info.gpu_architecture, info.super_mode) == (
        "tegra234",
        "Orin",
        "Ampere",
        False,
    )


@pytest.mark.parametrize(
    ("compatible", "part", "module", "family", "super_mode"),
    [
        (
            b"nvidia,p3768-0000+p3767-0005-super\0nvidia,tegra234\0",
            "p3767-0005",
            "Jetson Orin Nano 8GB (devkit, SD)",
            "Orin",
            True,
        ),
        (
            b"nvidia,p3737-0000+p3701-0005\0nvidia,p3701-0005\0nvidia,tegra234\0",
            "p3701-0005",
            "Jetson AGX Orin 64GB",
            "Orin",
            False,
        ),
        (
            b"nvidia,p3509-0000+p3767-0000\0nvidia,tegra234\0",
            "p3767-0000",
            "Jetson Orin NX 16GB",
            "Orin",
            False,
        ),
        (
            b"nvidia,p2822-0000+p2888-0001\0nvidia,tegra194\0",
            "p2888-0001",
            "Jetson AGX Xavier 16GB",
            "Xavier",
            False,
        ),
        (
            b"nvidia,p3449-0000-b00+p3448-0000-b00\0nvidia,jetson-nano\0nvidia,tegra210\0",
            None,
            None,
            "Nano/TX1",
            False,
        ),
        (b"nvidia,tegra264\0", None, None, "Thor", False),
    ],
)
def test_module_table(
    compatible: bytes, part: str | None, module: str | None, family: str, super_mode: bool
) -> None:
    info = identify_module(parse_compatible(compatible))
    assert (info.part_number, info.module, info.soc_family, info.super_mode) == (
        part,
        module,
        family,
        super_mode,
    )


# --- nvpmodel / jetson_clocks ------------------------------------------------------------------------


def test_nvpmodel_with_warning_line() -> None:
    mode = parse_nvpmodel(recorded_output(DEVICE_FIXTURES / "nvpmodel" / "nano_maxn.txt"))
    assert mode is not None and (mode.name, mode.id) == ("MAXN", 0)
    assert parse_nvpmodel("NV Power Mode: 15W\n2\n") is not None
    assert parse_nvpmodel("nvpmodel: command not found") is None


def test_jetson_clocks_pinned_tx1() -> None:
    state = parse_jetson_clocks(recorded_output(DEVICE_FIXTURES / "jetson_clocks" / "tx1_pinned.txt"))
    assert state is not None
    assert (state.soc_family, state.machine, state.pinned, state.emc_override) == (
        "tegra210",
        "jetson_tx1",
        True,
        True,
    )
    assert len(state.cpus) == 4 and {c.governor for c in state.cpus} == {"interactive"}
    assert {(c.min_mhz, c.max_mhz, c.current_mhz) for c in state.cpus} == {(1734.0, 1734.0, 1734.0)}
    assert state.gpu is not None and (state.gpu.min_mhz, state.gpu.max_mhz) == (998.4, 998.4)
    assert state.emc is not None and (state.emc.min_mhz, state.emc.max_mhz) == (12.75, 1600.0)
    assert state.power_mode is None


def test_jetson_clocks_not_pinned_tx2() -> None:
    state = parse_jetson_clocks(recorded_output(DEVICE_FIXTURES / "jetson_clocks" / "tx2.txt"))
    assert state is not None
    assert (state.soc_family, state.machine, state.pinned, state.emc_override) == (
        "tegra186",
        "quill",
        False,
        False,
    )
    assert [c.online for c in state.cpus] == [True, False, False, True, True, True]
    assert (state.cpus[3].min_mhz, state.cpus[3].max_mhz, state.cpus[3].current_mhz) == (
        345.6,
        2035.2,
        1881.6,
    )
    assert state.gpu is not None and (state.gpu.min_mhz, state.gpu.max_mhz) == (114.75, 1134.75)
    assert state.power_mode == "MAXP_CORE_ARM"


def test_jetson_clocks_without_root_shows_nothing() -> None:
    assert parse_jetson_clocks("Error: Run this script(/usr/bin/jetson_clocks) as a root user\n") is None


# --- generic Linux ------------------------------------------------------------------------------------


def test_x86_cpuinfo_and_meminfo() -> None:
    cpu = parse_cpuinfo((TREES / "x86" / "proc" / "cpuinfo").read_text())
    mem = parse_meminfo((TREES / "x86" / "proc" / "meminfo").read_text())
    assert (cpu.model, cpu.logical_cpus) == ("AMD EPYC", 2)
    assert mem.total_mb == pytest.approx(24683656 / 1024)
    assert mem.available_mb is not None and 0 < mem.available_mb <= mem.total_mb


def test_arm_cpuinfo_names_the_core() -> None:
    cpu = parse_cpuinfo((TREES / "orin_nano" / "proc" / "cpuinfo").read_text())
    mem = parse_meminfo((TREES / "orin_nano" / "proc" / "meminfo").read_text())
    assert (cpu.model, cpu.logical_cpus) == ("Cortex-A78AE", 6)
    assert mem.total_mb == 7620.0 and mem.swap_total_mb == 3810.0


def test_nvidia_smi_csv() -> None:
    gpus = parse_nvidia_smi("NVIDIA A100-SXM4-80GB, 81920 MiB, 535.104.05\nTesla T4, [N/A], [N/A]\n\n")
    assert [(g.name, g.memory_total_mb, g.driver_version) for g in gpus] == [
        ("NVIDIA A100-SXM4-80GB", 81920.0, "535.104.05"),
        ("Tesla T4", None, None),
    ]
    assert parse_nvidia_smi("") == ()
