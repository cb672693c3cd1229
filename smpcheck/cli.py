"""``smpcheck run | report | env``: exit 0 when every check passed, 1 when one failed (or a rank
timed out), 2 on bad usage or input (one sentence, no traceback).

    smpcheck run                                  # built-in demo model, 2 local ranks
    smpcheck run /ckpt/llama --nproc-per-node 4 --tp 2 --strategy fsdp2
    torchrun --nnodes 2 --nproc-per-node 8 -m smpcheck run /ckpt/llama --tp 8
    srun -N 2 --ntasks-per-node 8 smpcheck run /ckpt/llama --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from smpcheck.checkpoint.source import UsageError
from smpcheck.run.plan_cli import DTYPES


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one sentence (exit 2), not usage + error."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="smpcheck", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="load, [transform], wrap and check a model on N ranks")
    run.add_argument("model", nargs="?", help="checkpoint directory or cached hub id "
                     "(default: the built-in demo model)")
    run.add_argument("--nproc-per-node", type=int, default=2,
                     help="ranks to launch when started bare (default 2)")
    run.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    run.add_argument("--strategy", default="smp",
                     help="smp (default), fsdp2, naive, streaming, tp_plan, sagemaker, "
                     "accelerate-fsdp (FSDP2) or accelerate-fsdp1")
    run.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    run.add_argument("--dtype", choices=DTYPES, default=None,
                     help="load in this dtype (default: the checkpoint's)")
    run.add_argument("--report-dir", default="reports", help="where reports go (default reports/)")
    run.add_argument("--timeout", type=float, default=600.0,
                     help="seconds before every rank prints its stack and stops (default 600)")
    run.add_argument("--rendezvous-timeout", type=float, default=60.0,
                     help="seconds to reach MASTER_ADDR:MASTER_PORT (default 60)")
    run.add_argument("--oversubscribe", action="store_true",
                     help="allow more CPU ranks than cores")
    run.add_argument("--skip", action="append", default=[], metavar="CHECK[,CHECK]",
                     help="checks not to run, each reported as skipped: e.g. forward,"
                     "tp_numerics (forward passes, costly on CPU); repeatable")
    tune = run.add_argument_group("fine-tuning setups")
    tune.add_argument("--model-class", default=None, metavar="NAME",
                      help="transformers class to build, e.g. AutoModelForSequenceClassification "
                      "(default: the checkpoint's own architecture)")
    tune.add_argument("--num-labels", type=int, default=None, metavar="N",
                      help="labels of a new classification head (a config override)")
    tune.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config attribute (VALUE as JSON where it parses); "
                      "repeatable")
    tune.add_argument("--lora", default=None, metavar="SPEC",
                      help="add a new LoRA adapter after loading: r=8,alpha=16,"
                      "targets=q_proj,v_proj[,dropout=0.05][,modules_to_save=score]")
    tune.add_argument("--peft", default=None, metavar="ADAPTER_DIR",
                      help="load a trained PEFT adapter (PeftModel.save_pretrained) to train on")
    compare = sub.add_parser("compare", help="run several strategies in turn, one report "
                             "side by side")
    compare.add_argument("model", nargs="?", help="as for run (default: the demo model)")
    compare.add_argument("--strategies", default="naive,smp,fsdp2,streaming",
                         help="comma-separated (default naive,smp,fsdp2,streaming)")
    for flag in ("--nproc-per-node", "--tp", "--device", "--dtype", "--report-dir", "--timeout",
                 "--rendezvous-timeout", "--oversubscribe", "--skip", "--model-class",
                 "--num-labels", "--config", "--lora", "--peft"):
        action = next(a for a in run._actions if flag in a.option_strings)
        compare._add_action(action)
    report = sub.add_parser("report", help="rebuild the HTML report from its JSON twin")
    report.add_argument("json", type=Path)
    report.add_argument("--out", type=Path, default=None, help="HTML path (default: beside it)")
    sub.add_parser("env", help="print what matters for a bug report")
    __import__("smpcheck.run.plan_cli").run.plan_cli.add_parser(sub)
    return parser


def _options(args: argparse.Namespace, world: int):
    """Validate everything that can be validated before any process group exists."""
    import torch
    from transformers import AutoConfig

    from reference_impl.loading import model_class_for
    from reference_impl.tp_plans import TPConfigError, check_tp_config
    from smpcheck.checkpoint.inputs import validate
    from smpcheck.checkpoint.source import resolve
    from smpcheck.strategies import STRATEGIES, RunOptions
    from smpcheck.strategies.finetune import fine_tuning_options

    if args.strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {args.strategy!r}; choose one of "
                         f"{', '.join(STRATEGIES)}")
    for flag in ("tp", "timeout", "rendezvous_timeout"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got "
                             f"{getattr(args, flag)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device here")
    _check_report_dir(Path(args.report_dir))
    source = resolve(args.model)
    validate(source.path, model_class_for)
    strategy = STRATEGIES[args.strategy]
    tp = strategy.tp_degree(args.tp, world)
    if strategy.tp_over_world and tp != world:
        raise UsageError(f"--strategy {strategy.name} shards over the whole world ({world} "
                         f"ranks); drop --tp or pass --tp {world}")
    if tp > 1:
        try:
            check_tp_config(AutoConfig.from_pretrained(source.path), tp, world)
        except TPConfigError as exc:
            raise UsageError(str(exc)) from exc
    dtype = getattr(torch, args.dtype) if args.dtype else None
    fine_tuning = fine_tuning_options(
        source.path, strategy, tp, model_class=args.model_class,
        num_labels=args.num_labels, config=args.config, lora=args.lora, peft=args.peft)
    return RunOptions(source=source, strategy=args.strategy, tp=tp, device=args.device,
                      dtype=dtype, skip=skipped_checks(args.skip), **fine_tuning)


def skipped_checks(values: list[str]) -> tuple[str, ...]:
    """``--skip`` values (repeatable, comma-separated) as check names, in the checks' order."""
    from smpcheck.checks import ALL_CHECKS

    names = {n.strip() for value in values for n in value.split(",") if n.strip()}
    unknown = sorted(names - set(ALL_CHECKS))
    if unknown:
        raise UsageError(f"--skip {','.join(unknown)}: no such check; the checks are "
                         f"{', '.join(ALL_CHECKS)}")
    if names == set(ALL_CHECKS):
        raise UsageError("--skip names every check: nothing would be verified")
    return tuple(n for n in ALL_CHECKS if n in names)


