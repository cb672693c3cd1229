"""A rank's tie to the process that launched it: when the launcher dies, even by SIGKILL,
the rank dies too, and nothing is left behind. Shared by the CLI's ranks and the test
runner's; imports nothing heavy, so a rank calls it first."""

from __future__ import annotations

import ctypes
import os
import signal

from smpcheck.run import forks

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; else nothing), so a
    launcher killed with SIGKILL leaves no rank behind. torch's spawn asks for SIGINT, which
    a rank blocked in native code (a collective without a timeout) never acts on. A rank whose
    parent already died exits at once: nobody would reap it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    forks.release()
    if os.getppid() == 1:
        os._exit(1)
