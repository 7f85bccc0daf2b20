"""How a `vae` command ends: its output and exit 0; one `error: <problem>` line on stderr and exit 1 (the
traceback too only with `--debug`); or, on Ctrl-C or SIGTERM, exit 130 within a few seconds, after
`finally` blocks have removed temporaries and released what they held.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Annotated

import typer
from pydantic import ValidationError

from vae_core.errors import VAEError

# What a user can fix (bad input, data, configuration, a missing or unreadable path): its message is the report.
USER_ERRORS = (VAEError, ValueError, OSError)
GRACE_S = 5.0  # after Ctrl-C, seconds the command has to clean up before the process exits regardless
DEBUG = (Annotated[bool, typer.Option("--debug", envvar="VAE_DEBUG", help="On an error, print the tracebacks "
                                      "(the command's and Prefect's) as well as the one-line message.")], False)


def fail(e: Exception) -> typer.Exit:
    """Print `error: <problem>` in red on stderr, one line (pydantic's own text spans many lines and a
    URL); return the exit to raise (code 1). An error that is not the user's says so and how to see more."""
    text = str(e)
    if isinstance(e, ValidationError):
        text = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'options'}: {x['msg'].removeprefix('Value error, ')}"
                         for x in e.errors())
    elif not isinstance(e, USER_ERRORS):
        text = f"{type(e).__name__}: {text} (unexpected; --debug shows where)"
    typer.secho(f"error: {text}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


@contextlib.contextmanager
def outcome(debug: bool) -> Iterator[None]:
    """Run a command's body: an error becomes `fail`'s one line (after its traceback with --debug), an
    interrupt exit 130 (`interruptible`)."""
    with interruptible() as signalled:
        try:
            yield
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if signalled.is_set():  # the error is what the interrupt left (Ray's aborted run, ...)
                raise
            if debug:
                traceback.print_exc()
            raise fail(e) from None


@contextlib.contextmanager
def interruptible(grace: float = GRACE_S) -> Iterator[threading.Event]:
    """SIGINT or SIGTERM ends the command with exit 130 and the line `interrupted`, within `grace` seconds.

    The signal raises KeyboardInterrupt in the main thread (or does what a handler installed since does: Ray
    Train's aborts the run), so `finally` blocks remove temporaries and release locks. A watcher learns of
    every signal through Python's wakeup fd, whoever handles it, and ends the process if it is still alive
    `grace` seconds later, or at a second signal: a terminal's Ctrl-C reaches the whole process group,
    Prefect's temporary server included, and Prefect's engine then blocks on the dead API. Yields the event
    that is set once a signal came.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may handle signals
        yield threading.Event()
        return
    state = _Interrupts(grace)
    _forks_drop_the_wakeup_fd()
    previous_fd = signal.set_wakeup_fd(state.write, warn_on_full_buffer=False)
    previous = {sig: signal.signal(sig, state.handle) for sig in _SIGNALS}
    threading.Thread(target=state.watch, name="vae-interrupts", daemon=True).start()
    try:
        yield state.signalled
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or state.signalled.is_set():
            state.tell()
            raise typer.Exit(code=130) from None
        raise
    finally:
        if not state.signalled.is_set():  # the watcher stops (end of file), the caller's handling comes back
            signal.set_wakeup_fd(previous_fd)
            for sig, old in previous.items():
                signal.signal(sig, old)
            os.close(state.write)
    if state.signalled.is_set():  # the body finished anyway (a graceful abort)
        state.tell()
        raise typer.Exit(code=130)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Interrupts:
    """One command's interrupt handling (`interruptible`): its handler, its watcher and how it ends."""

    def __init__(self, grace: float) -> None:
        self.grace, self.owner = grace, os.getpid()
        self.signalled, self.told = threading.Event(), threading.Event()
        self.read, self.write = os.pipe()  # Python's C-level handler writes each signal's number here
        os.set_blocking(self.write, False)

    def handle(self, signum: int, frame: object) -> None:
        """The Python-level handler: KeyboardInterrupt in the command; a forked decode worker exits at once,
        so that its parent's cleanup need not wait for its chunk."""
        if os.getpid() != self.owner:
            os._exit(130)
        self.signalled.set()
        raise KeyboardInterrupt

    def watch(self) -> None:
        """Wait for SIGINT or SIGTERM, then for `grace` seconds or a second signal, then `exit`."""
        deadline: float | None = None
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.read], [], [], wait)[0]:
                self.exit()
            data = os.read(self.read, 64)
            if not data:  # the command ended without a signal
                os.close(self.read)
                return
            if any(sig in data for sig in _SIGNALS):
                if deadline is not None:
                    self.exit()
                self.signalled.set()
                logging.raiseExceptions = False  # handlers failing from now on (Prefect's, on its dead API) stay quiet
                deadline = time.monotonic() + self.grace

    def tell(self) -> None:
        """Say `interrupted`, once, and flush what was written."""
        if not self.told.is_set():
            self.told.set()
            typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()

    def exit(self) -> None:
        """Exit 130 now, taking this process's children along (`os._exit` skips the atexit hooks that stop
        them: Prefect's temporary server would outlive a command that was sent SIGTERM alone)."""
        self.tell()
        _end_children()
        os._exit(130)


def _end_children(wait: float = 2.0) -> None:
    """SIGTERM every process this one started, directly or not (Prefect's temporary server, a local Ray's
    GCS, raylet, agents and workers), SIGKILL those still alive after `wait` seconds."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    for child in psutil.wait_procs(children, timeout=wait)[1]:
        with contextlib.suppress(psutil.Error):
            child.kill()


@functools.cache
def _forks_drop_the_wakeup_fd() -> None:
    """A forked child inherits Python's wakeup fd; a signal that only it gets (a pool terminating its
    workers) must not read as the command's. Registered once per process."""
    os.register_at_fork(after_in_child=lambda: signal.set_wakeup_fd(-1))
