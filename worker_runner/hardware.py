"""What this host offers (CPU cores, memory, NVIDIA GPUs) and what of it is free.

``ResourcePool`` keeps the account while jobs run, for the backends that run jobs
on this host (it answers their ``capacity``, ``reserve`` and ``release``). Every
pull advertises what is free at that moment (``memory``, ``cpu_cores``, and
``gpus`` with ``gpu_mem``, ``gpu_model``, ``gpu_archi`` of one kind of free GPU),
so the worker API only leases a job that fits now; a host with no free GPU sends
``gpus=0`` and ``gpu_mem=0`` and is never given a GPU job. A leased job then reserves what it
needs until it ends:

- memory: what the job asks for; a job that names none gets an even share of the
  host (memory / SLOTS), or what is left when less is free. Memory is reserved
  because a container over its limit is killed;
- CPU cores: what the job asks for. A job that names none reserves no core and is
  limited to an even share of the host's cores (at least one): CPU time is shared,
  not exhausted, so SLOTS light jobs may run on fewer cores than SLOTS;
- GPUs: as many as the job needs (``gpus``, at least one when it names any GPU
  property), each matching its model, architecture and memory; the container sees
  only those (the placement's ``gpu_ids``);
- and one of the SLOTS jobs that may run at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from labcloud.contract import HardwareSpec
from worker_runner.backends.base import Capacity, Placement

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
class HostHardware:
    """CPU cores, memory (MiB) and GPUs of this host."""

    cpu_cores: int
    memory: int
    gpus: tuple[GpuInfo, ...] = ()


def gpus_needed(hardware: HardwareSpec) -> int:
    """GPUs a job needs: its ``gpus``, and at least one when it asks for any GPU
    memory, model or architecture (the worker API matches by the same rule)."""
    wants_gpu = bool(hardware.gpu_mem) or bool(hardware.gpu_model) or bool(hardware.gpu_archi)
    return max(hardware.gpus or 0, 1 if wants_gpu else 0)


def _gpu_suits(gpu: GpuInfo, needs: HardwareSpec) -> bool:
    return (
        (needs.gpu_model is None or gpu.model == needs.gpu_model)
        and (needs.gpu_archi is None or gpu.archi == needs.gpu_archi)
        and (needs.gpu_mem is None or gpu.memory >= needs.gpu_mem)
    )


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one running job holds: ``cpu_cores`` and ``memory`` (MiB) reserved,
    ``gpus`` assigned to it alone, and the CPU limit of its container (``cpus``)."""

    cpu_cores: int
    cpus: float
    memory: int
    gpus: tuple[GpuInfo, ...] = ()


