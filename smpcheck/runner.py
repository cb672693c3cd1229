"""Run one function on N real ranks of a process group, and bring the results home.

Tests, the pytest plugin and the CLI's self-launch share this. What it guarantees:

* Rendezvous goes through a ``FileStore`` in a fresh temporary directory: no port is ever
  chosen, so any number of runs (``pytest -n auto``) can proceed side by side.
* Ranks are forked from the process's one warm fork server (:mod:`smpcheck.run.forks`), which
  has already imported torch and transformers, so a rank starts in tens of milliseconds
  instead of re-importing torch (about 1.5 s each).
* A rank's exception comes back as :class:`RankError`, naming the rank, with the child's full
  traceback; a ``pytest.skip`` in a rank skips the caller.
* A hang ends at ``timeout``, counted from the moment every rank has joined the process group
  (start-up has its own ``startup_timeout``), so how fast a loaded machine starts processes
  never decides a verdict: every live rank dumps its Python stack (``faulthandler``) into the
  :class:`RankTimeout` message, then every rank is killed. When one rank fails, the others get
  a short grace period to fail or finish too, and are then killed the same way, so a rank stuck
  in a collective its failed peer never joined cannot stall the caller.
* No process outlives the call: ranks are killed on every exit path and also die with their
  parent (``PR_SET_PDEATHSIG``).

Example:
    >>> def world(x):  # must be importable by name: a module-level function
    ...     import torch.distributed as dist
    ...     return dist.get_rank() * x
    >>> run_on_ranks(world, 2, args=(10,))  # doctest: +SKIP
    [0, 10]
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from smpcheck.run import forks

_DUMP_SIGNAL = signal.SIGUSR1
_STARTED = ("started",)  # a rank's first message: it joined the group
# faulthandler prints the main thread last and its outermost frame last: in a rank forked by
# the fork server, this one. Its arrival is the event that a stack dump is complete.
_LAST_FRAME = 'File "<string>", line 1 in <module>'
_DUMP_WAIT_S = 10.0  # at most, for a rank whose dump never completes (it died meanwhile)
_POLL_S = 0.02


class RankError(RuntimeError):
    """A rank raised; the message carries its rank and its own traceback."""

    def __init__(
        self,
        rank: int,
        exc_type: str,
        child_traceback: str,
        others: str = "",
        failed_ranks: list[int] | None = None,
    ) -> None:
        self.rank = rank
        self.failed_ranks = failed_ranks or [rank]
        self.exc_type = exc_type
        self.child_traceback = child_traceback
        message = f"rank {rank} raised {exc_type}:\n{child_traceback}"
        if others:
            message += f"\n{others}"
        super().__init__(message)


class RankTimeout(TimeoutError):
    """Ranks did not finish in time; the message holds every live rank's Python stack."""


@dataclass(frozen=True)
class RankSpec:
    """What each rank needs to join the group."""

    rank: int
    world_size: int
    store_path: str
    backend: str
    device: str
    dump_path: str
    env: dict[str, str] = field(default_factory=dict)
    own_env: dict[str, str] = field(default_factory=dict)  # the caller's SMPCHECK_* now


def default_backend(device: str) -> str:
    """NCCL for CUDA devices, gloo for everything else."""
    return "nccl" if device.startswith("cuda") else "gloo"


def _rank_main(spec: RankSpec, conn: Connection, fn: Callable, args: tuple, kwargs: dict) -> None:
    """Entry point of one rank: join the group, run ``fn``, send back a tagged result."""
    from smpcheck.run.lifeline import die_with_parent

    die_with_parent()
    forks.adopt_environment(spec.own_env)
    os.environ.update(spec.env)
    with open(spec.dump_path, "w") as dump:
        faulthandler.register(_DUMP_SIGNAL, file=dump, all_threads=True)
        faulthandler.enable(file=dump, all_threads=True)  # a crash leaves its stack there
        try:
            payload = ("ok", _run_in_group(spec, conn, fn, args, kwargs))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            payload = _describe_exception(exc)
        try:
            conn.send(payload)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            conn.send(
                (
                    "error",
                    "UnpicklableResult",
                    f"result of {fn.__name__} could not be pickled: {exc}",
                )
            )
        conn.close()


