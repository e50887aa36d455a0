"""Hardware detection and the resources each slot advertises."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from worker_runner.hardware import (
    GpuInfo,
    HostHardware,
    detect_gpus,
    detect_hardware,
    parse_meminfo,
    parse_nvidia_smi,
)

# Captured from `nvidia-smi --query-gpu=index,name,memory.total,compute_cap
# --format=csv,noheader,nounits` on a two-GPU host.
NVIDIA_SMI_SAMPLE = """\
0, NVIDIA GeForce RTX 3090, 24576, 8.6
1, NVIDIA A100-SXM4-80GB, 81920, 8.0
"""

MEMINFO_SAMPLE = """\
MemTotal:       24683564 kB
MemFree:         1546208 kB
MemAvailable:   20391184 kB
"""


def test_parse_nvidia_smi() -> None:
    assert parse_nvidia_smi(NVIDIA_SMI_SAMPLE) == [
        GpuInfo(index="0", model="NVIDIA GeForce RTX 3090", memory=24576, archi="8.6"),
        GpuInfo(index="1", model="NVIDIA A100-SXM4-80GB", memory=81920, archi="8.0"),
    ]


def test_parse_nvidia_smi_skips_unreadable_lines() -> None:
    text = "\n0, Tesla T4, [N/A], 7.5\nNo devices were found\n1, Tesla T4, 15360, 7.5\n"
    assert parse_nvidia_smi(text) == [
        GpuInfo(index="1", model="Tesla T4", memory=15360, archi="7.5")
    ]


def test_parse_meminfo() -> None:
    assert parse_meminfo(MEMINFO_SAMPLE) == 24683564 // 1024
    with pytest.raises(ValueError, match="MemTotal"):
        parse_meminfo("MemFree: 1 kB\n")


def test_detect_gpus_without_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_gpus() == []


def test_detect_gpus_runs_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "nvidia-smi"
    # Only shell built-ins: PATH holds nothing but the fake.
    lines = "".join(f"echo '{line}'\n" for line in NVIDIA_SMI_SAMPLE.splitlines())
    script.write_text(f"#!/bin/sh\n{lines}")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert [gpu.model for gpu in detect_gpus()] == [
        "NVIDIA GeForce RTX 3090",
        "NVIDIA A100-SXM4-80GB",
    ]
    script.write_text("#!/bin/sh\necho 'driver not loaded' >&2\nexit 9\n")
    assert detect_gpus() == []


def test_detect_hardware_on_this_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    detected = detect_hardware()
    assert detected.cpu_cores >= 1
    assert detected.memory > 100
    assert detected.gpus == ()
    assert detect_hardware(cpu_cores=3, memory=1000) == HostHardware(3, 1000)


def test_slots_split_the_host() -> None:
    gpus = tuple(GpuInfo(str(i), "Tesla T4", 15360, "7.5") for i in range(3))
    host = HostHardware(cpu_cores=8, memory=32000, gpus=gpus)
    first, second = host.split(2)
    assert (first.cpu_cores, first.memory) == (4, 16000)
    assert [gpu.index for gpu in first.gpus] == ["0", "2"]
    assert [gpu.index for gpu in second.gpus] == ["1"]
    assert first.pull_params() == {
        "memory": 16000,
        "cpu_cores": 4,
        "gpu_mem": 15360,
        "gpu_model": "Tesla T4",
        "gpu_archi": "7.5",
    }
    [only] = HostHardware(cpu_cores=1, memory=2000).split(1)
    assert only.pull_params() == {"memory": 2000, "cpu_cores": 1, "gpu_mem": 0}
    assert HostHardware(cpu_cores=2, memory=1000).split(4)[3].cpu_cores == 1
