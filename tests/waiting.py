"""Waiting in tests for something another thread or process does."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(
    condition: Callable[[], Any], timeout: float = 60, *, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns a truthy value (returned); fail after
    ``timeout`` seconds. The default is generous because it only bounds a failing
    test: on a loaded 2-core machine what takes 1 s can take 10."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