def _check_report_dir(path: Path) -> None:
    """The reports can be written there (the directory, or the nearest folder above it that
    exists, is a writable directory); nothing is created before the run starts."""
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--report-dir {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--report-dir {path} cannot be written: {existing} is not writable")


def _check_nproc(args: argparse.Namespace) -> None:
    n = args.nproc_per_node
    if n < 1:
        raise UsageError(f"--nproc-per-node must be at least 1, got {n}")
    if args.device == "cuda":
        import torch

        if n > torch.cuda.device_count():
            raise UsageError(f"--nproc-per-node {n} needs {n} GPUs; this machine has "
                             f"{torch.cuda.device_count()}")
    elif n > (os.cpu_count() or 1) and not args.oversubscribe:
        raise UsageError(f"--nproc-per-node {n} is more than this machine's {os.cpu_count()} "
                         "CPU cores (pass --oversubscribe to run them anyway)")


@record  # a rank's exception reaches the launching process, which prints it as a sentence
def rank_entry(opts, report_dir: str, stem: str, timeout: float, rdzv_timeout: float,
               deadline: float | None = None) -> int:
    """One rank: watchdog, process group, the job. Module level: forked ranks find it by name.
    ``deadline`` (wall clock) is shared by every self-launched rank, so all time out at once."""
    import torch.distributed as dist

    from smpcheck.run.job import run_job
    from smpcheck.run.launch import arm_watchdog, init_from_env
    from smpcheck.run.lifeline import die_with_parent

    if os.environ.get("SMPCHECK_SELF_LAUNCHED"):
        die_with_parent()
    arm_watchdog(deadline or time.time() + timeout, timeout)
    init_from_env(opts.device, rdzv_timeout)
    try:
        return run_job(opts, report_dir, stem)
    finally:
        dist.destroy_process_group()


def launcher_world_size() -> int | None:
    from smpcheck.run.launch import launcher_world

    return launcher_world()


def _stem(strategy: str, tp: int) -> str:
    return f"smpcheck-{strategy}-tp{tp}"


def _run(args: argparse.Namespace) -> int:
    from smpcheck.run.launch import launcher_world

    world = launcher_world()
    if world is not None:  # one rank of torchrun / srun
        opts = _options(args, world)
        return rank_entry(opts, args.report_dir, _stem(opts.strategy, opts.tp), args.timeout,
                          args.rendezvous_timeout)
    _check_nproc(args)
    opts = _options(args, args.nproc_per_node)
    from smpcheck.strategies import STRATEGIES

    reason = STRATEGIES[opts.strategy]().unavailable()
    if reason:  # said before any rank starts (each rank says it too under torchrun)
        print(f"[smpcheck] SKIP strategy {opts.strategy}: {reason}", flush=True)
        return 0
    return _launch(args, opts, _stem(opts.strategy, opts.tp))


def _launch(args: argparse.Namespace, opts, stem: str) -> int:
    """Self-launch the ranks; a failed run ends in one sentence on stderr, the launcher's own
    messages go to the log beside the report. When no rank could write a report (a rank
    killed by a signal, a timeout, the job preempted), this process writes one, from the
    launcher's record of how each rank ended and where each last said it was."""
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from smpcheck.run import faults
    from smpcheck.run.launch import held_launcher_logs, self_launch

    faults.arm_launcher(args.report_dir)
    _quiet_resource_tracker()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="smpcheck-run-") as state:
        with held_launcher_logs() as launcher_lines:
            try:
                codes = self_launch(args.nproc_per_node, rank_entry,
                                    (opts, args.report_dir, stem, args.timeout,
                                     args.rendezvous_timeout, started + args.timeout), state)
            except ChildFailedError as exc:
                ending = _ending_of_failed_ranks(args, exc.failures, state)
            except SignalException as exc:  # this process was signalled: preempted, cancelled
                ending = _ending_of_signalled_job(exc.sigval, state)
            else:
                return max(codes.values())
        return _end_failed_launch(args, opts, stem, ending, started, launcher_lines, state)


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker with its stderr on /dev/null: a rank killed
    by a signal cannot release its semaphores, and the tracker (which releases them) would
    warn of the leak after the run's closing sentence."""
    from multiprocessing import resource_tracker

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            resource_tracker.ensure_running()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _end_failed_launch(args: argparse.Namespace, opts, stem: str, ending, started: float,
                       launcher_lines: list[str], state: str) -> int:
    """The closing sentence and, if no rank wrote one, the report of a failed launch."""
    from smpcheck.run import endings

    if ending.code == endings.EXIT_NO_REPORT:
        return ending.code  # rank 0 finished, said its verdict and why it wrote no report
    log = Path(args.report_dir) / f"{stem}.log"
    json_path = Path(args.report_dir) / f"{stem}.json"
    if json_path.exists() and json_path.stat().st_mtime >= started:
        _append_launcher_log(log, launcher_lines, state)
        return ending.code  # rank 0 wrote the report and said what failed
    written = _write_launcher_report(opts, args.nproc_per_node, stem, ending, log,
                                     launcher_lines, state)
    print(f"smpcheck: {ending.sentence}; {written}", file=sys.stderr, flush=True)
    return ending.code


