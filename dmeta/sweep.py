"""`dmeta sweep`: run one job file several times with some config keys varied, one file each.

A sweep file (TOML) names its base job and the values to vary:

    base = "theorems.toml"                      # relative to the sweep file
    repeat = 3                                  # optional: seeds seed, seed + 1, seed + 2
    [vary]                                      # zipped: run i takes the i-th value of each key
    "optimizer.lr" = [0.001, 0.00316, 0.01]
    iterations = [6000, 1900, 600]
    [grid]                                      # every combination (Cartesian product)
    "learner.name" = ["maml", "fomaml"]

The members are every zipped [vary] tuple times every [grid] combination times every repeat
(either table may be left out). A member's run file is named by its values,
`lr=0.001_iterations=6000_name=maml_seed=1.h5` (the last part of each key), so the files
of a sweep say what they hold. Each run is a `dmeta run` subprocess (under `mpiexec -n RANKS`
when asked), so runs are as independent as on a cluster; `parallel` of them run at once, and
each is reported as it ends, its output kept in `<run file>.log`. Every run is checked before
the first one starts (its config, graph, data and rank layout: `check_members`), so a bad value
fails the sweep at once with one line. A member whose run file is already complete is skipped
with a message (`--rerun` runs it again), so a sweep run again continues where it stopped.
SIGTERM or SIGUSR1 to the sweep is passed on to its running members, which write their
checkpoints and stop (`run_sweep`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from dmeta.checkpoint import checkpoint_path
from dmeta.config import Config, flatten, load_config, read_toml
from dmeta.errors import DmetaError
from dmeta.output import partial_path

# Signals that ask the running members to write their checkpoints and stop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class SweepRun:
    """One member of a sweep: its overrides, its checked config and its run file."""

    label: str
    overrides: list[str]
    config: Config
    out: Path
    rerun: bool = False  # run (and overwrite) even when the run file is complete

    @property
    def done(self) -> bool:
        """Whether the member is skipped: its run file is complete and no rerun is asked."""
        return self.out.exists() and not self.rerun


def _lists(path: Path, table: object, what: str, same_length: bool) -> dict[str, list]:
    """The KEY = [values] of a [vary] or [grid] table, checked."""
    values = flatten(table)
    lengths = {key: len(v) if isinstance(v, list) else -1 for key, v in values.items()}
    if values and (min(lengths.values()) < 1 or (same_length and len(set(lengths.values())) > 1)):
        rule = "a non-empty list, all of one length" if same_length else "a non-empty list"
        raise DmetaError(f"sweep file {path}: every [{what}] key needs {rule} (got {lengths})")
    return values  # type: ignore[return-value]


def _members(path: Path, table: dict) -> tuple[list[list[tuple[str, object]]], int]:
    """Every member's (key, value) pairs (zipped [vary] x product of [grid]) and the repeats."""
    vary = _lists(path, table.get("vary"), "vary", same_length=True)
    grid = _lists(path, table.get("grid"), "grid", same_length=False)
    repeat = table.get("repeat", 1)
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
        raise DmetaError(f"sweep file {path}: repeat = {repeat!r} must be a positive integer")
    if not vary and not grid and repeat == 1:
        raise DmetaError(
            f"sweep file {path}: give [vary] or [grid] with at least one KEY = [values], "
            "or repeat = N"
        )
    columns = zip(*vary.values(), strict=True)
    zipped = [list(zip(vary, column, strict=True)) for column in columns] or [[]]
    combinations = [list(zip(grid, values, strict=True)) for values in product(*grid.values())]
    return [z + g for z in zipped for g in combinations or [[]]], repeat


def _file_name(pairs: list[tuple[str, object]]) -> str:
    """`lr=0.001_name=maml.h5`: the last part of each key and its value."""
    parts = [f"{key.rsplit('.', 1)[-1]}={_toml_value(value)}" for key, value in pairs]
    name = "_".join(parts).replace("/", "-").replace(" ", "")
    return (name or "run") + ".h5"


