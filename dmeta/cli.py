"""The `dmeta` command. The only module that touches MPI.COMM_WORLD.

Errors a user can fix (DmetaError) are agreed on across ranks before any collective starts,
then printed once, as one line, and every rank exits with status 2. Any other exception on
any rank prints its traceback and aborts the whole MPI job, so no rank is left waiting.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import dmeta
from dmeta.errors import DmetaError

EXIT_USER_ERROR = 2
# EX_TEMPFAIL: the run stopped on a signal with a checkpoint; the same command resumes it.
EXIT_CHECKPOINTED = 75
# 128 + SIGINT: a second Ctrl-C stopped the run at once.
EXIT_INTERRUPTED = 130


class _StopFlag:
    """Set by SIGTERM, SIGUSR1 (e.g. SLURM's warning before the time limit) or a first SIGINT
    (Ctrl-C); a SIGINT after the stop was requested interrupts at once."""

    requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested:
            raise _Interrupted
        self.requested = True


class _Interrupted(BaseException):
    """A second Ctrl-C: stop now, without a checkpoint (not an Exception: nothing catches it)."""


# `--set KEY=VALUE` of every subcommand: checked against the config field's type.
SET_OPTION: dict[str, Any] = {
    "dest": "overrides",
    "action": "append",
    "default": [],
    "metavar": "KEY=VALUE",
    "help": "override a config key, e.g. --set graph.rule=metropolis (repeatable; checked "
    "against the key's type)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmeta",
        description="Decentralized and federated meta-learning experiments: Dif-MAML and its "
        "baselines on MPI ranks, one HDF5 run file per experiment (see README.md).",
    )
    parser.add_argument("--version", action="version", version=f"dmeta {dmeta.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one experiment and write its HDF5 file")
    run.add_argument("config", help="TOML job file (see jobs/)")
    run.add_argument("--set", **SET_OPTION)
    run.add_argument("--out", help="HDF5 output file (default: runs/<config name>.h5)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing complete run file (without it the run refuses to start); "
        "the old file stays until the new run completes",
    )
    restart = run.add_mutually_exclusive_group()
    restart.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint next to the output file (default: when one exists)",
    )
    restart.add_argument(
        "--restart", action="store_true", help="start over, ignoring any checkpoint"
    )

    sweep = commands.add_parser(
        "sweep", help="run a job several times with config keys varied (see dmeta/sweep.py)"
    )
    sweep.add_argument("sweep", help="sweep file (TOML): base = JOB.toml and a [vary] table")
    sweep.add_argument("--set", **SET_OPTION)
    sweep.add_argument("--out-dir", help="folder of the run files (default: runs/<sweep name>)")
    sweep.add_argument("--ranks", type=int, default=1, help="MPI ranks per run (default 1)")
    sweep.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    sweep.add_argument("--launcher", default="mpiexec", help="MPI launcher when --ranks > 1")
    only = sweep.add_mutually_exclusive_group()
    only.add_argument(
        "--index",
        type=int,
        metavar="I",
        help="run only member I (0-based), in the foreground: one element of a SLURM array job",
    )
    only.add_argument(
        "--status",
        action="store_true",
        help="say which members' run files are complete; exit 1 unless all are",
    )
    only.add_argument("--count", action="store_true", help="print the number of members")
    sweep.add_argument(
        "--rerun",
        action="store_true",
        help="run members whose run file is complete again, replacing it (default: skip them)",
    )

    status = commands.add_parser(
        "status",
        help="where a run stands: its config, progress, last row, rate and time left "
        "(reads the HDF5 file only, also while the run writes it)",
    )
    status.add_argument(
        "run_file", metavar="RUN.h5", help="run file, or its .partial (taken when RUN.h5 is absent)"
    )

    graph = commands.add_parser("graph", help="describe a config's graph and combination matrix")
    graph.add_argument("config", help="TOML job file (see jobs/)")
    graph.add_argument("--set", **SET_OPTION)
    graph.add_argument("--plot", metavar="FILE.png", help="also save a picture of the graph")

    show = commands.add_parser(
        "config",
        help="print the resolved config as JSON (the sections this run reads; --all for every one)",
    )
    show.add_argument("--all", action="store_true", help="also the sections this run ignores")
    show.add_argument("config", help="TOML job file (see jobs/)")
    show.add_argument("--set", **SET_OPTION)
    return parser


def _format_warning(
    message: Any, category: type, filename: str, lineno: int, line: Any = None
) -> str:
    return f"dmeta: warning: {message}\n"


def _graph(args: argparse.Namespace) -> None:
    from dmeta import topology
    from dmeta.config import load_config

    config = load_config(args.config, args.overrides)
    if args.plot:
        _check_picture(Path(args.plot))
    cfg = config.graph
    schedule = topology.build_schedule(cfg, config.agents, cfg.seed, cfg.rule)
    matrix = schedule.matrix_at(1)
    topology.validate_combination_matrix(
        matrix, require_connected=schedule.static and config.strategy != "noncooperative"
    )
    if not schedule.static:
        print(f"schedule: {schedule.name} (seed {cfg.seed}); round 1:")
    for line in topology.describe(matrix).lines():
        print(line)
    if not schedule.static:
        rate, method = schedule.expected_mixing_rate()
        print(f"expected mixing rate per round: {rate:.6g} ({method})")
    if args.plot and not schedule.static:
        print(f"graph picture skipped: schedule {schedule.name} changes the graph every round")
    elif args.plot:
        try:
            topology.draw_graph(topology.build_graph(cfg, config.agents), matrix, args.plot)
        except OSError as error:
            raise DmetaError(f"--plot: cannot write {args.plot} ({error.strerror})") from None
        print(f"graph picture: {args.plot}")


def _check_picture(path: Path) -> None:
    """--plot names a file in an existing, writable folder."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise DmetaError(f"--plot {path} is a folder; give a file name ending in .png")
    if not folder.is_dir():
        raise DmetaError(f"--plot {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise DmetaError(f"--plot {path}: the folder {folder} is not writable")


def _status(args: argparse.Namespace) -> None:
    """Print where the run of a run file stands (h5py only: no torch, no MPI)."""
    from dmeta.runfile import read_status, status_lines

    print(*status_lines(read_status(args.run_file)), sep="\n")


def _show_config(args: argparse.Namespace) -> None:
    """The resolved config as indented JSON; with --all also the sections this run ignores."""
    import json

    from dmeta.algorithms import REGISTRY, algorithm_class
    from dmeta.config import (
        CUSTOM_PROBLEM_SECTIONS,
        PROBLEM_SECTIONS,
        load_config,
        problem_sections,
    )

    config = load_config(args.config, args.overrides)
    resolved = json.loads(config.to_json())
    if not args.all:
        specific = {s for sections in PROBLEM_SECTIONS.values() for s in sections}
        specific |= set(CUSTOM_PROBLEM_SECTIONS)
        specific |= {s for algorithm in REGISTRY.values() for s in algorithm.config_sections}
        used = set(problem_sections(config.problem))
        used |= set(algorithm_class(config.strategy).config_sections)
        resolved = {key: value for key, value in resolved.items() if key not in specific - used}
    print(json.dumps(resolved, indent=2, sort_keys=True))


def _run(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    from dmeta.errors import AgreedError, agree

    world = MPI.COMM_WORLD
    if world.Get_rank() != 0:
        warnings.simplefilter("ignore")
    out_path = Path(args.out) if args.out else Path("runs") / (Path(args.config).stem + ".h5")
    # From here a first Ctrl-C asks for a checkpoint, like SIGTERM; it is agreed on later.
    stop = _StopFlag()
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, stop)
    plan, resume, error = _plan(args, world, out_path)
    try:
        # Every rank learns of any rank's error here, before the first collective of the run.
        agree(world.allgather(error))
    except AgreedError as caught:
        if world.Get_rank() == 0:
            print(f"dmeta: error: {caught}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return _launch(args, world, plan, resume, out_path, stop)


def _plan(args: argparse.Namespace, world: Any, out_path: Path) -> tuple[Any, bool, str | None]:
    """(plan, resume?, this rank's error or None): every check of `dmeta run`, with no
    collective once a check may fail, so that the ranks can agree on the errors afterwards."""
    from mpi4py import MPI

    from dmeta.checkpoint import decide_resume
    from dmeta.config import load_config
    from dmeta.runner import plan_run

    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    # The CPUs this node's ranks may run on: their own few each when srun binds tasks to CPUs.
    node_cpus = len(set().union(*node.allgather(os.sched_getaffinity(0))))
    node.Free()
    mode = "resume" if args.resume else "restart" if args.restart else "auto"
    try:
        config = load_config(args.config, args.overrides)
        plan = plan_run(
            config, world.Get_size(), world.Get_rank(), local_rank, local_size, node_cpus
        )
        _check_out(out_path, args.overwrite)
        resume = decide_resume(out_path, config, mode)
        if world.Get_rank() == 0:
            _check_writable(out_path)
        return plan, resume, None
    except DmetaError as caught:
        return None, False, str(caught)
    except Exception as caught:  # a bug, or a warning turned error, on some ranks only
        traceback.print_exc()
        return None, False, f"{type(caught).__name__}: {caught}"


def _launch(
    args: argparse.Namespace, world: Any, plan: Any, resume: bool, out_path: Path, stop: Any
) -> int:
    """Run the checked plan; one error line per failure, the exit status of the outcome."""
    from dmeta.checkpoint import checkpoint_path
    from dmeta.engine import execute
    from dmeta.errors import AgreedError
    from dmeta.output import hdf5_unusable

    rank, size = world.Get_rank(), world.Get_size()
    comm = None if plan.backend == "local" else world
    checkpoint = checkpoint_path(out_path)
    try:
        stopped_at = execute(
            plan,
            comm,
            out_path,
            show_progress=not args.quiet,
            resume=resume,
            stop_requested=lambda: stop.requested,
        )
    except AgreedError as caught:
        # Every rank raised it alike (e.g. a divergence seen in all-reduced values): rank 0
        # says it once, and every rank exits without aborting the others.
        if rank == 0:
            print(f"dmeta: error: {caught}{_kept(caught, checkpoint)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except DmetaError as caught:
        # This rank only (e.g. rank 0's disk is full): the others may wait in a collective.
        prefix = f"rank {rank}: " if size > 1 else ""
        print(f"dmeta: error: {prefix}{caught}{_kept(caught, checkpoint)}", file=sys.stderr)
        sys.stderr.flush()
        _abort(world, EXIT_USER_ERROR)
        if hdf5_unusable():  # HDF5 would crash shutting down after its failed write
            sys.stdout.flush()
            os._exit(EXIT_USER_ERROR)
        return EXIT_USER_ERROR
    except _Interrupted:
        if rank == 0:
            print(f"dmeta: error: {_interrupted(checkpoint)}", file=sys.stderr, flush=True)
        _abort(world, EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except BaseException:
        if size == 1:
            raise
        traceback.print_exc()
        sys.stderr.flush()
        _abort(world, 1)
        raise
    if stopped_at is not None:
        if rank == 0:
            print(
                f"dmeta: stopped by a signal after iteration {stopped_at}; checkpoint "
                f"{checkpoint} written; run the same command again to resume",
                file=sys.stderr,
                flush=True,
            )
        return EXIT_CHECKPOINTED
    if rank == 0 and not args.quiet:
        print(f"run file: {out_path}")
    return 0


def _kept(error: DmetaError, checkpoint: Path) -> str:
    """After a failed write: what of the run survives, and how to continue it."""
    from dmeta.errors import OutputError

    if not isinstance(error, OutputError) or "is kept" in str(error):
        return ""
    if checkpoint.exists():
        return f"; the checkpoint {checkpoint} is kept: run the same command again to resume"
    return ""


def _interrupted(checkpoint: Path) -> str:
    """The line of a second Ctrl-C."""
    if checkpoint.exists():
        return (
            f"interrupted twice: stopped at once; the checkpoint {checkpoint} of an earlier "
            "save is kept: run the same command again to resume from it"
        )
    return "interrupted twice: stopped at once, with no checkpoint to resume from"


def _check_out(path: Path, overwrite: bool) -> None:
    """A complete run file is never replaced unless --overwrite says so."""
    if path.is_dir():
        raise DmetaError(f"--out {path} is a folder; give a file name ending in .h5")
    if path.exists() and not overwrite:
        raise DmetaError(
            f"{path} already holds a complete run; pass --overwrite to replace it (the old "
            "file stays until the new run completes) or choose another --out"
        )


def _sweep(args: argparse.Namespace) -> int:
    from dmeta.sweep import (
        check_members,
        exec_member,
        load_sweep,
        run_sweep,
        skip_message,
        sweep_status,
    )

    if args.ranks < 1 or args.parallel < 1:
        raise DmetaError("--ranks and --parallel must be at least 1")
    out_dir = Path(args.out_dir) if args.out_dir else None
    base, runs = load_sweep(args.sweep, out_dir, args.overrides)
    for run in runs:
        run.rerun = args.rerun
    if args.count:
        print(len(runs))
        return 0
    if args.status:
        states = sweep_status(runs)
        for run, state in states:
            print(f"{state:>9}  {run.out}")
        return 0 if all(state == "complete" for _, state in states) else 1
    if args.index is not None:
        if not 0 <= args.index < len(runs):
            raise DmetaError(f"--index {args.index}: the sweep has members 0..{len(runs) - 1}")
        member = runs[args.index]
        if member.done:
            print(skip_message(args.index + 1, len(runs), member))
            return 0
        check_members([member], args.ranks)
        exec_member(base, member, args.ranks, args.launcher)
    check_members(runs, args.ranks)
    print(
        f"sweep: {len(runs)} runs of {base}, {args.parallel} at a time, {args.ranks} rank(s) each"
    )
    failed = run_sweep(base, runs, args.ranks, args.parallel, args.launcher)
    if failed:
        raise DmetaError(f"{failed} of {len(runs)} runs failed (their errors are above)")
    return 0


def _abort(world: Any, code: int) -> None:
    """End every rank of the job now (other ranks may be blocked in a collective)."""
    if world.Get_size() > 1:
        world.Abort(code)


def _check_writable(path: Path) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DmetaError(f"cannot create the output folder {directory}: {error}") from None
    if not os.access(directory, os.W_OK):
        raise DmetaError(f"the output folder {directory} is not writable")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dmeta` console script."""
    warnings.formatwarning = _format_warning
    args = _parser().parse_args(argv)
    handlers = {signum: signal.getsignal(signum) for signum in _HANDLED}
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "status":
            _status(args)
        elif args.command == "graph":
            _graph(args)
        elif args.command == "config":
            _show_config(args)
    except DmetaError as error:
        print(f"dmeta: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (KeyboardInterrupt, _Interrupted):
        print("dmeta: error: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for signum, handler in handlers.items():  # main() may run again in this process
            signal.signal(signum, handler)
    return 0


_HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
