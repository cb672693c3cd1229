"""The fault-injection campaign: every fault a cluster inflicts, at every phase of a run.

Each cell is one ``smpcheck run`` of the demo model on 2 local ranks (TP 2 for the transform
phase, which only a TP run has) and one planted fault (:mod:`smpcheck.run.faults`), judged by
``tests/fault_cells.py``: its exit code, one closing sentence naming the rank and the cause,
the report written or the sentence saying why not, no process left, and the checkpoint as the
fault left it (digests before and after). Writes ``cells.json`` and ``table.md`` (faults
against phases, the count that ended well) to ``--out``.

    python benchmarks/fault_campaign.py --out benchmarks/results/fault-campaign
    python benchmarks/fault_campaign.py --kinds kill,stall --phases load,coverage
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smpcheck.checkpoint.demo import demo_checkpoint  # noqa: E402
from tests.fault_cells import KINDS, PHASES, Cell, run_cell  # noqa: E402

RANK = {"kill": 1, "stall": 1, "eio": 1, "vanish": 1}  # the rank each fault hits (else 0)


def table(cells: list[Cell], kinds: list[str], phases: list[str]) -> str:
    """Faults down, phases across: the exit code where a cell ended well, ``FAIL`` where not;
    the last column counts the cells that ended well."""
    by = {(c.kind, c.phase): c for c in cells}
    lines = ["| fault (rank) | " + " | ".join(phases) + " | ended well |",
             "|---|" + "---|" * (len(phases) + 1)]
    for kind in kinds:
        row = [by.get((kind, p)) for p in phases]
        marks = ["" if c is None else (f"{c.code}" + ("*" if c.note else "")) if c.ok else
                 "FAIL" for c in row]
        done = [c for c in row if c is not None]
        lines.append(f"| {kind} ({RANK.get(kind, 0)}) | " + " | ".join(marks)
                     + f" | {sum(c.ok for c in done)}/{len(done)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fault-campaign"))
    args = parser.parse_args()
    kinds, phases = args.kinds.split(","), args.phases.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    source = demo_checkpoint()
    cells: list[Cell] = []
    start = time.monotonic()
    for kind in kinds:
        for phase in phases:
            with tempfile.TemporaryDirectory(prefix="smpcheck-fault-") as work:
                cell = run_cell(kind, phase, RANK.get(kind, 0), source, Path(work))
            cells.append(cell)
            verdict = "ok" if cell.ok else f"PROBLEMS {cell.problems}"
            print(f"{kind:8} {phase:17} exit {cell.code} {cell.seconds:5.1f} s {verdict}: "
                  f"{cell.note or cell.sentence[:160]}", flush=True)
            (args.out / "cells.json").write_text(json.dumps([asdict(c) for c in cells],
                                                            indent=1))
    took = time.monotonic() - start
    text = table(cells, kinds, phases)
    good = sum(c.ok for c in cells)
    text += (f"\n{good} of {len(cells)} cells ended well in {took / 60:.0f} min; * = the fault "
             "met nothing (an eio after the rank's last read: the run passed, exit 0).\n")
    (args.out / "table.md").write_text(text)
    print(text)
    return 0 if good == len(cells) else 1


if __name__ == "__main__":
    sys.exit(main())