def _ending_of_failed_ranks(args: argparse.Namespace, failures: dict, state: str):
    from smpcheck.run import endings
    from smpcheck.run.launch import silent_ranks
    from smpcheck.run.whereabouts import last_known

    log = Path(args.report_dir) / f"{_stem(args.strategy, args.tp)}.log"
    return endings.of_failed_ranks(failures, last_known(state), silent_ranks(state),
                                   args.timeout, str(log))


def _ending_of_signalled_job(signum: int, state: str):
    from smpcheck.run import endings
    from smpcheck.run.whereabouts import last_known

    return endings.of_signalled_job(signum, last_known(state))


def _append_launcher_log(log: Path, lines: list[str], state: str) -> None:
    """The stacks of the ranks SIGTERM stopped, then the launcher's own messages, at the end
    of the log beside the report (if it can be written at all)."""
    from smpcheck.run.launch import sigterm_stacks

    stacks = "".join(f"\n--- rank {rank}'s stack when SIGTERM stopped it\n{text}\n"
                     for rank, text in sigterm_stacks(state).items())
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            out.write(stacks + "\n--- the launcher (torch elastic)\n" + "\n".join(lines)
                      + "\n")
    except OSError:
        pass


def _write_launcher_report(opts, world: int, stem: str, ending, log: Path,
                           lines: list[str], state: str) -> str:
    """The report of a run no rank could report on, written here; the end of the closing
    sentence: where it is, or why it could not be written."""
    from smpcheck.report.model import Report
    from smpcheck.report.writers import write_reports
    from smpcheck.run.failures import failure_results
    from smpcheck.run.job import run_facts

    _append_launcher_log(log, lines, state)
    report = Report(failure_results(ending.failures), run_facts(opts, world),
                    {}, str(log))
    try:
        paths = write_reports(report, log.parent, stem)
    except OSError as exc:
        return f"the report could not be written to {log.parent}: {exc}"
    return f"report {paths['html']}, the launcher's messages in {log}"