def load_sweep(
    path: str | Path, out_dir: Path | None, extra: list[str]
) -> tuple[Path, list[SweepRun]]:
    """The base job file and the runs of the sweep file at `path`, each config checked."""
    path = Path(path)
    table = read_toml(path, "sweep file")
    unknown = table.keys() - {"base", "vary", "grid", "repeat"}
    if unknown:
        raise DmetaError(
            f"sweep file {path}: unknown keys {sorted(unknown)}; use base, repeat, [vary], [grid]"
        )
    if not isinstance(table.get("base"), str):
        raise DmetaError(f'sweep file {path}: base = "JOB.toml" (the job to vary) is missing')
    base = path.parent / table["base"]
    members, repeat = _members(path, table)
    out_dir = out_dir or Path("runs") / path.stem
    runs = []
    for pairs in members:
        overrides = [f"{key}={_toml_value(value)}" for key, value in pairs]
        # Every run is checked before any starts.
        config = load_config(base, [*extra, *overrides])
        for copy in range(repeat):
            seeded = pairs + [("seed", config.seed + copy)] if repeat > 1 else pairs
            more = [f"seed={config.seed + copy}"] if repeat > 1 else []
            label = " ".join(f"{k.rsplit('.', 1)[-1]}={_toml_value(v)}" for k, v in seeded)
            member_config = load_config(base, [*extra, *overrides, *more]) if more else config
            out = out_dir / _file_name(seeded)
            runs.append(SweepRun(label, [*extra, *overrides, *more], member_config, out))
    names = [run.out.name for run in runs]
    if len(set(names)) < len(names):
        raise DmetaError(f"sweep file {path}: two members would write the same file: {names}")
    return base, runs


def check_members(runs: list[SweepRun], ranks: int) -> None:
    """The full check of `dmeta run` (`plan_run`: graph and matrix files, data, rank layout,
    device) for every member still to run; DmetaError naming the first bad one."""
    from dmeta.runner import plan_run

    for index, run in enumerate(runs):
        if run.done:
            continue
        try:
            plan_run(run.config, ranks, 0, 0, ranks)
        except DmetaError as error:
            raise DmetaError(f"sweep member {index} ({run.label}): {error}") from None


def skip_message(number: int, total: int, run: SweepRun) -> str:
    """The line of a member whose run file is already complete."""
    return (
        f"run {number}/{total} {run.label}: complete, skipped ({run.out} exists; delete it to "
        "run it again)"
    )


def _toml_value(value: object) -> str:
    """A TOML value in `--set` form."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_toml_value(v) for v in value) + "]"
    return str(value)


def _launch_prefix(ranks: int, launcher: str) -> list[str]:
    """`LAUNCHER -n RANKS` for multi-rank runs (the launcher found on PATH or next to Python)."""
    if ranks <= 1:
        return []
    program, *options = shlex.split(launcher)  # e.g. "srun --mpi=pmi2"
    found = shutil.which(program) or shutil.which(str(Path(sys.executable).parent / program))
    if found is None:
        raise DmetaError(f"--launcher {program} was not found on PATH nor next to Python")
    return [found, *options, "-n", str(ranks)]


def run_command(base: Path, run: SweepRun, prefix: list[str], threads: int) -> list[str]:
    """The `dmeta run` command line of one member of a sweep."""
    overrides = list(run.overrides)
    if threads and run.config.runtime.threads == 0:
        overrides.append(f"runtime.threads={threads}")  # share the cores among the runs
    command = [*prefix, sys.executable, "-m", "dmeta.cli", "run", str(base), "--quiet"]
    command += [item for o in overrides for item in ("--set", o)]
    return [*command, "--out", str(run.out), *(["--overwrite"] if run.rerun else [])]


def exec_member(base: Path, run: SweepRun, ranks: int, launcher: str) -> None:
    """Become the member's `dmeta run` (one array element of a SLURM job): signals such as
    SLURM's time-limit warning then reach the run itself, and its exit status is ours."""
    command = run_command(base, run, _launch_prefix(ranks, launcher), threads=0)
    sys.stdout.flush()
    os.execv(command[0], command)


