"""Architecture sweep: every model type of transformers' auto mappings, tiny, on 2 gloo ranks.

The tests pin a handful of families; a check that misjudges an architecture nobody wrote a test
for shows only in a user's report. So for every type of the chosen mapping(s) this writes a
tiny checkpoint (``tests/tiny_configs.py``: the config class's defaults shrunk generically,
every parameter perturbed), checks that the unwrapped model runs one forward (a model that
cannot is not smpcheck's to judge), then on 2 real gloo ranks loads it with
``from_pretrained`` on every rank, ``fully_shard``-s each block and the root, and calls
``smpcheck.verify(model, checkpoint=path)``: a correct setup, so every failing check is a
false failure. Then rank 1 adds 1.0 to one element of one parameter's local shard and
``verify`` runs again: the report must fail naming that parameter.

Several types share one 2-rank job (a job's start-up costs more than a tiny type); a type that
hangs or desynchronises the ranks ends its job (a per-type watchdog), is recorded with what
the ranks said, and the rest of the batch runs in a new job.

    python benchmarks/arch_sweep.py --mapping causal_lm
    python benchmarks/arch_sweep.py --mapping causal_lm --types llama,gpt2,mixtral --batch 3

Writes ``OUT/sweep.json`` (one record per type) and ``OUT/sweep.md`` (a table), after every
job, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.tiny_configs import (  # noqa: E402
    MAPPINGS,
    auto_class,
    mapped_class,
    mapped_types,
    perturb,
    tiny_model,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "arch-sweep"
SEQUENCE = 16
MAX_SENTENCES = 12  # finding sentences kept per failing check
RANK_ENV = {"OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONWARNINGS": "ignore", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def quiet() -> None:
    """No warnings or progress bars: two hundred types of them would bury the summary."""
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def one_line(exc: BaseException | str, limit: int = 400) -> str:
    """An error as one line: what a table cell and a grouping key can hold."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return one_line(lines[-1]) if lines else ""


# -- in the parent: build, run unwrapped, save --------------------------------------------------

def simple_batch(config: Any) -> dict[str, Any]:
    """The forward check's own batch where it builds one (16 ids from the text vocabulary);
    an encoder-decoder also gets the same ids as decoder inputs."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or 256
    ids = torch.randint(0, vocab, (1, SEQUENCE), generator=torch.Generator().manual_seed(0))
    batch: dict[str, Any] = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        batch["decoder_input_ids"] = ids
    if hasattr(config, "use_cache"):
        batch["use_cache"] = False
    return batch


def prepare(model_type: str, mapping: str, path: Path, seed: int) -> dict[str, Any]:
    """Write the tiny checkpoint and run it unwrapped; the record says how far it got."""
    record: dict[str, Any] = {"mapping": mapping, "model_type": model_type,
                              "class": mapped_class(model_type, mapping), "stage": "none"}
    start = time.monotonic()
    try:
        _, model = tiny_model(model_type, mapping, seed)
    except Exception as exc:  # noqa: BLE001 - transformers' own error is the record
        record["error"] = f"cannot build tiny: {one_line(exc)}"
        record["parent_seconds"] = round(time.monotonic() - start, 2)
        return record
    record.update(stage="built", class_built=type(model).__name__,
                  parameters=sum(p.numel() for p in model.parameters()))
    perturb(model, seed)
    try:
        with torch.no_grad():
            model.eval()
            model(**simple_batch(model.config))
        record["stage"] = "forward"
    except Exception as exc:  # noqa: BLE001
        record["error"] = f"unwrapped forward fails: {one_line(exc)}"
    if record["stage"] == "forward":
        try:
            model.save_pretrained(path)
            record["checkpoint"] = str(path)
        except Exception as exc:  # noqa: BLE001
            record.update(stage="built", error=f"save_pretrained fails: {one_line(exc)}")
    record["parent_seconds"] = round(time.monotonic() - start, 2)
    return record


# -- on the ranks ---------------------------------------------------------------------------------

def shares_outside(model: torch.nn.Module, name: str, module: torch.nn.Module) -> bool:
    """Whether a parameter of ``module`` is also held by a module outside it (tied input and
    output embeddings, a block shared between layers): FSDP2 must then shard it with its
    partner, so the block is left to the root's group, as a correct setup does."""
    inside = {id(p) for p in module.parameters()}
    prefix = name + "."
    for path, other in model.named_modules(remove_duplicate=False):
        if path == name or path.startswith(prefix):
            continue
        if any(p is not None and id(p) in inside for p in other._parameters.values()):
            return True
    return False


