"""Two "nodes" on one machine: two torchrun agents (``--nnodes 2``, c10d rendezvous on
localhost), each in its own UTS namespace with its own host name (``unshare --uts``, root
only), each reading its own copy of the checkpoint, as nodes with local disks do.

For each strategy (the SMP recipe, every rank loading its own copy, and accelerate's FSDP
plugin with ``cpu_ram_efficient_loading``, transformers' own rank-0 loading) it runs
``smpcheck run`` twice: with both copies equal (every check passes; the report shows each
rank's host and the bytes it read), and with node-b's copy stale (the same architecture, older
values): the checkpoint check names node-b's ranks and host, whichever rank loaded.

    python benchmarks/two_nodes.py --out benchmarks/results/two-nodes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.models import FAMILIES, write_checkpoint  # noqa: E402

NODES = ("node-a", "node-b")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_nodes(copies: dict[str, Path], strategy: str, out: Path, per_node: int) -> dict:
    """Both agents at once; returns each node's exit code and rank 0's JSON report."""
    port = free_port()  # the c10d store of node-a's agent; only this script runs here
    procs = {}
    for node_rank, host in enumerate(NODES):
        report_dir = out / host
        shutil.rmtree(report_dir, ignore_errors=True)
        command = (f"hostname {host}; exec {sys.executable} -m torch.distributed.run "
                   f"--nnodes 2 --nproc-per-node {per_node} --node-rank {node_rank} "
                   f"--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{port} --rdzv-id two-nodes "
                   f"--local-addr 127.0.0.1 "  # the made-up host names do not resolve
                   f"-m smpcheck run {copies[host]} --strategy {strategy} "
                   f"--report-dir {report_dir}")
        log = (out / f"{strategy}-{host}.log").open("w")
        procs[host] = subprocess.Popen(["unshare", "--uts", "sh", "-c", command], stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
    try:
        codes = {host: proc.wait(timeout=300) for host, proc in procs.items()}
    finally:
        for proc in procs.values():  # a node whose peer failed keeps waiting on the rendezvous
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    reports = [p for host in NODES for p in (out / host).glob("smpcheck-*.json")]
    report = json.loads(reports[0].read_text()) if reports else {}
    return {"exit_codes": codes, "report": report}


def summary(result: dict) -> dict:
    report = result["report"]
    parity = next((r for r in report.get("results", []) if r["name"] == "checkpoint_parity"),
                  {})
    return {"exit_codes": result["exit_codes"],
            "hosts": report.get("environment", {}).get("rank_hosts"),
            "reads": report.get("expected", {}).get("reads"),
            "checkpoint_parity": parity.get("status"),
            "findings": [f"{f['tensor']} (ranks {f['ranks']}): {f['problem']}"
                         for f in parity.get("findings", []) if f["severity"] == "error"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/two-nodes"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/smpcheck-two-nodes"))
    parser.add_argument("--per-node", type=int, default=2)
    parser.add_argument("--strategies", default="smp,naive,accelerate-fsdp",
                        help="accelerate-fsdp is transformers' own rank-0 loading")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cls, kwargs = FAMILIES["llama-gqa-untied"]
    fresh = write_checkpoint(cls(**kwargs), args.workdir / "fresh", seed=0)
    stale = write_checkpoint(cls(**kwargs), args.workdir / "stale", seed=1)
    results = {}
    for case, node_b in (("same copies", fresh), ("stale copy on node-b", stale)):
        for strategy in args.strategies.split(","):
            outcome = run_two_nodes({"node-a": fresh, "node-b": node_b}, strategy, args.out,
                                    args.per_node)
            results[f"{case}, {strategy}"] = summary(outcome)
            print(case, strategy, json.dumps(results[f"{case}, {strategy}"], indent=1),
                  flush=True)
    (args.out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