def sweep_status(runs: list[SweepRun]) -> list[tuple[SweepRun, str]]:
    """Each member's state: complete, resumable (a checkpoint exists), partial or missing."""
    states = []
    for run in runs:
        if run.out.exists():
            state = "complete"
        elif checkpoint_path(run.out).exists():
            state = "resumable"
        elif partial_path(run.out).exists():
            state = "partial"
        else:
            state = "missing"
        states.append((run, state))
    return states


class _Members:
    """Members' `dmeta run` subprocesses, each writing its output into `<run file>.log` as it
    runs, and the signal handler that passes SIGTERM or SIGUSR1 on to the running ones."""

    def __init__(self, base: Path, prefix: list[str], threads: int) -> None:
        self.base, self.prefix, self.threads = base, prefix, threads
        self.running: dict[int, subprocess.Popen] = {}
        self.stopping = threading.Event()

    def forward(self, signum: int, frame: object) -> None:
        """Signal handler: stop every running member; start no more."""
        self.stopping.set()
        for process in list(self.running.values()):
            process.send_signal(signum)

    def run(self, run: SweepRun) -> tuple[SweepRun, int | None, float, str]:
        """Run one member: (run, exit status or None if not started, seconds, last line)."""
        if self.stopping.is_set():
            return run, None, 0.0, "not started"
        began = time.perf_counter()
        log = run.out.with_name(run.out.name + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as stream:
            command = run_command(self.base, run, self.prefix, self.threads)
            process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)
            self.running[id(run)] = process
            if self.stopping.is_set():  # the signal came between the check above and the start
                process.send_signal(signal.SIGTERM)
            code = process.wait()
            del self.running[id(run)]
        lines = log.read_text().strip().splitlines()
        return run, code, time.perf_counter() - began, lines[-1] if lines else f"exit {code}"


def run_sweep(base: Path, runs: list[SweepRun], ranks: int, parallel: int, launcher: str) -> int:
    """Run every member, `parallel` at a time, reporting each as it ends (its output goes to
    `<run file>.log` as it runs) and a summary line; returns the number that failed.

    SIGTERM or SIGUSR1 to the sweep (a batch system's time limit, `kill`) is passed on to the
    running members, which write their checkpoints and stop; no further member starts, and a
    DmetaError says so once they have: the same sweep run again continues them."""
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // (parallel * ranks))
    members = _Members(base, _launch_prefix(ranks, launcher), threads)
    started = time.perf_counter()
    handlers = {signum: signal.signal(signum, members.forward) for signum in STOP_SIGNALS}
    failed = stopped = 0
    todo = [run for run in runs if not run.done]
    for number, run in enumerate(runs, start=1):
        if run.done:
            print(skip_message(number, len(runs), run))
    numbers = {id(run): number for number, run in enumerate(runs, start=1)}
    try:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            for future in as_completed([pool.submit(members.run, run) for run in todo]):
                run, code, seconds, last = future.result()
                head = f"run {numbers[id(run)]}/{len(runs)} {run.label}:"
                if code == 0:
                    print(f"{head} {seconds:.1f} s -> {run.out}")
                elif members.stopping.is_set():
                    stopped += 1
                    print(f"{head} stopped ({last})", file=sys.stderr)
                else:
                    failed += 1
                    print(f"{head} FAILED ({last})", file=sys.stderr)
                sys.stdout.flush()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if members.stopping.is_set():
        raise DmetaError(
            f"stopped by a signal: {stopped} of {len(todo)} runs stopped or not started "
            "(those that ran wrote a checkpoint); run the same sweep again to continue them"
        )
    print(
        f"sweep: {len(todo) - failed} runs done, {failed} failed, {len(runs) - len(todo)} "
        f"skipped (complete) in {time.perf_counter() - started:.0f} s"
    )
    return failed
