"""pytest plugin (entry point ``pytest11``): real process groups as a fixture.

Loaded automatically once smpcheck is installed. In a test::

    def check_world(x):               # module level, so ranks can import it
        import torch.distributed as dist
        return dist.get_world_size() * x

    def test_world(ranks):
        assert ranks(check_world, 2, args=(3,)) == [6, 6]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from smpcheck.runner import run_on_ranks


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("smpcheck")
    group.addoption(
        "--smpcheck-timeout",
        type=float,
        default=120.0,
        help="seconds before a distributed test's ranks are stopped and their "
        "stacks reported (default 120)",
    )
    group.addoption(
        "--smpcheck-device",
        default="cpu",
        help="device for the ranks fixture: cpu (gloo) or cuda (NCCL)",
    )


@pytest.fixture
def ranks(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., list[Any]]:
    """``ranks(fn, world_size, args=(), kwargs=None, **options)``: run ``fn`` on real ranks.

    Rendezvous files live in the test's ``tmp_path``; the timeout and device default to the
    ``--smpcheck-timeout`` and ``--smpcheck-device`` options. Returns each rank's result.
    """
    options = {
        "timeout": request.config.getoption("--smpcheck-timeout"),
        "device": request.config.getoption("--smpcheck-device"),
        "workdir": tmp_path,
    }
    return functools.partial(_run_with_defaults, options)


def _run_with_defaults(defaults: dict, fn: Callable, world_size: int, **kwargs: Any) -> list:
    return run_on_ranks(fn, world_size, **{**defaults, **kwargs})
