"""Make sure the demo tool's image exists on the local Docker engine.

The shipped catalog runs ``labcloud/demo:latest`` (``images/demo``). It is built
from the public ``busybox`` image when a registry is reachable; where none is (an
air-gapped lab, a CI machine), the same Dockerfile is built on a base image
imported from the host's own static busybox, so a local stack and its tests never
need the network.

All functions here block on the Docker engine: call them from a thread when on an
event loop.
"""

from __future__ import annotations

import logging
import shutil
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path

import docker
import docker.errors

DEMO_IMAGE = "labcloud/demo:latest"
LOCAL_BASE_IMAGE = "labcloud/busybox:local"
DEMO_CONTEXT = Path(__file__).resolve().parents[1] / "images" / "demo"
# Default of the Dockerfile's BASE argument; kept here to tell whether it is present.
ONLINE_BASE_IMAGE = "busybox:1.36"

logger = logging.getLogger(__name__)

_ELF_MAGIC = b"\x7fELF"
_PT_INTERP = 3


class DemoImageError(RuntimeError):
    """The demo image is missing and could not be built."""


def ensure_demo_image(
    client: docker.DockerClient, tag: str = DEMO_IMAGE, *, rebuild: bool = False
) -> str:
    """Build ``tag`` from ``images/demo`` unless it already exists; return ``tag``.

    Tries the Dockerfile's default public base first; when that base cannot be
    pulled, builds on ``labcloud/busybox:local`` made from the host's static busybox.
    Raises ``DemoImageError`` saying what to install when neither works.
    """
    if not rebuild:
        try:
            image = client.images.get(tag)
        except docker.errors.ImageNotFound:
            pass
        else:
            logger.debug("image %s already present (%s)", tag, image.id)
            return tag

    logger.info("building %s from %s on %s", tag, DEMO_CONTEXT, ONLINE_BASE_IMAGE)
    try:
        _build(client, tag, buildargs=None)
        return tag
    except (docker.errors.BuildError, docker.errors.APIError) as exc:
        if _image_exists(client, ONLINE_BASE_IMAGE):
            # The base was there, so the failure is the Dockerfile's own: a local
            # base would fail the same way.
            raise DemoImageError(f"building {tag} failed: {_build_failure(exc)}") from exc
        online_failure = _build_failure(exc)
        logger.info(
            "base image %s unavailable (%s); building on %s instead",
            ONLINE_BASE_IMAGE,
            online_failure,
            LOCAL_BASE_IMAGE,
        )

    try:
        build_local_busybox_base(client)
    except DemoImageError as exc:
        raise DemoImageError(
            f"cannot build {tag}: the base image {ONLINE_BASE_IMAGE} could not be pulled "
            f"({online_failure}) and no offline base could be made: {exc}"
        ) from exc
    try:
        _build(client, tag, buildargs={"BASE": LOCAL_BASE_IMAGE})
        return tag
    except (docker.errors.BuildError, docker.errors.APIError) as exc:
        raise DemoImageError(
            f"building {tag} on {LOCAL_BASE_IMAGE} failed: {_build_failure(exc)}"
        ) from exc


def build_local_busybox_base(
    client: docker.DockerClient, tag: str = LOCAL_BASE_IMAGE, *, rebuild: bool = False
) -> str:
    """Import a minimal image holding the host's static busybox as ``tag``; return ``tag``.

    The image has ``/bin/busybox``, a link for each of its applets (``/bin/sh``,
    ``/usr/bin/wc``, ...) and a world-writable ``/tmp``: enough for shell scripts.
    """
    if not rebuild and _image_exists(client, tag):
        return tag
    busybox = find_static_busybox()
    applets = _applet_paths(busybox)
    repository, _, image_tag = tag.rpartition(":")
    with tempfile.TemporaryDirectory(prefix="labcloud-busybox-") as scratch:
        archive = Path(scratch) / "rootfs.tar"
        _write_rootfs(archive, busybox, applets)
        logger.info("importing %s from %s (%d applets)", tag, busybox, len(applets))
        client.api.import_image_from_file(str(archive), repository=repository, tag=image_tag)
    if not _image_exists(client, tag):
        raise DemoImageError(f"importing {tag} from {busybox} produced no image")
    return tag


