"""Sizes in words a person reads at a glance: a tiny test model in KiB, not "0 MiB"."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``; ``3 * 2**30`` -> ``3.0 GiB``; negative sizes keep their sign."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.1f} {unit}"
    return f"{sign}{n:.0f} B"