def _compare(args: argparse.Namespace) -> int:
    from smpcheck.report.compare import compare, text_table, write_comparison
    from smpcheck.report.model import Report
    from smpcheck.strategies import STRATEGIES

    if launcher_world_size() is not None:
        raise UsageError("smpcheck compare launches its own ranks: start it bare, not under "
                         "torchrun or srun")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise UsageError(f"unknown strategies {', '.join(unknown)}; choose from "
                         f"{', '.join(STRATEGIES)}")
    reports, worst = {}, 0
    for strategy in strategies:
        print(f"[smpcheck] === strategy {strategy} ===", flush=True)
        tp = STRATEGIES[strategy].tp_degree(args.tp, args.nproc_per_node)
        path = Path(args.report_dir) / f"{_stem(strategy, tp)}.json"
        path.unlink(missing_ok=True)  # never compare against an earlier run's report
        worst = max(worst, _run(argparse.Namespace(**{**vars(args), "strategy": strategy})))
        if path.exists():
            reports[strategy] = Report.from_json(path)
    from smpcheck.run.plan_cli import predicted

    model = Path(args.model).name if args.model else "demo"
    plan = predicted(reports)
    out = write_comparison(reports, args.report_dir, f"compare-{model}", plan)
    print(text_table(compare(reports, plan)))
    print(f"[smpcheck] comparison: {out}")
    return worst


def _report(args: argparse.Namespace) -> int:
    from smpcheck.report.model import Report

    try:
        report = Report.from_json(args.json)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{args.json} is not a smpcheck JSON report: {exc}") from exc
    out = report.write_html(args.out or args.json.with_suffix(".html"))
    print(out)
    return 0 if report.ok else 1


def _env() -> int:
    import platform

    import torch
    import torch.distributed as dist
    import transformers

    lines = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "backends": ", ".join(b for b in ("gloo", "nccl", "mpi", "ucc")
                              if getattr(dist, f"is_{b}_available", lambda: False)()),
        "cuda": (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
                 if torch.cuda.is_available() else "none"),
        "cpu cores": os.cpu_count(),
    }
    prefixes = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "SLURM_", "TORCHELASTIC_", "NCCL_", "CUDA_VISIBLE_DEVICES")
    launcher = {k: v for k, v in sorted(os.environ.items()) if k.startswith(prefixes)}
    for key, value in {**lines, **launcher}.items():
        print(f"{key:24} {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "run":
            return _run(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "report":
            return _report(args)
        if args.command == "plan":
            return __import__("smpcheck.run.plan_cli").run.plan_cli.run(args)
        return _env()
    except UsageError as exc:
        print(f"smpcheck: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