def blocks_of(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The repeated blocks to shard, outermost only: modules whose class the model names in
    ``_no_split_modules``, else the elements of its longest ``ModuleList``; none that
    shares a parameter with a module outside it."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [(n, m) for n, m in model.named_modules() if n and type(m).__name__ in names]
    if not found:
        lists = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.ModuleList) and len(m)]
        if lists:
            name, longest = max(lists, key=lambda nm: len(nm[1]))
            found = [(f"{name}.{i}", m) for i, m in enumerate(longest)]
    prefixes = [n + "." for n, _ in found]
    return [(n, m) for n, m in found if not any(n.startswith(p) for p in prefixes)
            and not shares_outside(model, n, m)]


def wrap(model: torch.nn.Module) -> list[str]:
    """FSDP2 on each block, innermost first, then on the root; returns the blocks' names."""
    from torch.distributed.fsdp import fully_shard

    blocks = blocks_of(model)
    for _, module in reversed(blocks):
        fully_shard(module)
    fully_shard(model)
    return [n for n, _ in blocks]


def plant_fault(model: torch.nn.Module, blocks: list[str]) -> str | None:
    """Add 1.0 to one element of this rank's local shard of one parameter (a block's, where
    one has a non-empty shard here); returns its name, None when no shard here is non-empty."""
    candidates = []
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if local.numel() and local.is_floating_point():
            in_block = any(name.startswith(b + ".") for b in blocks)
            candidates.append((not in_block, name, local))
    if not candidates:
        return None
    _, name, local = min(candidates, key=lambda c: c[0])
    with torch.no_grad():
        local[(0,) * local.dim()] += 1.0
    return name


def describe(report: Any) -> dict[str, Any]:
    """Every check's status, and each failing check's message, sentences and traceback."""
    failing = []
    for r in report.results:
        if r.status.value not in ("fail", "error"):
            continue
        sentences = [f.sentence() for f in r.findings if f.severity == "error"]
        failing.append({"name": r.name, "status": r.status.value, "message": r.message,
                        "findings": sentences[:MAX_SENTENCES], "findings_total": len(sentences),
                        "tensors": sorted({f.tensor for f in r.findings
                                           if f.severity == "error"})[:50],
                        "traceback_last": last_line(r.traceback),
                        "traceback": r.traceback[-3000:]})
    return {"ok": bool(report.ok), "statuses": {r.name: r.status.value for r in report.results},
            "failing": failing}


def _append(progress: str, event: dict[str, Any]) -> None:
    with open(progress, "a") as handle:
        handle.write(json.dumps(event, default=str) + "\n")