class ResourcePool:
    """The host's resources minus what running jobs hold (see the module
    docstring for what a job reserves). Thread-safe."""

    def __init__(self, hardware: HostHardware, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.hardware = hardware
        self.slots = slots
        # A job that names no CPU or memory need gets an even share of the host.
        self.cpu_share = max(1, hardware.cpu_cores // slots)
        self.memory_share = max(1, hardware.memory // slots)
        self._lock = threading.Lock()
        self._free_cores = hardware.cpu_cores
        self._free_memory = hardware.memory
        self._free_gpus: list[GpuInfo] = list(hardware.gpus)
        self._running = 0
        self._turn = 0
        self._placed: dict[Placement, Reservation] = {}

    @property
    def running(self) -> int:
        """Jobs holding a reservation."""
        with self._lock:
            return self._running

    def capacity(self) -> Capacity | None:
        """What a pull may ask for now (one job at a time: two jobs leased
        together could each take all that is free), or None when nothing could be
        taken (every slot, core or MiB is held).

        The free GPUs are offered one kind (model, architecture, memory) at a time,
        a different kind on each call, since a pull names one model and one
        architecture."""
        with self._lock:
            if self._running >= self.slots or self._free_cores < 1 or self._free_memory < 1:
                return None
            kinds = sorted({(gpu.model, gpu.archi, gpu.memory) for gpu in self._free_gpus})
            if not kinds:
                return Capacity(memory=self._free_memory, cpu_cores=self._free_cores)
            model, archi, memory = kinds[self._turn % len(kinds)]
            self._turn += 1
            return Capacity(
                memory=self._free_memory,
                cpu_cores=self._free_cores,
                gpus=sum(
                    1
                    for gpu in self._free_gpus
                    if (gpu.model, gpu.archi, gpu.memory) == (model, archi, memory)
                ),
                gpu_mem=memory,
                gpu_model=model,
                gpu_archi=archi,
            )

    def unfit_reason(self, needs: HardwareSpec) -> str | None:
        """Why this host could never run a job with ``needs`` (even idle); None
        when it could."""
        host = self.hardware
        if needs.cpu_cores is not None and needs.cpu_cores > host.cpu_cores:
            return f"the job needs {needs.cpu_cores} CPU cores but this worker has {host.cpu_cores}"
        if needs.memory is not None and needs.memory > host.memory:
            return f"the job needs {needs.memory} MiB of memory but this worker has {host.memory}"
        wanted = gpus_needed(needs)
        suitable = sum(1 for gpu in host.gpus if _gpu_suits(gpu, needs))
        if wanted > suitable:
            if not host.gpus:
                return "the job needs a GPU but this worker has none"
            return f"the job needs {wanted} suitable GPU(s) but this worker has {suitable}"
        return None

    def reserve(self, needs: HardwareSpec) -> Reservation | None:
        """Reserve what a job with ``needs`` holds while it runs; None when that
        is not free now."""
        with self._lock:
            if self._running >= self.slots:
                return None
            cores = needs.cpu_cores or 0
            memory = needs.memory or min(self.memory_share, self._free_memory)
            suitable = [gpu for gpu in self._free_gpus if _gpu_suits(gpu, needs)]
            wanted = gpus_needed(needs)
            if cores > self._free_cores or memory > self._free_memory or memory < 1:
                return None
            if wanted > len(suitable):
                return None
            gpus = tuple(suitable[:wanted])
            self._free_cores -= cores
            self._free_memory -= memory
            self._free_gpus = [gpu for gpu in self._free_gpus if gpu not in gpus]
            self._running += 1
            return Reservation(
                cpu_cores=cores, cpus=float(cores or self.cpu_share), memory=memory, gpus=gpus
            )

    def release(self, reservation: Reservation) -> None:
        """Give back what a job held, once it ended."""
        with self._lock:
            self._free_cores += reservation.cpu_cores
            self._free_memory += reservation.memory
            self._free_gpus = sorted(
                [*self._free_gpus, *reservation.gpus], key=lambda gpu: self.hardware.gpus.index(gpu)
            )
            self._running -= 1

    def place(self, needs: HardwareSpec) -> Placement | None:
        """``reserve``, as a backend's placement: the limits of the job's run and
        the ids of its GPUs; give it back with ``unplace``."""
        reservation = self.reserve(needs)
        if reservation is None:
            return None
        placement = Placement(
            memory=reservation.memory,
            cpus=reservation.cpus,
            gpus=len(reservation.gpus),
            gpu_ids=tuple(gpu.index for gpu in reservation.gpus),
        )
        with self._lock:
            self._placed[placement] = reservation
        return placement

    def unplace(self, placement: Placement) -> None:
        """Give back what ``place`` set aside (once; a placement of another pool
        is an error)."""
        with self._lock:
            reservation = self._placed.pop(placement, None)
        if reservation is None:
            raise ValueError("not a placement of this pool, or already released")
        self.release(reservation)


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


class PlacedOnHost:
    """The placement calls of ``ExecutionBackend`` answered by one host's
    ``ResourcePool``: for backends whose runs share the runner's host (the Docker
    backend, the fake). Listed before ``ExecutionBackend`` among the bases; the
    backend sets ``_pool``."""

    _pool: ResourcePool

    def capacity(self) -> Capacity | None:
        return self._pool.capacity()

    def reserve(self, needs: HardwareSpec) -> Placement | None:
        return self._pool.place(needs)

    def release(self, placement: Placement) -> None:
        self._pool.unplace(placement)

    def unfit_reason(self, needs: HardwareSpec) -> str | None:
        return self._pool.unfit_reason(needs)
