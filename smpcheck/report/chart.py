"""Charts as inline SVG drawn by matplotlib: no script, no font, no request.

``memory_svg``: one line per rank (anonymous RSS, MiB) against seconds since its monitor
started, phases as shaded bands, each rank's bound as a dashed line in the rank's colour,
file-backed RSS (memory-mapped weights) as a thin dotted line.

``compare_svg``: the strategies side by side: node-total and rank-0 peaks as multiples of the
model's size (the model itself marked at 1x), and the time to a ready model.
"""

from __future__ import annotations

import io
from typing import Any

from smpcheck.report.units import human_bytes

MIB = 2**20
PHASE_COLOURS = ["#e8f0fe", "#fef3e0", "#e6f4ea", "#fce8e6", "#f3e8fd", "#e0f7fa"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "path"  # glyphs as paths: no font is fetched or needed
    plt.rcParams["svg.hashsalt"] = "smpcheck"  # stable element ids: same JSON, same HTML
    return plt


def _svg(fig: Any) -> str:
    """The figure as an SVG element to inline in HTML, the same bytes for the same data."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = io.StringIO()
    fig.savefig(out, format="svg", metadata={"Date": None})  # reproducible: JSON -> same HTML
    plt.close(fig)
    svg = out.getvalue()
    return svg[svg.index("<svg") :]  # drop the XML prolog and DOCTYPE: inlined in HTML


def memory_svg(records: list[dict[str, Any]], bounds: list[dict[str, Any]]) -> str:
    """An SVG chart of every rank's memory over time; empty string without samples."""
    if not any(r.get("samples") for r in records):
        return ""
    plt = _pyplot()
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
    return _svg(fig)


def compare_svg(rows: list[dict[str, Any]]) -> str:
    """Strategies side by side: peaks against the model's size, and time to a ready model.

    Each row needs ``strategy``, ``ok``, ``node_total``, ``rank0``, ``model_bytes`` (bytes)
    and ``ready_s``; empty string without rows.
    """
    if not rows:
        return ""
    plt = _pyplot()
    names = [r["strategy"] + ("" if r["ok"] else " (FAIL)") for r in rows][::-1]
    node = [r["node_total"] / (r["model_bytes"] or 1) for r in rows][::-1]
    rank0 = [r["rank0"] / (r["model_bytes"] or 1) for r in rows][::-1]
    node_bytes = [r["node_total"] for r in rows][::-1]
    ready = [r["ready_s"] for r in rows][::-1]
    y = list(range(len(rows)))
    fig, (peaks, times) = plt.subplots(
        1, 2, figsize=(10, 1.2 + 0.6 * len(rows)), dpi=100, width_ratios=[3, 2], sharey=True)
    height = 0.38
    peaks.barh([i + height / 2 for i in y], node, height, color="#1a73e8",
               label="node-total peak above idle")
    peaks.barh([i - height / 2 for i in y], rank0, height, color="#f9ab00", label="rank 0 peak")
    peaks.axvline(1.0, color="#202124", lw=1, ls="--", label="the model's size")
    for i, (x, raw) in enumerate(zip(node, node_bytes)):
        peaks.text(x, i + height / 2, f" {x:.2f}x ({human_bytes(raw)})", va="center",
                   fontsize=7)
    peaks.set_yticks(y, names)
    peaks.set_xlabel("host memory, multiples of the model's parameter bytes")
    peaks.set_xlim(0, max([*node, *rank0, 1.0]) * 1.35)
    peaks.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, frameon=False)
    peaks.grid(axis="x", alpha=0.3)
    times.barh(y, ready, 0.5, color="#34a853")
    for i, seconds in enumerate(ready):
        times.text(seconds, i, f" {seconds:.2f} s", va="center", fontsize=7)
    times.set_xlabel("time to a ready model (s)")
    times.set_xlim(0, max([*ready, 0.01]) * 1.3)
    times.grid(axis="x", alpha=0.3)
    return _svg(fig)