def find_static_busybox() -> Path:
    """The host's busybox, which must be statically linked to run inside an image
    that holds nothing else."""
    candidates = [found for found in (shutil.which("busybox"), "/bin/busybox") if found]
    for candidate in candidates:
        path = Path(candidate).resolve()
        if path.is_file() and is_static_elf(path):
            return path
    if candidates:
        raise DemoImageError(
            f"busybox at {', '.join(candidates)} is dynamically linked; "
            "install a static one: apt-get install busybox-static"
        )
    raise DemoImageError("busybox not found; install it: apt-get install busybox-static")


def is_static_elf(path: Path) -> bool:
    """Whether ``path`` is an ELF executable without a program interpreter (that is,
    one that needs no dynamic loader or shared libraries)."""
    with path.open("rb") as binary:
        ident = binary.read(16)
        if len(ident) < 16 or ident[:4] != _ELF_MAGIC:
            return False
        is_64_bit = ident[4] == 2
        order = "<" if ident[5] == 1 else ">"
        if is_64_bit:
            binary.seek(0x20)
            (program_headers,) = struct.unpack(order + "Q", binary.read(8))
            binary.seek(0x36)
        else:
            binary.seek(0x1C)
            (program_headers,) = struct.unpack(order + "I", binary.read(4))
            binary.seek(0x2A)
        entry_size, entry_count = struct.unpack(order + "HH", binary.read(4))
        for index in range(entry_count):
            binary.seek(program_headers + index * entry_size)
            (segment_type,) = struct.unpack(order + "I", binary.read(4))
            if segment_type == _PT_INTERP:
                return False
    return True


def _applet_paths(busybox: Path) -> list[str]:
    """Where each applet lives (``usr/bin/wc``), as this busybox itself reports."""
    try:
        listed = subprocess.run(  # noqa: S603 - a fixed argument list, no shell
            [str(busybox), "--list-full"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise DemoImageError(f"{busybox} --list-full failed: {exc}") from exc
    # "--list-full" names the applet "busybox" nowhere; a link over the binary itself
    # would replace it.
    return sorted({line.strip("/") for line in listed if line.strip("/") != "bin/busybox"})


def _write_rootfs(archive: Path, busybox: Path, applets: list[str]) -> None:
    folders = {"bin", "tmp"} | {
        str(parent) for applet in applets for parent in Path(applet).parents if str(parent) != "."
    }
    with tarfile.open(archive, "w") as tar:
        for folder in sorted(folders):
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if folder == "tmp" else 0o755
            tar.addfile(info)
        binary = tar.gettarinfo(str(busybox), arcname="bin/busybox")
        binary.uid = binary.gid = 0
        binary.uname = binary.gname = "root"
        binary.mode = 0o755
        with busybox.open("rb") as content:
            tar.addfile(binary, content)
        for applet in applets:
            link = tarfile.TarInfo(applet)
            link.type = tarfile.SYMTYPE
            link.linkname = "/bin/busybox"
            link.mode = 0o777
            tar.addfile(link)


def _build(client: docker.DockerClient, tag: str, buildargs: dict[str, str] | None) -> None:
    image, _logs = client.images.build(
        path=str(DEMO_CONTEXT),
        tag=tag,
        buildargs=buildargs,
        pull=False,
        rm=True,
        forcerm=True,
    )
    logger.info("built %s (%s)", tag, image.id)


def _image_exists(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def _build_failure(exc: docker.errors.BuildError | docker.errors.APIError) -> str:
    if isinstance(exc, docker.errors.BuildError):
        return str(exc.msg).strip()
    return str(exc.explanation or exc).strip()
