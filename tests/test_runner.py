"""The distributed runner: results, errors with rank and traceback, skips, hangs, no leftovers."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from smpcheck.runner import RankError, RankTimeout, run_on_ranks


def all_reduce_rank() -> tuple[int, int, int]:
    import torch
    import torch.distributed as dist

    t = torch.tensor([dist.get_rank()])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), int(t)


def fail_on(rank: int) -> None:
    import torch.distributed as dist

    if dist.get_rank() == rank:
        raise ValueError(f"planted failure on rank {rank}")


def fail_then_peer_waits() -> None:
    """Rank 1 fails once rank 0 waits on something that never comes (said through the store:
    failing earlier, rank 1 could leave while rank 0 still set up its connections, and rank 0
    would raise too instead of waiting)."""
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 1:
        store.wait(["rank0-waits"])
        raise KeyError("rank 1 gave up")
    store.set("rank0-waits", "1")
    time.sleep(3600)


def hang_in_collective(pid_dir: str) -> None:
    import torch
    import torch.distributed as dist

    open(os.path.join(pid_dir, f"{dist.get_rank()}.pid"), "w").write(str(os.getpid()))
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    else:
        time.sleep(3600)


def skip_on_ranks() -> None:
    pytest.skip("needs a feature this rank lacks")


def hard_exit() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        os._exit(3)


def crash_in_native_code() -> None:
    import ctypes

    import torch.distributed as dist

    if dist.get_rank() == 1:
        ctypes.string_at(0)  # a read at address 0: SIGSEGV, as a native bug would
    dist.barrier()


def my_pid() -> int:
    return os.getpid()


def _children_alive(pids: list[int]) -> list[int]:
    return [
        p
        for p in pids
        if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_results_come_back_by_rank(world_size: int, tmp_path) -> None:
    total = sum(range(world_size))
    assert run_on_ranks(all_reduce_rank, world_size, workdir=tmp_path) == [
        (r, world_size, total) for r in range(world_size)
    ]


def test_child_exception_names_rank_and_traceback(tmp_path) -> None:
    with pytest.raises(RankError) as err:
        run_on_ranks(fail_on, 2, args=(1,), workdir=tmp_path)
    assert err.value.rank == 1
    assert "ValueError" in err.value.exc_type
    assert "planted failure on rank 1" in str(err.value)
    assert "in fail_on" in err.value.child_traceback


def test_peer_stuck_after_failure_is_stopped_with_its_stack(tmp_path) -> None:
    start = time.monotonic()
    with pytest.raises(RankError) as err:
        run_on_ranks(fail_then_peer_waits, 2, timeout=60, grace=1, workdir=tmp_path)
    assert time.monotonic() - start < 30, "the grace period, not the timeout, should end it"
    assert err.value.rank == 1 and "rank 1 gave up" in str(err.value)
    assert "rank 0 stack" in str(err.value) and "fail_then_peer_waits" in str(err.value)


def test_hang_times_out_with_every_rank_stack_and_no_leftovers(tmp_path) -> None:
    pids = run_on_ranks(my_pid, 2, workdir=tmp_path)
    assert not _children_alive(pids)
    with pytest.raises(RankTimeout) as err:
        run_on_ranks(hang_in_collective, 2, args=(str(tmp_path),), timeout=4, workdir=tmp_path)
    text = str(err.value)
    assert "rank 0 stack" in text and "rank 1 stack" in text
    assert "hang_in_collective" in text
    hung = [int((tmp_path / f"{r}.pid").read_text()) for r in range(2)]
    assert not _children_alive(hung), "a hung rank was left behind"


def test_skip_in_a_rank_skips_the_test(tmp_path) -> None:
    with pytest.raises(pytest.skip.Exception, match="needs a feature"):
        run_on_ranks(skip_on_ranks, 2, workdir=tmp_path)


def test_rank_that_dies_without_a_result_is_named(tmp_path) -> None:
    with pytest.raises(RankError, match="rank 1 exited with code 3"):
        run_on_ranks(hard_exit, 2, workdir=tmp_path)


def test_rank_that_crashes_leaves_its_stack_in_the_error(tmp_path) -> None:
    with pytest.raises(RankError) as err:
        run_on_ranks(crash_in_native_code, 2, workdir=tmp_path, timeout=60)
    text = str(err.value)
    assert f"rank 1 exited with code -{int(signal.SIGSEGV)}" in text, text
    assert "rank 1 stack when it died" in text and "crash_in_native_code" in text, text


def test_fixture_from_plugin(ranks) -> None:
    assert [r[0] for r in ranks(all_reduce_rank, 2)] == [0, 1]


def forked_from_the_fork_server() -> bool:
    from smpcheck.run import forks

    return forks._in_the_fork_server()


def test_only_the_fork_server_skips_its_teardown(tmp_path) -> None:
    """The server leaves at once when its launcher is gone (its ranks die only after it), and
    nothing else does: this process is not a fork server; a rank, forked from one, sees the
    server's command line."""
    from smpcheck.run import forks

    assert not forks._in_the_fork_server()
    assert run_on_ranks(forked_from_the_fork_server, 1, workdir=tmp_path) == [True]


def server_and_variables() -> tuple[int, str | None, str | None]:
    return os.getppid(), os.environ.get("SMPCHECK_PROBE"), os.environ.get("SMPCHECK_GONE")


def test_ranks_fork_from_one_warm_server_that_hands_over_each_launchs_variables(
        tmp_path, monkeypatch) -> None:
    """smpcheck's own variables reach each launch's ranks as they are at that launch (a fork
    server's children otherwise get its start-up environment); the server is kept while only
    those change, and restarted when another variable does (a library may read it once)."""
    monkeypatch.setenv("SMPCHECK_PROBE", "first")
    monkeypatch.setenv("SMPCHECK_GONE", "here")
    first = run_on_ranks(server_and_variables, 1, workdir=tmp_path)[0]
    monkeypatch.setenv("SMPCHECK_PROBE", "second")
    monkeypatch.delenv("SMPCHECK_GONE")
    second = run_on_ranks(server_and_variables, 1, workdir=tmp_path)[0]
    assert first[1:] == ("first", "here") and second[1:] == ("second", None)
    assert second[0] == first[0], "the server was restarted for smpcheck's own variables"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    third = run_on_ranks(server_and_variables, 1, workdir=tmp_path)[0]
    assert third[0] != first[0], "a library's variable changed under a kept server"


def test_only_smpchecks_own_variables_are_handed_over(monkeypatch) -> None:
    from smpcheck.run import forks

    monkeypatch.setenv("SMPCHECK_A", "1")
    monkeypatch.setenv("SMPCHECK_STALE", "old")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    own = forks.own_environment()
    assert own["SMPCHECK_A"] == "1" and "OMP_NUM_THREADS" not in own
    monkeypatch.setenv("SMPCHECK_A", "2")
    forks.adopt_environment({k: v for k, v in own.items() if k != "SMPCHECK_STALE"})
    assert os.environ["SMPCHECK_A"] == "1" and "SMPCHECK_STALE" not in os.environ
    assert os.environ["OMP_NUM_THREADS"] == "3"  # a library's: never touched in a rank
