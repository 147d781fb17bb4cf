"""Ctrl-C that stops a command within a couple of seconds at any point, leaving nothing half-written.

Python handles SIGINT only in the main thread and only between bytecodes, so a command running a
long torch operation (one convolution over a 12 MP photo takes seconds on a CPU; a matching pass
can take minutes) would not notice Ctrl-C until the operation returned. `run_interruptible`
therefore runs the command in a worker thread while the main thread waits:

1. Ctrl-C reaches the main thread at once; it raises `KeyboardInterrupt` inside the worker at its
   next Python step (between two torch operations), so the command unwinds as usual: finally
   blocks run, a batch writes the pairs it finished and its report.
2. If the worker has not finished `GRACE_S` seconds later (it is inside one long operation), or on
   a second Ctrl-C, the process ends itself: it waits for any output being written
   (`OUTPUT_LOCK`, held by `io.atomic_output` while a temporary file exists), runs the callbacks
   registered with `on_abandon` (a batch's report of what finished), says so and exits 130.

Outputs are written to temporary files that are renamed only when complete, under
`OUTPUT_LOCK`, so the hard exit never leaves a temporary file or a half-written output.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

GRACE_S = 2.0
EXIT_INTERRUPTED = 130

# Held while an output's temporary file exists (re-entrant: several outputs written all or none
# nest their temporary files).
OUTPUT_LOCK = threading.RLock()

_abandon_callbacks: list[Callable[[], None]] = []


@contextlib.contextmanager
def on_abandon(callback: Callable[[], None]) -> Iterator[None]:
    """While the block runs, `callback` is called if the command is abandoned by a hard exit
    (with `OUTPUT_LOCK` held, so it may write outputs itself)."""
    _abandon_callbacks.append(callback)
    try:
        yield
    finally:
        _abandon_callbacks.remove(callback)


def _raise_in(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    tid = thread.ident
    if tid is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(exc_type))


def _hard_exit(say: Callable[[], None]) -> None:
    with OUTPUT_LOCK:  # an output being written is finished (and renamed) or not begun
        for callback in list(_abandon_callbacks):
            with contextlib.suppress(Exception):
                callback()
        with contextlib.suppress(Exception):
            say()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(EXIT_INTERRUPTED)


def run_interruptible(
    fn: Callable[..., T],
    *args: Any,
    say: Callable[[], None] = lambda: print("interrupted.", file=sys.stderr),
    **kwargs: Any,
) -> T:
    """`fn(*args, **kwargs)` in a worker thread, returning its result or raising its exception;
    Ctrl-C as the module docstring says (`say()` tells the person before a hard exit). Called
    outside the main thread (where no signal arrives) it simply runs `fn`."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    box: dict[str, Any] = {}
    # an Event, not Thread.join: a join interrupted by Ctrl-C can mark a running thread as
    # stopped (Python 3.11's _wait_for_tstate_lock releases the lock the running thread holds)
    finished = threading.Event()

    def work() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread as it is
            box["error"] = e
        finally:
            finished.set()

    worker = threading.Thread(target=work, name="sddusr-command", daemon=True)
    worker.start()
    deadline = None
    while not finished.is_set():
        try:
            if deadline is None:
                finished.wait(0.1)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                _hard_exit(say)
            finished.wait(min(0.1, left))
        except KeyboardInterrupt:
            if deadline is not None:  # a second Ctrl-C: now
                _hard_exit(say)
            deadline = time.monotonic() + GRACE_S
            _raise_in(worker, KeyboardInterrupt)
    if "error" in box:
        raise box["error"]
    return box["value"]
