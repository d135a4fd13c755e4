"""PersA-FL against the synchronous server in virtual time (issue 16, item 8): the validation
metric of each run against /time/virtual, and the virtual time each run needs to reach a target.

Usage (from the repository root):

    python analysis/persafl.py RUN.h5 [RUN.h5 ...] [--target VALUE] [--out FIG.png]

The metric is /centroid/val_accuracy where the runs have it (higher is better), else
/centroid/val_loss (lower is better). The target is --target, or the worst of the synchronous
runs' (fedmeta, fedavg) final values: the time to reach what the synchronous server ends with.
The table gives each run's final metric, its final virtual time, the virtual time at its first
logged row that reaches the target, and the mean synchronous time to the target over the run's.
Reads HDF5 only: no torch, no mpi4py.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import h5py
import numpy as np
from runfile import RunFileError, expand_paths, table_lines

PROG = "persafl"
STRATEGIES = ("persafl", "fedmeta", "fedavg")


@dataclass
class ClockedRun:
    """What the analysis needs of one run file with a virtual clock."""

    path: str
    label: str
    synchronous: bool
    time: np.ndarray
    metric: np.ndarray


def read_run(path: str, metric: str) -> ClockedRun:
    """One run file; RunFileError naming the file and what is missing."""
    try:
        with h5py.File(path, "r") as file:
            config = json.loads(file.attrs["config"])
            strategy = config.get("strategy")
            if strategy not in STRATEGIES:
                raise RunFileError(f"{path}: strategy {strategy!r} has no virtual clock")
            label = f"{strategy}, seed {config.get('seed')}"
            return ClockedRun(
                path, label, strategy != "persafl", file["time/virtual"][()], file[metric][()]
            )
    except (OSError, KeyError) as error:
        raise RunFileError(f"{path}: not a federated run file with {metric} ({error})") from None


def metric_name(paths: list[str]) -> str:
    """Validation accuracy if every run has it, else the validation loss."""
    for path in paths:
        try:
            with h5py.File(path, "r") as file:
                if "centroid/val_accuracy" not in file:
                    return "centroid/val_loss"
        except OSError as error:
            raise RunFileError(f"{path}: cannot read it ({error})") from None
    return "centroid/val_accuracy"


def time_to_reach(run: ClockedRun, target: float, higher: bool) -> float:
    """Virtual time of the first logged row whose metric reaches `target` (NaN: never)."""
    reached = np.flatnonzero(run.metric >= target if higher else run.metric <= target)
    return float(run.time[reached[0]]) if len(reached) else np.nan


def default_target(runs: list[ClockedRun], higher: bool) -> float:
    """The worst final value among the synchronous runs."""
    finals = [float(run.metric[-1]) for run in runs if run.synchronous]
    if not finals:
        raise RunFileError("no fedmeta or fedavg run to take the target from; give --target")
    return min(finals) if higher else max(finals)


def table(runs: list[ClockedRun], target: float, higher: bool, metric: str) -> list[str]:
    """One line per run: final metric and time, time to the target, synchronous time over it."""
    synchronous = [time_to_reach(r, target, higher) for r in runs if r.synchronous]
    reference = float(np.mean(synchronous)) if synchronous else np.nan
    rows = []
    for run in runs:
        needed = time_to_reach(run, target, higher)
        rows.append(
            [
                run.label,
                f"{run.metric[-1]:.4f}",
                f"{run.time[-1]:.1f}",
                f"{needed:.1f}",
                f"{reference / needed:.2f}" if needed > 0 else "nan",
            ]
        )
    name = metric.split("/")[-1]
    header = ["run", f"final {name}", "final time", f"time to {target:.4f}", "sync/run"]
    return table_lines(header, rows)


def plot(runs: list[ClockedRun], target: float, metric: str, out: str) -> None:
    """The metric against virtual time, the target as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    for run in runs:
        axis.plot(run.time, run.metric, label=run.label, linestyle="--" if run.synchronous else "-")
    axis.axhline(target, color="grey", linestyle=":")
    axis.set_xlabel("virtual time")
    axis.set_ylabel(metric)
    axis.legend()
    figure.tight_layout()
    FigureCanvasAgg(figure).print_figure(out)


def main(argv: list[str] | None = None) -> int:
    """Print the table (and draw the figure with --out); 2 on a bad input file."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--target", type=float, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        paths = expand_paths(args.runs)
        metric = metric_name(paths)
        higher = metric.endswith("accuracy")
        runs = [read_run(path, metric) for path in paths]
        target = default_target(runs, higher) if args.target is None else args.target
    except RunFileError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(table(runs, target, higher, metric)))
    if args.out:
        plot(runs, target, metric, args.out)
        print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
