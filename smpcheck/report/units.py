"""Sizes in words a person reads at a glance: a tiny test model in KiB, not "0 MiB"."""

from __future__ import annotations

MIB = 2**20
GIB = 2**30


def human_bytes(n: float) -> str:
    """Bytes in the unit that keeps every size readable: KiB below 1 MiB, MiB below 10 GiB
    (one decimal below 10 MiB), GiB above."""
    if abs(n) < MIB:
        return f"{n / 1024:.1f} KiB"
    if abs(n) < 10 * GIB:
        return f"{n / MIB:.0f} MiB" if abs(n) >= 10 * MIB else f"{n / MIB:.1f} MiB"
    return f"{n / GIB:.1f} GiB"