def _run_in_group(spec: RankSpec, conn: Connection, fn: Callable, args: tuple,
                  kwargs: dict) -> Any:
    import torch
    import torch.distributed as dist

    os.environ.update(
        RANK=str(spec.rank),
        WORLD_SIZE=str(spec.world_size),
        LOCAL_RANK=str(spec.rank),
        LOCAL_WORLD_SIZE=str(spec.world_size),
    )
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(spec.rank % torch.cuda.device_count())
    store = dist.FileStore(spec.store_path, spec.world_size)
    dist.init_process_group(spec.backend, store=store, rank=spec.rank, world_size=spec.world_size)
    # Every rank has finished connecting before any runs ``fn``: a rank whose ``fn`` returns
    # at once left while its peer was still in gloo's connectFullMesh, failing the peer's
    # init (seen under load).
    dist.barrier()
    conn.send(_STARTED)
    try:
        return fn(*args, **kwargs)
    finally:
        dist.destroy_process_group()


def _describe_exception(exc: BaseException) -> tuple[str, str, str]:
    text = "".join(traceback.format_exception(exc))
    if type(exc).__name__ == "Skipped":  # pytest.skip, told apart without importing pytest
        return ("skip", type(exc).__name__, getattr(exc, "msg", str(exc)))
    return ("error", f"{type(exc).__module__}.{type(exc).__qualname__}", text)


def _dump_stacks(procs: Sequence[mp.Process], specs: Sequence[RankSpec], why: str) -> str:
    """Ask every live rank for its Python stack, then read what each wrote."""
    live = [(p, s) for p, s in zip(procs, specs) if p.is_alive()]
    for proc, _ in live:
        try:
            os.kill(proc.pid, _DUMP_SIGNAL)
        except ProcessLookupError:
            pass
    parts = [why]
    for proc, spec in live:
        text = _completed_dump(proc, Path(spec.dump_path)) or "(no stack written)"
        parts.append(f"--- rank {spec.rank} stack ---\n{text}")
    return "\n".join(parts)


def _completed_dump(proc: mp.Process, path: Path) -> str:
    """The rank's stack once its dump is complete (its last frame written), or whatever it
    wrote if it died first or ``_DUMP_WAIT_S`` passed."""
    end = time.monotonic() + _DUMP_WAIT_S
    while True:
        text = path.read_text(errors="replace").strip()
        if text.endswith(_LAST_FRAME) or not proc.is_alive() or time.monotonic() > end:
            return text
        time.sleep(_POLL_S)


def _stack_at_death(spec: RankSpec) -> str:
    """What ``faulthandler`` wrote when the rank crashed, if it could write anything."""
    try:
        text = Path(spec.dump_path).read_text(errors="replace").strip()
    except OSError:
        return ""
    return f"\n--- rank {spec.rank} stack when it died ---\n{text}" if text else ""


