"""`dmeta sweep`: run one job file several times with some config keys varied, one file each.

A sweep file (TOML) names its base job and the values to vary; the lists are zipped, so run i
takes the i-th value of every key:

    base = "theorems.toml"                      # relative to the sweep file
    [vary]
    "optimizer.lr" = [0.001, 0.00316, 0.01]
    iterations = [6000, 1900, 600]

Each run is a `dmeta run` subprocess (under `mpiexec -n RANKS` when asked), so runs are as
independent as on a cluster; `parallel` of them run at once. Every run is checked before the
first one starts (its config, graph, data and rank layout: `check_members`), so a bad value
fails the sweep at once with one line. A member whose run file is already complete is skipped
with a message, so a sweep run again continues where it stopped.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from dmeta.checkpoint import checkpoint_path
from dmeta.config import Config, load_config, read_toml
from dmeta.errors import DmetaError
from dmeta.output import partial_path


@dataclass
class SweepRun:
    """One member of a sweep: its overrides, its checked config and its run file."""

    label: str
    overrides: list[str]
    config: Config
    out: Path


def load_sweep(
    path: str | Path, out_dir: Path | None, extra: list[str]
) -> tuple[Path, list[SweepRun]]:
    """The base job file and the runs of the sweep file at `path`, each config checked."""
    path = Path(path)
    table = read_toml(path, "sweep file")
    unknown = table.keys() - {"base", "vary"}
    if unknown:
        raise DmetaError(f"sweep file {path}: unknown keys {sorted(unknown)}; use base and [vary]")
    if not isinstance(table.get("base"), str):
        raise DmetaError(f'sweep file {path}: base = "JOB.toml" (the job to vary) is missing')
    base = path.parent / table["base"]
    vary = _flatten(table.get("vary"))
    if not vary:
        raise DmetaError(f"sweep file {path}: [vary] must give at least one KEY = [values]")
    lengths = {key: len(values) if isinstance(values, list) else -1 for key, values in vary.items()}
    if min(lengths.values()) < 1 or len(set(lengths.values())) > 1:
        raise DmetaError(
            f"sweep file {path}: every [vary] key needs a non-empty list, all of one length "
            f"(got {lengths})"
        )
    out_dir = out_dir or Path("runs") / path.stem
    first_key = next(iter(vary))
    runs = []
    for index in range(next(iter(lengths.values()))):
        overrides = [f"{key}={_toml_value(values[index])}" for key, values in vary.items()]
        # Every run is checked before any starts.
        config = load_config(base, [*extra, *overrides])
        label = f"{first_key.rsplit('.', 1)[-1]}={vary[first_key][index]}"
        name = f"{index:02d}_{label.replace('=', '')}.h5"
        runs.append(SweepRun(label, [*extra, *overrides], config, out_dir / name))
    return base, runs


def check_members(runs: list[SweepRun], ranks: int) -> None:
    """The full check of `dmeta run` (`plan_run`: graph and matrix files, data, rank layout,
    device) for every member still to run; DmetaError naming the first bad one."""
    from dmeta.runner import plan_run

    for index, run in enumerate(runs):
        if run.out.exists():
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


def _flatten(table: object, prefix: str = "") -> dict[str, object]:
    """Dotted keys of a TOML table: `optimizer.lr = [...]` unquoted is a nested table."""
    if not isinstance(table, dict):
        return {}
    flat: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


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
    return [*command, "--out", str(run.out)]


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


def run_sweep(base: Path, runs: list[SweepRun], ranks: int, parallel: int, launcher: str) -> int:
    """Run every member, `parallel` at a time, reporting each as it ends (its output goes to
    `<run file>.log`) and a summary line; returns the number that failed."""
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // (parallel * ranks))
    prefix = _launch_prefix(ranks, launcher)
    started = time.perf_counter()

    def one(run: SweepRun) -> tuple[SweepRun, int, float, str]:
        began = time.perf_counter()
        command = run_command(base, run, prefix, threads)
        result = subprocess.run(command, capture_output=True, text=True)
        log = run.out.with_name(run.out.name + ".log")
        log.write_text(result.stdout + result.stderr)
        return run, result.returncode, time.perf_counter() - began, result.stderr

    failed = 0
    todo = [run for run in runs if not run.out.exists()]
    for number, run in enumerate(runs, start=1):
        if run.out.exists():
            print(skip_message(number, len(runs), run))
    numbers = {id(run): number for number, run in enumerate(runs, start=1)}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for future in as_completed([pool.submit(one, run) for run in todo]):
            run, code, seconds, stderr = future.result()
            number = numbers[id(run)]
            if code == 0:
                print(f"run {number}/{len(runs)} {run.label}: {seconds:.1f} s -> {run.out}")
            else:
                failed += 1
                last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {code}"
                print(f"run {number}/{len(runs)} {run.label}: FAILED ({last})", file=sys.stderr)
            sys.stdout.flush()
    print(
        f"sweep: {len(todo) - failed} runs done, {failed} failed, {len(runs) - len(todo)} "
        f"skipped (complete) in {time.perf_counter() - started:.0f} s"
    )
    return failed
