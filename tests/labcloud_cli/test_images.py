"""The demo image: built offline from the host's static busybox, and its word count."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from labcloud_cli.images import (
    DEMO_CONTEXT,
    build_local_busybox_base,
    ensure_demo_image,
    find_static_busybox,
    is_static_elf,
)

# Tags of their own, so these tests never replace the images a running stack uses.
TEST_DEMO_TAG = "labcloud-test/demo:test-images"
TEST_BASE_TAG = "labcloud-test/busybox:test-images"


@pytest.fixture
def client() -> Iterator[docker.DockerClient]:
    client = docker.from_env(timeout=60)
    yield client
    client.close()


@pytest.fixture
def demo_image(client: docker.DockerClient) -> Iterator[str]:
    assert ensure_demo_image(client, TEST_DEMO_TAG, rebuild=True) == TEST_DEMO_TAG
    yield TEST_DEMO_TAG
    client.images.remove(TEST_DEMO_TAG, noprune=False)


def run_wordcount(
    client: docker.DockerClient, image: str, files: Path, env: dict[str, str] | None = None
) -> str:
    output = client.containers.run(
        image,
        ["/bin/sh", "-c", "/app/wordcount.sh"],
        environment=env or {},
        volumes={str(files): {"bind": "/files", "mode": "rw"}},
        user=f"{os.getuid()}:{os.getgid()}",
        init=True,
        remove=True,
        network_disabled=True,
    )
    assert isinstance(output, bytes)
    return output.decode()


def make_data(files: Path) -> None:
    data = files / "data"
    (data / "sub dir" / "deeper").mkdir(parents=True)
    (data / "b").mkdir()
    (data / "a.txt").write_text("one two three\n")
    (data / "sub dir" / "my file.txt").write_text("hello  world\n\n")
    (data / "sub dir" / "deeper" / "z.dat").write_text("x y\nz")
    (data / "b" / "empty").write_text("")


def test_the_host_busybox_is_static() -> None:
    if shutil.which("busybox") is None and not Path("/bin/busybox").exists():
        pytest.skip("no busybox on this host (apt-get install busybox-static)")
    assert is_static_elf(find_static_busybox())


def test_a_dynamic_executable_is_not_static() -> None:
    assert not is_static_elf(Path(sys.executable).resolve())


def test_a_script_is_not_static(tmp_path: Path) -> None:
    script = tmp_path / "tool.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    assert not is_static_elf(script)


def test_the_dockerfile_defines_no_entrypoint() -> None:
    dockerfile = (DEMO_CONTEXT / "Dockerfile").read_text()
    assert "ENTRYPOINT" not in [line.split(" ")[0] for line in dockerfile.splitlines()]


@pytest.mark.docker
def test_the_local_base_runs_shell_scripts(client: docker.DockerClient) -> None:
    assert build_local_busybox_base(client, TEST_BASE_TAG, rebuild=True) == TEST_BASE_TAG
    try:
        output = client.containers.run(
            TEST_BASE_TAG,
            ["/bin/sh", "-c", "mktemp >/dev/null && echo $(echo a b c | wc -w)"],
            remove=True,
            network_disabled=True,
        )
    finally:
        client.images.remove(TEST_BASE_TAG)
    assert output == b"3\n"


@pytest.mark.docker
def test_demo_image_counts_words(
    client: docker.DockerClient, demo_image: str, tmp_path: Path
) -> None:
    make_data(tmp_path)
    logs = run_wordcount(client, demo_image, tmp_path)
    assert (tmp_path / "output" / "wordcount.txt").read_text() == (
        "a.txt 3\nb/empty 0\nsub dir/deeper/z.dat 3\nsub dir/my file.txt 2\n"
    )
    assert "sub dir/my file.txt: 2 words" in logs
    assert (
        (tmp_path / "log" / "wordcount.log")
        .read_text()
        .splitlines()[-1]
        .startswith("done: 4 file(s) counted")
    )
    assert sorted(path.name for path in (tmp_path / "output").iterdir()) == ["wordcount.txt"]


@pytest.mark.docker
def test_demo_image_filters_by_pattern(
    client: docker.DockerClient, demo_image: str, tmp_path: Path
) -> None:
    make_data(tmp_path)
    run_wordcount(client, demo_image, tmp_path, env={"WORDCOUNT_PATTERN": "*.txt"})
    assert (tmp_path / "output" / "wordcount.txt").read_text() == (
        "a.txt 3\nsub dir/my file.txt 2\n"
    )


@pytest.mark.docker
def test_demo_image_without_data_writes_an_empty_count(
    client: docker.DockerClient, demo_image: str, tmp_path: Path
) -> None:
    run_wordcount(client, demo_image, tmp_path)
    assert (tmp_path / "output" / "wordcount.txt").read_text() == ""


@pytest.mark.docker
def test_demo_image_has_no_entrypoint(client: docker.DockerClient, demo_image: str) -> None:
    config = client.images.get(demo_image).attrs["Config"]
    assert not config.get("Entrypoint")


@pytest.mark.docker
def test_an_existing_image_is_not_rebuilt(client: docker.DockerClient, demo_image: str) -> None:
    image_id = client.images.get(demo_image).id
    assert ensure_demo_image(client, demo_image) == demo_image
    assert client.images.get(demo_image).id == image_id
