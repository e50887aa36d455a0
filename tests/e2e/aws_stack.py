"""``labcloud up --aws-emulator`` started as a newcomer starts it (the console
script, on free ports), for the end-to-end tests of the emulated stack: the Docker
runner (test_aws_emulator.py) and the Batch runner (test_aws_batch_stack.py)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import docker

from labcloud_cli.images import ensure_demo_image
from labcloud_cli.stack import aws_emulator
from tests.e2e.stack import free_port
from tests.labcloud_cli.test_stack import LABCLOUD, _env
from tests.waiting import wait_for


@dataclass
class EmulatedStack:
    process: subprocess.Popen[bytes]
    output: Path
    data_dir: Path
    user_url: str
    emulator_url: str

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def logs(self) -> str:
        logs = self.data_dir / "logs"
        return "\n".join(
            f"----- {path.name} -----\n{path.read_text(errors='replace')[-4000:]}"
            for path in sorted(logs.glob("*.log"))
        )

    def client(self, service: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.emulator_url,
            region_name=aws_emulator.REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def example_session(self) -> list[str]:
        """The example session's command lines, as printed (continuations joined)."""
        text = self.text().split("Example session (paste in another terminal):", 1)[1]
        text = text.split("Press Ctrl-C to stop.", 1)[0]
        return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]


@contextmanager
def emulated_stack(root: Path, settings: str, *options: str) -> Iterator[EmulatedStack]:
    """``labcloud up --aws-emulator OPTIONS`` with ``settings`` (an env file's text)
    in ``root``, until the block ends (then Ctrl-C, as a user stops it). On a
    failure, the start message and every service's log are printed."""
    ensure_demo_image(docker.from_env())
    env_file = root / "stack.env"
    env_file.write_text(settings)
    user_port, worker_port, emulator_port = free_port(), free_port(), free_port()
    data_dir = root / "data"
    output = root / "up.log"
    command = [
        str(LABCLOUD),
        *("up", "--aws-emulator", *options),
        *("--aws-emulator-port", str(emulator_port)),
        *("--env-file", str(env_file)),
        *("--data-dir", str(data_dir), "--skip-demo-image"),
        *("--user-port", str(user_port), "--worker-port", str(worker_port)),
    ]
    with output.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env())
    stack = EmulatedStack(
        process,
        output,
        data_dir,
        f"http://127.0.0.1:{user_port}",
        f"http://127.0.0.1:{emulator_port}",
    )
    try:
        wait_for(
            lambda: "Press Ctrl-C to stop." in stack.text() or process.poll() is not None,
            timeout=180,
            interval=0.2,
            what=f"labcloud up --aws-emulator {' '.join(options)} to start",
        )
        assert process.poll() is None, stack.text() + stack.logs()
        yield stack
    except BaseException:
        print(stack.text())
        print(stack.logs())
        raise
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
