"""Interrupts that save work: SIGTERM handled as Ctrl-C, and writes an interrupt waits for.

Batch schedulers (Slurm, Kubernetes) send SIGTERM some seconds before they kill a job;
Python's default is to die at once, saving nothing. ``sigterm_as_interrupt`` turns it into
the ``KeyboardInterrupt`` that Ctrl-C raises, so the trainer's Ctrl-C path (save a
checkpoint, say how to resume) runs for both.

``deferred_interrupts`` holds Ctrl-C and SIGTERM while a short piece of work that must not
be cut (a checkpoint write, a periodic evaluation) finishes, then raises the interrupt. A
second interrupt while waiting raises at once: the user is never trapped.

Signal handlers can only be set in the main thread; elsewhere both context managers do
nothing (the main thread gets the signal anyway).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

_HELD = (signal.SIGINT, signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises KeyboardInterrupt (as Ctrl-C does); the previous
    handler is restored afterwards, also when the block raises."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_interrupts(what: str) -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM until the block ends, then raise KeyboardInterrupt.

    ``what`` ("writing step_0000100.pt") is logged when an interrupt is held, so the user
    knows why the program has not stopped yet. A second interrupt raises at once. Nested
    uses hold until the outermost block ends. Signals whose handler is not Python's
    KeyboardInterrupt-raising one (SIGTERM outside ``sigterm_as_interrupt``, say) are left
    alone: their usual effect must not be turned into a delayed exception.
    """
    if not _in_main_thread() or _state.depth > 0:
        _state.depth += 1
        try:
            yield
        finally:
            _state.depth -= 1
        return
    held: list[int] = []
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: FrameType | None) -> None:
        if held:
            raise KeyboardInterrupt(f"received {signal.Signals(signum).name} twice")
        held.append(signum)
        log.warning(
            "%s received: stopping once %s is complete (send it again to stop now)",
            signal.Signals(signum).name,
            what,
        )

    for signum in map(int, _HELD):
        current = signal.getsignal(signum)
        if _raises_interrupt(current):
            previous[signum] = signal.signal(signum, hold)
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if held:
        raise KeyboardInterrupt(f"received {signal.Signals(held[0]).name}")


def _raises_interrupt(handler: Any) -> bool:
    """Whether a signal handler turns the signal into KeyboardInterrupt."""
    return handler is signal.default_int_handler or handler is _raise_interrupt


class _State(threading.local):
    depth = 0


_state = _State()