class Watchdog:
    """Ends this rank when one type runs past its time: a hang in a collective (one rank
    raised, the other waits) would otherwise hold the whole batch to the job's timeout."""

    def __init__(self, progress: str, rank: int, model_type: str, seconds: float) -> None:
        self.progress, self.rank, self.model_type = progress, rank, model_type
        self.stage = "load"
        self.timer = threading.Timer(seconds, self._expire, args=(seconds,))
        self.timer.daemon = True
        self.timer.start()

    def _expire(self, seconds: float) -> None:
        stacks = io.StringIO()
        try:
            with tempfile.TemporaryFile("w+") as handle:
                faulthandler.dump_traceback(handle, all_threads=True)
                handle.seek(0)
                stacks.write(handle.read())
        except OSError:
            pass
        _append(self.progress, {"event": "timeout", "rank": self.rank,
                                "model_type": self.model_type, "stage": self.stage,
                                "error": f"{self.stage} did not finish within {seconds:.0f} s "
                                         f"on rank {self.rank}",
                                "stack": stacks.getvalue()[-4000:]})
        os._exit(3)

    def cancel(self) -> None:
        self.timer.cancel()


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _one_type(item: dict[str, Any], rank: int, dog: Watchdog) -> dict[str, Any]:
    """Load, wrap, verify, plant, verify again: one type on this rank."""
    import smpcheck

    out: dict[str, Any] = {"model_type": item["model_type"]}
    start = time.monotonic()
    model, blocks, failed = None, [], None
    try:
        model = auto_class(item["mapping"]).from_pretrained(item["path"])
        dog.stage = "wrap"
        blocks = wrap(model)
    except Exception as exc:  # noqa: BLE001
        failed = (dog.stage, one_line(exc), traceback.format_exc()[-3000:])
    failures = _gather(failed)
    bad = [(r, f) for r, f in enumerate(failures) if f is not None]
    if bad:
        r, (stage, text, tb) = bad[0]
        out.update(stage="loaded" if stage == "wrap" else "forward",
                   error=f"{stage} fails on rank {r}: {text}", traceback=tb)
        return out
    out.update(stage="wrapped", blocks=len(blocks), block_example=blocks[0] if blocks else "")
    dog.stage = "verify (clean)"
    try:
        report = smpcheck.verify(model, checkpoint=item["path"])
    except Exception as exc:  # noqa: BLE001 - the ranks may now be out of step: end the job
        out.update(error=f"verify raised: {one_line(exc)}", traceback=traceback.format_exc(),
                   verify_raised=True)
        return out
    out.update(stage="verified", clean=describe(report),
               clean_seconds=round(time.monotonic() - start, 2))
    dog.stage = "plant fault"
    name = _gather(plant_fault(model, blocks) if rank == 1 else None)[1]
    if name is None:
        out["fault"] = {"planted": False}
        return out
    dog.stage = "verify (fault)"
    fault_start = time.monotonic()
    try:
        faulty = describe(smpcheck.verify(model, checkpoint=item["path"]))
    except Exception as exc:  # noqa: BLE001
        out["fault"] = {"planted": True, "tensor": name, "named": False,
                        "error": f"verify raised: {one_line(exc)}"}
        out["verify_raised"] = True
        return out
    naming = [f["name"] for f in faulty["failing"] if any(name in t for t in f["tensors"])]
    out.update(stage="fault", fault={
        "planted": True, "tensor": name, "named": bool(naming), "ok": faulty["ok"],
        "naming_checks": naming, "failing_checks": [f["name"] for f in faulty["failing"]],
        "seconds": round(time.monotonic() - fault_start, 2)})
    return out


def rank_batch(items: list[dict[str, Any]], progress: str, type_timeout: float) -> int:
    """Rank function: every type of ``items`` in turn; rank 0 appends each record to
    ``progress`` (the parent reads it even when the job dies)."""
    import torch.distributed as dist

    quiet()
    torch.set_num_threads(1)
    rank = dist.get_rank()
    for item in items:
        if rank == 0:
            _append(progress, {"event": "start", "model_type": item["model_type"]})
        dog = Watchdog(progress, rank, item["model_type"], type_timeout)
        start = time.monotonic()
        try:
            out = _one_type(item, rank, dog)
        except Exception as exc:  # noqa: BLE001 - a collective of ours failed: end the job
            _append(progress, {"event": "error", "rank": rank, "model_type": item["model_type"],
                               "stage": dog.stage, "error": one_line(exc),
                               "traceback": traceback.format_exc()[-3000:]})
            raise
        finally:
            dog.cancel()
        out["rank_seconds"] = round(time.monotonic() - start, 2)
        if rank == 0 or out.get("verify_raised"):
            _append(progress, {"event": "done", "rank": rank, **out})
        if out.get("verify_raised"):
            raise RuntimeError(f"verify raised on rank {rank} for {item['model_type']}: "
                               "ending the job, the ranks may be out of step")
        del out
        gc.collect()
    return len(items)


# -- the parent's loop over jobs ------------------------------------------------------------------

def read_progress(progress: Path) -> list[dict[str, Any]]:
    if not progress.exists():
        return []
    return [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]