def _kill(procs: Sequence[mp.Process]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(timeout=5)


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: tuple = (),
    kwargs: dict | None = None,
    device: str = "cpu",
    backend: str | None = None,
    timeout: float = 120.0,
    grace: float = 5.0,
    startup_timeout: float = 300.0,
    workdir: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks of a fresh process group.

    Args:
        fn: a module-level function (ranks import it by name). It runs after
            ``init_process_group``; ``RANK``/``WORLD_SIZE`` are set in its environment.
        world_size: number of ranks, each its own process.
        args, kwargs: passed to ``fn`` on every rank (pickled).
        device: ``"cpu"`` or ``"cuda"``; picks the backend when ``backend`` is None.
        backend: process-group backend, default gloo on CPU and NCCL on CUDA.
        timeout: seconds from the moment every rank joined the process group until all
            ranks are stopped and their stacks reported.
        grace: seconds the other ranks get to finish after one rank fails.
        startup_timeout: seconds every rank gets to start and join the process group.
        workdir: where the rendezvous file and stack dumps go (a temporary directory if None).
        env: extra environment variables for the ranks.

    Returns:
        Each rank's return value, indexed by rank.

    Raises:
        RankError: a rank raised; names the first failing rank with its traceback.
        RankTimeout: the ranks did not join within ``startup_timeout`` or finish within
            ``timeout``; holds every rank's stack.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    backend = backend or default_backend(device)
    with tempfile.TemporaryDirectory(prefix="smpcheck-ranks-", dir=workdir) as tmp:
        specs = [
            RankSpec(
                rank,
                world_size,
                os.path.join(tmp, "store"),
                backend,
                device,
                os.path.join(tmp, f"stack-{rank}.txt"),
                dict(env or {}),
                forks.own_environment(),
            )
            for rank in range(world_size)
        ]
        ctx = forks.context()
        pipes = [ctx.Pipe(duplex=False) for _ in specs]
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(spec, send, fn, args, kwargs or {}),
                name=f"smpcheck-rank-{spec.rank}",
                daemon=True,
            )
            for spec, (_, send) in zip(specs, pipes)
        ]
        try:
            for proc in procs:
                proc.start()
            for _, send in pipes:
                send.close()
            return _collect([recv for recv, _ in pipes], procs, specs, timeout, grace,
                            startup_timeout)
        finally:
            _kill(procs)


def _collect(
    conns: list[Connection],
    procs: list[mp.Process],
    specs: list[RankSpec],
    timeout: float,
    grace: float,
    startup_timeout: float,
) -> list[Any]:
    """Wait for every rank's payload; turn the first failure or a deadline into an error. The
    ``timeout`` starts once every rank has said it joined the group."""
    deadline = time.monotonic() + startup_timeout
    payloads: dict[int, tuple] = {}
    pending = {conn: spec.rank for conn, spec in zip(conns, specs)}
    joining = {spec.rank for spec in specs}
    first_failure: int | None = None
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if first_failure is not None:
                break
            what = (f"did not join the process group within {startup_timeout:.0f} s"
                    if joining else f"did not finish within {timeout:.0f} s")
            raise RankTimeout(
                _dump_stacks(
                    procs,
                    specs,
                    f"{len(pending)} of {len(specs)} ranks {what} (ranks "
                    f"{sorted(joining or pending.values())}); stacks follow",
                )
            )
        for conn in wait(list(pending), timeout=remaining):
            rank = pending[conn]
            try:
                payload = conn.recv()
            except EOFError:
                code = procs[rank].exitcode
                procs[rank].join(timeout=1)
                payload = (
                    "error",
                    "RankDied",
                    f"rank {rank} exited with code {procs[rank].exitcode or code} "
                    "before returning a result (killed by a signal or os._exit)"
                    + _stack_at_death(specs[rank]),
                )
            if payload == _STARTED:
                joining.discard(rank)
                if not joining and first_failure is None:
                    deadline = time.monotonic() + timeout
                continue
            del pending[conn]
            joining.discard(rank)
            payloads[rank] = payload
            if payload[0] != "ok" and first_failure is None:
                first_failure = rank
                deadline = min(deadline, time.monotonic() + grace)
    if first_failure is not None:
        _raise_failure(payloads, first_failure, procs, specs, sorted(pending.values()))
    return [payloads[rank][1] for rank in range(len(specs))]


def _raise_failure(
    payloads: dict[int, tuple],
    rank: int,
    procs: list[mp.Process],
    specs: list[RankSpec],
    stuck: list[int],
) -> None:
    kind, exc_type, text = payloads[rank]
    if kind == "skip":
        import pytest

        pytest.skip(f"rank {rank}: {text}")
    others = [
        f"rank {r} also raised {p[1]}: {p[2].strip().splitlines()[-1]}"
        for r, p in sorted(payloads.items())
        if r != rank and p[0] == "error"
    ]
    stacks = ""
    if stuck:
        stacks = _dump_stacks(
            procs,
            specs,
            f"ranks {stuck} were still running after rank "
            f"{rank} failed (waiting on it in a collective?); stacks follow",
        )
    failed = sorted(r for r, p in payloads.items() if p[0] == "error")
    raise RankError(rank, exc_type, text, "\n".join(others + ([stacks] if stacks else [])), failed)
