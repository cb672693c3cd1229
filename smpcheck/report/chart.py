"""The memory timeline as an inline SVG drawn by matplotlib: no script, no font, no request.

One line per rank (anonymous RSS, MiB) against seconds since its monitor started, phases as
shaded bands, each rank's bound as a dashed line in the rank's colour, file-backed RSS
(memory-mapped weights) as a thin dotted line.
"""

from __future__ import annotations

import io
from typing import Any

MIB = 2**20
PHASE_COLOURS = ["#e8f0fe", "#fef3e0", "#e6f4ea", "#fce8e6", "#f3e8fd", "#e0f7fa"]


def memory_svg(records: list[dict[str, Any]], bounds: list[dict[str, Any]]) -> str:
    """An SVG chart of every rank's memory over time; empty string without samples."""
    if not any(r.get("samples") for r in records):
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "path"  # glyphs as paths: no font is fetched or needed
    plt.rcParams["svg.hashsalt"] = "smpcheck"  # stable element ids: same JSON, same HTML
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=100)
    colours = plt.get_cmap("tab10")
    phases = records[0].get("phases", [])
    for i, phase in enumerate(phases):
        ax.axvspan(
            phase["start"],
            phase["end"] or phase["start"],
            color=PHASE_COLOURS[i % len(PHASE_COLOURS)],
            zorder=0,
        )
        ax.text(
            phase["start"],
            1.01 + 0.045 * (i % 2),
            phase["name"],
            ha="left",
            va="bottom",
            fontsize=8,
            transform=ax.get_xaxis_transform(),
        )
    by_rank = {b["rank"]: b for b in bounds}
    for record in records:
        rank = record["rank"]
        colour = colours(rank % 10)
        t = [s[0] for s in record["samples"]]
        ax.plot(
            t,
            [s[1] / MIB for s in record["samples"]],
            color=colour,
            lw=1.4,
            label=f"rank {rank} anonymous",
        )
        ax.plot(t, [s[2] / MIB for s in record["samples"]], color=colour, lw=0.8, ls=":")
        if rank in by_rank:
            ax.axhline(
                by_rank[rank]["limit"] / MIB,
                color=colour,
                lw=1,
                ls="--",
                label=f"rank {rank} bound",
            )
    ax.set_xlabel("seconds since the monitor started")
    ax.set_ylabel("MiB (dotted: file-backed, mapped weights)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    fig.tight_layout()
    out = io.StringIO()
    fig.savefig(out, format="svg", metadata={"Date": None})  # reproducible: JSON -> same HTML
    plt.close(fig)
    svg = out.getvalue()
    return svg[svg.index("<svg") :]  # drop the XML prolog and DOCTYPE: inlined in HTML