def run_batch(items: list[dict[str, Any]], work: Path, type_timeout: float,
              index: int) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """One job over ``items`` (retried from the first type it did not reach, in new jobs);
    returns the rank records by type and the job notes."""
    from smpcheck.runner import RankError, RankTimeout, run_on_ranks

    results: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    pending = list(items)
    attempt = 0
    while pending:
        progress = work / f"progress-{index}-{attempt}.jsonl"
        job_error = ""
        start = time.monotonic()
        try:
            run_on_ranks(rank_batch, 2, args=(pending, str(progress), type_timeout),
                         timeout=type_timeout * len(pending) + 60, env=RANK_ENV)
        except (RankError, RankTimeout) as exc:
            job_error = last_line(getattr(exc, "child_traceback", "") or str(exc))
        events = read_progress(progress)
        notes.append(f"job {index}.{attempt}: {len(pending)} types, "
                     f"{time.monotonic() - start:.1f} s" + (f", ended: {job_error}"
                                                            if job_error else ""))
        started = [e["model_type"] for e in events if e["event"] == "start"]
        for event in events:
            if event["event"] == "done" and (event["rank"] == 0 or event.get("verify_raised")):
                results.setdefault(event["model_type"], event)
        for model_type in started:
            if model_type in results:
                continue
            why = [e for e in events if e["model_type"] == model_type
                   and e["event"] in ("timeout", "error")]
            first = why[0] if why else {}
            results[model_type] = {
                "model_type": model_type, "stage": "forward", "job_died": True,
                "hung_in": first.get("stage", ""),
                "error": f"rank job ended: {first.get('error') or job_error or 'unknown'}",
                "traceback": first.get("traceback") or first.get("stack", "")}
        reached = set(started)
        if not job_error and not reached >= {i["model_type"] for i in pending}:
            job_error = "the job returned before every type started"
        pending = [i for i in pending if i["model_type"] not in reached]
        if job_error and not started:  # died before the first type: do not loop
            for item in pending:
                results[item["model_type"]] = {"model_type": item["model_type"],
                                               "stage": "forward", "job_died": True,
                                               "error": f"rank job failed: {job_error}"}
            pending = []
        attempt += 1
    return results, notes


# -- summary and tables ---------------------------------------------------------------------------

def verdict(record: dict[str, Any]) -> str:
    """pass / fail (a false failure) / not judged (why)."""
    if record.get("clean") is not None:
        return "pass" if record["clean"]["ok"] else "fail"
    if record.get("verify_raised") or record.get("hung_in", "").startswith("verify"):
        return "fail"
    return "not judged"


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    built = [r for r in records if r["stage"] != "none"]
    runs = [r for r in built if r["stage"] != "built"]
    judged = [r for r in runs if verdict(r) != "not judged"]
    planted = [r for r in judged if (r.get("fault") or {}).get("planted")]
    return {
        "types": len(records),
        "built": len(built),
        "runs_unwrapped": len(runs),
        "setup_errors": len(runs) - len(judged),  # load or wrap failed: not smpcheck's
        "judged": len(judged),
        "clean_pass": sum(verdict(r) == "pass" for r in judged),
        "false_failures": sum(verdict(r) == "fail" for r in judged),
        "faults_planted": len(planted),
        "faults_named": sum(r["fault"]["named"] for r in planted),
        "faults_missed": sum(not r["fault"]["named"] for r in planted),
        "faults_missed_on_clean_pass": sum(not r["fault"]["named"] for r in planted
                                           if verdict(r) == "pass"),
    }


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(records: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = ["# Architecture sweep", "",
             f"transformers {meta['transformers']}, torch {meta['torch']}, "
             f"{meta['world_size']} gloo ranks, FSDP2 per block and root. "
             + ", ".join(f"{k}: {v}" for k, v in summary.items()), "",
             "| type | built | clean verdict | failing checks | fault named |",
             "|---|---|---|---|---|"]
    for r in records:
        built = "no" if r["stage"] == "none" else (
            "yes" if r["stage"] != "built" else "yes (forward fails)")
        judged = verdict(r)
        if judged == "not judged":
            judged = f"not judged: {r.get('error', '')}"
        failing = "; ".join(
            f"{f['name']} ({f['status']}): "
            + (f["findings"][0] if f["findings"] else f["traceback_last"] or f["message"])
            for f in (r.get("clean") or {}).get("failing", []))
        if not failing and verdict(r) == "fail":
            failing = r.get("error", "")
        fault = r.get("fault") or {}
        named = ("yes" if fault.get("named") else f"no ({fault.get('failing_checks') or 'passes'})"
                 ) if fault.get("planted") else ("-" if not fault else "no shard on rank 1")
        lines.append(f"| {r['model_type']} | {built} | {_cell(judged[:300])} | "
                     f"{_cell(failing[:400])} | {_cell(named)} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> dict:
    summary = summarize(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "records": records}, indent=1, default=str))
    (out / "sweep.md").write_text(markdown(records, summary, meta))
    return summary


