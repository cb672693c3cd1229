"""``smpcheck ARGS`` as a test runs it: through the real console script in a fresh process, or
in this process, warm.

A fresh console script pays about 5 s of CPU importing torch and transformers, and its fork
server as much again, before a rank starts; on 2 busy cores that is most of a small run. In
this process both are paid once per test worker: :func:`run_cli` calls the CLI's ``main``
here, with the environment, working directory, standard streams (the ranks' too: the launcher
hands them its streams) and signal handlers a console script would have, all restored after.
Tests of what only a process boundary shows (a launcher killed or signalled, torchrun, exit
through argparse, runs side by side) pass ``fresh=True``. Either way, no process the run
started may outlive it."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

SMPCHECK = shutil.which("smpcheck") or "smpcheck"
TAG = "SMPCHECK_TEST_TAG"  # marks a fresh run's processes, which inherit it
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
ELASTIC_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)  # it takes them


class Run(subprocess.CompletedProcess):
    """How ``smpcheck`` ended, and the processes it left (killed once found)."""

    left: list[int]


def run_cli(*args: str, tmp: Path, env: dict | None = None, timeout: float = 240,
            launcher: list[str] | None = None, fresh: bool = False,
            leftovers_fail: bool = True) -> Run:
    """``smpcheck ARGS`` in ``tmp``; fail if any process it started outlives it (unless
    ``leftovers_fail`` is false: then ``.left`` says). In this process unless ``fresh`` or a
    ``launcher`` (torchrun) is asked for; ``timeout`` bounds a fresh one (in this process, the
    run's own ``--timeout`` does)."""
    variables = {"SMPCHECK_CACHE": str(tmp / "cache"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                 "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    if fresh or launcher:
        out = _fresh(list(args), tmp, variables, timeout, launcher)
    else:
        out = _in_this_process(list(args), tmp, variables)
    assert not (leftovers_fail and out.left), f"processes outlived smpcheck: {out.left}"
    return out


def _fresh(args: list[str], tmp: Path, variables: dict[str, str], timeout: float,
           launcher: list[str] | None) -> Run:
    """Its own session, as a job a scheduler started: a planted preemption signals the job's
    whole process group, which must not hold this process."""
    tag = uuid.uuid4().hex
    full_env = {**os.environ, TAG: tag, **variables}
    for key in LAUNCHER_VARIABLES:
        if key not in variables:
            full_env.pop(key, None)
    out = subprocess.run((launcher or [SMPCHECK]) + args, capture_output=True, text=True,
                         env=full_env, timeout=timeout, cwd=tmp, start_new_session=True)
    return _ended(out, [p.pid for p in leftovers(tag)])


def _ended(out: subprocess.CompletedProcess, left: list[int]) -> Run:
    run = Run(out.args, out.returncode, out.stdout, out.stderr)
    run.left = left
    return run


def leftovers(tag: str, wait: float = 5.0) -> list[psutil.Process]:
    """Processes of the run tagged ``tag`` still alive after ``wait`` s (killed, then named)."""
    return _killed_if_left(psutil.process_iter, lambda p: p.environ().get(TAG) == tag, wait)


def _killed_if_left(candidates: Callable[[], Iterable[psutil.Process]],
                    of_the_run: Callable[[psutil.Process], bool],
                    wait: float) -> list[psutil.Process]:
    """Those of ``candidates()`` that are ``of_the_run`` and still alive (not zombies) after
    ``wait`` s: killed, then named."""
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for proc in candidates():
            try:
                if of_the_run(proc) and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if not alive or time.monotonic() > deadline:
            for proc in alive:
                proc.kill()
            return alive
        time.sleep(0.1)


def _in_this_process(args: list[str], tmp: Path, variables: dict[str, str]) -> Run:
    from smpcheck.cli import main

    before = _descendants()
    with _as_a_console_script(tmp, variables):
        _warm_fork_server()
        with _captured() as (out, err):
            try:
                code = main(args)
            except SystemExit as exc:  # argparse's own exits
                code = exc.code if isinstance(exc.code, int) else 1
    return _ended(subprocess.CompletedProcess(["smpcheck", *args], code, out.getvalue(),
                                              err.getvalue()),
                  [p.pid for p in _started_since(before)])


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """What ``HF_HUB_DISABLE_PROGRESS_BARS`` and ``TRANSFORMERS_VERBOSITY`` do to a fresh
    process (the libraries read them once, at import): no progress bars, errors only."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    hub_bars_off, verbosity = are_progress_bars_disabled(), hf_logging.get_verbosity()
    hf_bars_on = hf_logging.is_progress_bar_enabled()
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if hf_bars_on:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()


def _warm_fork_server() -> None:
    """Started (if it must be) before the streams are captured, so that the server, which
    outlives this run, holds this process's own streams rather than this run's files."""
    from multiprocessing import forkserver

    from smpcheck.run import forks

    forks.context()
    forkserver.ensure_running()


@contextmanager
def _as_a_console_script(tmp: Path, variables: dict[str, str]) -> Iterator[None]:
    """This process's environment, working directory and signal handlers as a console script
    started in ``tmp`` would have them; restored after."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    handlers = {sig: signal.getsignal(sig) for sig in ELASTIC_SIGNALS}
    for key in LAUNCHER_VARIABLES:
        if key not in variables:
            os.environ.pop(key, None)
    os.environ.update(variables)
    os.chdir(tmp)
    try:
        with _quiet_libraries():
            yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@contextmanager
def _captured() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Descriptors 1 and 2 (where the ranks write) and ``sys.stdout``/``sys.stderr`` into two
    files, read into the yielded buffers when the block ends."""
    out, err = io.StringIO(), io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved_streams, saved_fds = (sys.stdout, sys.stderr), (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        os.dup2(out_file.fileno(), 1)
        os.dup2(err_file.fileno(), 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        try:
            yield out, err
        finally:
            sys.stdout.close()
            sys.stderr.close()
            sys.stdout, sys.stderr = saved_streams
            for fd, saved in zip((1, 2), saved_fds):
                os.dup2(saved, fd)
                os.close(saved)
            for file, buffer in ((out_file, out), (err_file, err)):
                file.seek(0)
                buffer.write(file.read().decode(errors="replace"))


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _started_since(before: set[int], wait: float = 5.0) -> list[psutil.Process]:
    """Processes started under this one since ``before`` and still alive after ``wait`` s
    (killed, then named); the warm fork server and multiprocessing's resource tracker, kept
    for the next run, are not the run's."""
    from multiprocessing import forkserver, resource_tracker

    kept = {forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid}
    return _killed_if_left(lambda: psutil.Process().children(recursive=True),
                           lambda p: p.pid not in before | kept, wait)


def one_sentence(stderr: str) -> str:
    """The single line smpcheck ends a failed run with; nothing else on stderr."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smpcheck: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def report_json(tmp: Path, stem: str) -> dict:
    return json.loads((tmp / "reports" / f"{stem}.json").read_text())
