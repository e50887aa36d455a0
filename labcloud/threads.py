"""Running blocking work (database sessions, SDK calls) from background tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar, TypeVarTuple

import anyio

logger = logging.getLogger(__name__)

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


async def run_to_the_end(
    func: Callable[[*Ts], T], *args: *Ts
) -> tuple[T, asyncio.CancelledError | None]:
    """Run ``func(*args)`` in a worker thread and wait for it even through
    cancellations; returns its result and the cancellation that arrived meanwhile,
    for the caller to raise once it has recorded what it must.

    ``run_to_completion`` waits too, but then raises and the result is lost: an
    outbox's claim, or an email already handed to Mailjet, that must be recorded."""
    future = asyncio.ensure_future(anyio.to_thread.run_sync(func, *args))
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.wait((future,))
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
    if cancelled is not None and future.exception() is not None:
        # Stopping wins over a failed call; the failure must not keep the task alive.
        logger.error("failed while stopping", exc_info=future.exception())
        raise cancelled
    return future.result(), cancelled