def tree_state() -> dict[str, Any]:
    """The commit and the uncommitted smpcheck files this sweep ran with (others edit the
    tree while sweeps run: a result is only comparable with the code that produced it)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    digest = hashlib.sha256()
    for file in sorted((root / "smpcheck").rglob("*.py")):
        digest.update(file.read_bytes())
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": git("status", "--porcelain", "smpcheck").splitlines(),
            "smpcheck_sha256": digest.hexdigest()[:16]}


def selected(args: argparse.Namespace) -> list[tuple[str, str]]:
    mappings = list(MAPPINGS) if args.mapping == "all" else args.mapping.split(",")
    wanted = set(args.types.split(",")) if args.types else None
    pairs = [(m, t) for m in mappings for t in mapped_types(m) if wanted is None or t in wanted]
    return pairs[: args.limit] if args.limit else pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mapping", default="causal_lm",
                        help=f"comma-separated, of {list(MAPPINGS)}, or all")
    parser.add_argument("--types", default="", help="only these model types (comma-separated)")
    parser.add_argument("--batch", type=int, default=8, help="types per 2-rank job")
    parser.add_argument("--limit", type=int, default=0, help="at most this many types")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--type-timeout", type=float, default=120.0,
                        help="seconds one type may take on the ranks before its job ends")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="keep the tiny checkpoints here (default: a temporary directory)")
    args = parser.parse_args()

    import transformers

    quiet()
    pairs = selected(args)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "world_size": 2, "argv": sys.argv[1:], "tree": tree_state(), "jobs": []}
    work = Path(tempfile.mkdtemp(prefix="arch-sweep-"))
    ckpts = args.checkpoints or work / "checkpoints"
    records: list[dict[str, Any]] = []
    began = time.monotonic()
    try:
        for start in range(0, len(pairs), args.batch):
            chunk = pairs[start:start + args.batch]
            batch_start = time.monotonic()
            fresh = [prepare(t, m, ckpts / m / t, args.seed) for m, t in chunk]
            items = [{"mapping": r["mapping"], "model_type": r["model_type"],
                      "path": r["checkpoint"]} for r in fresh if r["stage"] == "forward"]
            parent_seconds = time.monotonic() - batch_start
            ranked, notes = run_batch(items, work, args.type_timeout, start // args.batch) \
                if items else ({}, [])
            for r in fresh:
                r.update({k: v for k, v in ranked.get(r["model_type"], {}).items()
                          if k not in ("event", "rank")})
            records += fresh
            meta["jobs"].append({"types": [t for _, t in chunk],
                                 "parent_seconds": round(parent_seconds, 1),
                                 "seconds": round(time.monotonic() - batch_start, 1),
                                 "notes": notes})
            meta["seconds"] = round(time.monotonic() - began, 1)
            summary = write_outputs(args.out, records, meta)
            print(f"[{len(records)}/{len(pairs)} types, {meta['seconds']:.0f} s] "
                  f"batch of {len(chunk)} in {time.monotonic() - batch_start:.1f} s: "
                  + ", ".join(f"{r['model_type']}={verdict(r)}" for r in fresh), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the checkpoints too, unless kept elsewhere
    summary = write_outputs(args.out, records, meta)
    print(json.dumps(summary, indent=1))
    print(f"{meta.get('seconds', 0):.0f} s for {len(records)} types "
          f"({meta.get('seconds', 0) / max(len(records), 1):.1f} s per type); "
          f"{args.out / 'sweep.json'}, {args.out / 'sweep.md'}")


if __name__ == "__main__":
    main()
