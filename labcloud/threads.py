"""Running blocking work (database sessions, SDK calls) from background tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar, TypeVarTuple

import anyio

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


async def run_to_completion(func: Callable[[*Ts], T], *args: *Ts) -> T:
    """Run ``func(*args)`` in a worker thread and wait for it even when the calling
    task is cancelled, then let the cancellation through.

    A thread cannot be interrupted: a task that stopped waiting for it could go on
    to use the same session while the thread still commits, or lose what the thread
    did (an email handed to Mailjet but not yet recorded as sent)."""
    running = asyncio.ensure_future(anyio.to_thread.run_sync(func, *args))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await running
        raise
