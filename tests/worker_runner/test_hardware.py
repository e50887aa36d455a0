"""Hardware detection and the account of what is free (``ResourcePool``)."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from labcloud.contract import HardwareSpec
from worker_runner.hardware import (
    GpuInfo,
    HostHardware,
    Reservation,
    ResourcePool,
    detect_gpus,
    detect_hardware,
    gpus_needed,
    parse_meminfo,
    parse_nvidia_smi,
)


def offered(pool: ResourcePool) -> dict[str, str | int] | None:
    """The hardware query of the pull the pool's capacity makes."""
    capacity = pool.capacity()
    return None if capacity is None else capacity.query()


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


T4 = tuple(GpuInfo(str(i), "Tesla T4", 15360, "7.5") for i in range(3))


def test_offer_is_what_is_free() -> None:
    pool = ResourcePool(HostHardware(cpu_cores=8, memory=32000, gpus=T4), slots=4)
    assert offered(pool) == {
        "memory": 32000,
        "cpu_cores": 8,
        "gpus": 3,
        "gpu_mem": 15360,
        "gpu_model": "Tesla T4",
        "gpu_archi": "7.5",
    }
    big = pool.reserve(HardwareSpec(cpu_cores=6, memory=20000, gpus=2))
    assert big is not None
    assert (big.cpu_cores, big.cpus, big.memory) == (6, 6.0, 20000)
    assert [gpu.index for gpu in big.gpus] == ["0", "1"]
    assert offered(pool) == {
        "memory": 12000,
        "cpu_cores": 2,
        "gpus": 1,
        "gpu_mem": 15360,
        "gpu_model": "Tesla T4",
        "gpu_archi": "7.5",
    }
    last_gpu = pool.reserve(HardwareSpec(gpu_mem=8000))
    assert last_gpu is not None and [gpu.index for gpu in last_gpu.gpus] == ["2"]
    # No GPU free: the pull says so, and no GPU property is sent.
    assert offered(pool) == {"memory": 12000 - 8000, "cpu_cores": 2, "gpus": 0, "gpu_mem": 0}
    assert pool.reserve(HardwareSpec(gpus=1)) is None
    pool.release(big)
    offer = offered(pool)
    assert offer is not None and (offer["gpus"], offer["cpu_cores"]) == (2, 8)
    assert pool.running == 1


def test_jobs_without_needs_get_an_even_share() -> None:
    pool = ResourcePool(HostHardware(cpu_cores=2, memory=8000), slots=4)
    shares = [pool.reserve(HardwareSpec()) for _ in range(4)]
    # Memory is divided; CPU is a limit, not a reservation: four light jobs share
    # two cores.
    assert [(r.cpu_cores, r.cpus, r.memory) for r in shares if r] == [(0, 1.0, 2000)] * 4
    assert offered(pool) is None  # every slot is taken
    assert pool.reserve(HardwareSpec()) is None
    for reservation in shares:
        assert reservation is not None
        pool.release(reservation)
    assert offered(pool) == {"memory": 8000, "cpu_cores": 2, "gpus": 0, "gpu_mem": 0}


def test_a_job_without_memory_need_gets_what_is_left() -> None:
    pool = ResourcePool(HostHardware(cpu_cores=4, memory=8000), slots=2)
    assert pool.reserve(HardwareSpec(memory=7000)) is not None
    small = pool.reserve(HardwareSpec())
    assert small is not None and small.memory == 1000
    assert offered(pool) is None


def test_nothing_is_offered_without_a_free_core_or_memory() -> None:
    pool = ResourcePool(HostHardware(cpu_cores=4, memory=8000), slots=4)
    assert pool.reserve(HardwareSpec(cpu_cores=4)) is not None
    assert offered(pool) is None
    pool = ResourcePool(HostHardware(cpu_cores=4, memory=8000), slots=4)
    assert pool.reserve(HardwareSpec(memory=8000)) is not None
    assert offered(pool) is None


def test_gpu_kinds_are_offered_in_turn_and_matched() -> None:
    a100 = GpuInfo("0", "NVIDIA A100-SXM4-80GB", 81920, "8.0")
    rtx = GpuInfo("1", "NVIDIA GeForce RTX 3090", 24576, "8.6")
    pool = ResourcePool(HostHardware(cpu_cores=8, memory=64000, gpus=(a100, rtx)), slots=2)
    models = set()
    for _ in range(2):
        offer = offered(pool)
        assert offer is not None and offer["gpus"] == 1
        models.add(offer["gpu_model"])
    assert models == {a100.model, rtx.model}
    wanted = pool.reserve(HardwareSpec(gpu_archi="8.6"))
    assert wanted is not None and wanted.gpus == (rtx,)
    assert pool.reserve(HardwareSpec(gpu_mem=30000, gpu_model=rtx.model)) is None
    big = pool.reserve(HardwareSpec(gpu_mem=30000))
    assert big is not None and big.gpus == (a100,)


def test_unfit_reason() -> None:
    pool = ResourcePool(HostHardware(cpu_cores=4, memory=8000, gpus=T4[:1]), slots=1)
    assert pool.unfit_reason(HardwareSpec(cpu_cores=4, memory=8000, gpus=1)) is None
    assert pool.unfit_reason(HardwareSpec(cpu_cores=5)) == (
        "the job needs 5 CPU cores but this worker has 4"
    )
    assert pool.unfit_reason(HardwareSpec(memory=9000)) == (
        "the job needs 9000 MiB of memory but this worker has 8000"
    )
    assert pool.unfit_reason(HardwareSpec(gpus=2)) == (
        "the job needs 2 suitable GPU(s) but this worker has 1"
    )
    assert pool.unfit_reason(HardwareSpec(gpu_model="A100")) == (
        "the job needs 1 suitable GPU(s) but this worker has 0"
    )
    cpu_only = ResourcePool(HostHardware(cpu_cores=4, memory=8000), slots=1)
    assert cpu_only.unfit_reason(HardwareSpec(gpu_mem=1)) == (
        "the job needs a GPU but this worker has none"
    )


@pytest.mark.parametrize(
    ("hardware", "gpus"),
    [
        (HardwareSpec(), 0),
        (HardwareSpec(gpu_mem=0), 0),
        (HardwareSpec(gpu_mem=1), 1),
        (HardwareSpec(gpu_model="A10"), 1),
        (HardwareSpec(gpu_archi="8.6"), 1),
        (HardwareSpec(gpus=0, gpu_archi="8.6"), 1),
        (HardwareSpec(gpus=3), 3),
    ],
)
def test_gpus_needed(hardware: HardwareSpec, gpus: int) -> None:
    assert gpus_needed(hardware) == gpus


def test_reservations_are_thread_safe() -> None:
    pool = ResourcePool(HostHardware(cpu_cores=64, memory=64000, gpus=T4), slots=64)
    taken: list[Reservation] = []
    lock = threading.Lock()

    def grab() -> None:
        for _ in range(20):
            reservation = pool.reserve(HardwareSpec(cpu_cores=1, memory=100, gpus=1))
            if reservation is not None:
                with lock:
                    taken.append(reservation)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(gpu.index for r in taken for gpu in r.gpus) == ["0", "1", "2"]
