"""The one fork server every rank of a process is forked from, the CLI's self-launched ranks
and the test runner's alike: it imports torch, transformers and smpcheck once, and each rank
forks from it in milliseconds instead of paying seconds of CPU re-importing them. It is started
on first use and kept for every later launch of the process (``smpcheck compare`` launches
once per strategy; a test session many times); it ends with the process.

A fork server's children inherit the environment the server started with, not the launcher's
as it is at a launch. So a launch hands its ranks smpcheck's own variables (``SMPCHECK_*``,
read where they are used) and the launcher's standard streams as they are then, and the
server is restarted when any other variable changed since it started: a library may read
those once, at import or load (libgomp reads ``OMP_NUM_THREADS``, transformers its
verbosity)."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
from multiprocessing import forkserver, reduction
from multiprocessing.context import BaseContext
from typing import Any

OWN_PREFIX = "SMPCHECK_"
# Handed to each rank like smpcheck's own rather than watched, as no library reads them at
# import: pytest names the running test in the first (a new value at every test); torch's
# elastic launcher sets the second at each launch, for its agent in the launching process.
HANDED_OVER = ("PYTEST_CURRENT_TEST", "TORCHELASTIC_SIGNALS_TO_HANDLE")
PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint.state_dict",
    "transformers",
    "transformers.modeling_utils",
    "accelerate",
    "smpcheck.runner",
    "smpcheck.run.job",
    "smpcheck.cli",
]

_started_with: dict[str, str] | None = None  # the foreign variables the server started with


def _in_the_fork_server() -> bool:
    return any("multiprocessing.forkserver import main" in arg
               for arg in getattr(sys, "orig_argv", ()))


if _in_the_fork_server():
    # The server, its launcher gone, leaves at once instead of tearing down torch and
    # transformers (1.3 s of CPU, several seconds on a loaded node): a SIGKILLed launcher's
    # ranks die with their parent, this server, so they would live that long too. Its
    # children leave by _exit and never run this.
    atexit.register(os._exit, 0)


def context() -> BaseContext:
    """The forkserver context, its server (re)started if this process's variables other than
    smpcheck's own differ from those it started with."""
    global _started_with
    foreign = {k: v for k, v in os.environ.items() if not _handed_over(k)}
    if foreign != _started_with:
        stop()
        _started_with = foreign
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def stop() -> None:
    """Stop this process's fork server, if one runs; its ranks die with it (their parent)."""
    global _started_with
    halt = getattr(forkserver._forkserver, "_stop", None)  # CPython's own (3.8+)
    if halt is not None:
        halt()
    _started_with = None


def _handed_over(key: str) -> bool:
    return key.startswith(OWN_PREFIX) or key in HANDED_OVER


def own_environment() -> dict[str, str]:
    """smpcheck's variables (and :data:`HANDED_OVER`) as they are now, for
    :func:`adopt_environment` in each rank."""
    return {k: v for k, v in os.environ.items() if _handed_over(k)}


def adopt_environment(own: dict[str, str]) -> None:
    """In a rank: smpcheck's variables exactly as the launcher had them at the launch."""
    for key in [k for k in os.environ if _handed_over(k) and k not in own]:
        del os.environ[key]
    os.environ.update(own)


class Stream:
    """One of the launcher's standard streams (a descriptor), handed to a forked rank the way
    the fork server hands over descriptors; in the rank it becomes that rank's own stream."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple]:
        return _Received, (self.fd, reduction.DupFd(self.fd))


class _Received:
    def __init__(self, fd: int, dup: Any) -> None:
        self.fd, self.dup = fd, dup

    def adopt(self) -> None:
        """Make the launcher's stream this process's descriptor of the same number."""
        received = self.dup.detach()
        os.dup2(received, self.fd)
        os.close(received)


def adopt_streams(streams: list[Any]) -> None:
    """In a rank: write where the launcher wrote at the launch (its output may be captured)."""
    for stream in streams:
        stream.adopt()


def launcher_streams() -> list[Stream]:
    """This process's stdout and stderr, those of them that are open."""
    streams = []
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            continue
        streams.append(Stream(fd))
    return streams


def release() -> None:
    """In a rank: close this rank's copy of the pipe that keeps the server alive. A server
    whose launcher was SIGKILLed would otherwise live on for its hung ranks, and they for it;
    closed, the server ends with the launcher, and the rank (whose parent it is) with it."""
    fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
        forkserver._forkserver._forkserver_alive_fd = None
