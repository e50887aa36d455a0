"""What this host offers: CPU cores, memory and NVIDIA GPUs.

The runner advertises these in every pull (``memory``, ``cpu_cores``, ``gpu_mem``,
``gpu_model``, ``gpu_archi``) so the worker API only leases jobs the host can run. A
host without a GPU advertises ``gpu_mem=0`` and therefore never receives a GPU job.
With several slots the host is split evenly between them.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

NVIDIA_SMI_QUERY = (
    "--query-gpu=index,name,memory.total,compute_cap",
    "--format=csv,noheader,nounits",
)
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU as ``nvidia-smi`` reports it. ``memory`` in MiB; ``archi`` is the
    compute capability (e.g. ``"8.6"``)."""

    index: str
    model: str
    memory: int
    archi: str


@dataclass(frozen=True, slots=True)
class SlotResources:
    """The share of the host one slot offers, and the GPUs it may hand to a job."""

    cpu_cores: int
    memory: int
    gpus: tuple[GpuInfo, ...] = ()

    def pull_params(self) -> dict[str, str | int]:
        """Query parameters describing this slot in ``GET /jobs``."""
        params: dict[str, str | int] = {
            "memory": self.memory,
            "cpu_cores": self.cpu_cores,
            "gpu_mem": max((gpu.memory for gpu in self.gpus), default=0),
        }
        if self.gpus:
            # The pull matches one model and architecture; the slot's first GPU
            # speaks for it (slots are usually given GPUs of one kind).
            params["gpu_model"] = self.gpus[0].model
            params["gpu_archi"] = self.gpus[0].archi
        return params


@dataclass(frozen=True, slots=True)
class HostHardware:
    """CPU cores, memory (MiB) and GPUs of this host."""

    cpu_cores: int
    memory: int
    gpus: tuple[GpuInfo, ...] = ()

    def split(self, slots: int) -> list[SlotResources]:
        """Divide the host between ``slots`` slots: an even share of cores and
        memory each, and the GPUs dealt out round-robin."""
        if slots < 1:
            raise ValueError("slots must be at least 1")
        return [
            SlotResources(
                cpu_cores=max(1, self.cpu_cores // slots),
                memory=max(1, self.memory // slots),
                gpus=self.gpus[slot::slots],
            )
            for slot in range(slots)
        ]


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Parse the CSV that ``nvidia-smi`` prints for ``NVIDIA_SMI_QUERY``.

    Lines that do not have four fields or whose memory is not a number (``[N/A]``)
    are skipped with a warning rather than failing the runner's start."""
    gpus: list[GpuInfo] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 4:
            logger.warning("ignoring unexpected nvidia-smi line: %r", line)
            continue
        index, name, memory, compute_cap = fields
        try:
            memory_mib = int(float(memory))
        except ValueError:
            logger.warning("ignoring GPU %s with unreadable memory %r", index, memory)
            continue
        gpus.append(GpuInfo(index=index, model=name, memory=memory_mib, archi=compute_cap))
    return gpus


def detect_gpus() -> list[GpuInfo]:
    """The host's NVIDIA GPUs, or none when ``nvidia-smi`` is absent or fails."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    try:
        completed = subprocess.run(  # noqa: S603  # fixed arguments, no shell
            [executable, *NVIDIA_SMI_QUERY],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("nvidia-smi failed, advertising no GPU: %s", exc)
        return []
    return parse_nvidia_smi(completed.stdout)


def parse_meminfo(text: str) -> int:
    """Total memory in MiB from the text of ``/proc/meminfo``."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "MemTotal":
            amount, _, unit = value.strip().partition(" ")
            if unit.strip().lower() not in ("kb", ""):
                raise ValueError(f"unexpected MemTotal unit: {unit!r}")
            return int(amount) // 1024
    raise ValueError("MemTotal missing from meminfo")


def detect_cpu_cores() -> int:
    """Cores this process may run on (respects affinity and cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def detect_memory() -> int:
    """Total memory of the host in MiB."""
    return parse_meminfo(MEMINFO.read_text(encoding="utf-8"))


def detect_hardware(*, cpu_cores: int | None = None, memory: int | None = None) -> HostHardware:
    """Detect the host's hardware; ``cpu_cores`` and ``memory`` override detection."""
    return HostHardware(
        cpu_cores=cpu_cores if cpu_cores is not None else detect_cpu_cores(),
        memory=memory if memory is not None else detect_memory(),
        gpus=tuple(detect_gpus()),
    )
