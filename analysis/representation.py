"""Representation learning (seed 001): distance of the learned B to B* against iteration.

Usage (from the repository root):

    python analysis/representation.py RUN.h5 [RUN.h5 ...] [--out FIG.png] [--floor F]
                                      [--allow-partial]

For each run of the linear representation problem: the centroid's principal-angle distance
dist(B, B*) (/centroid/rep_distance) against iteration on a log scale, one line per run labelled
by its learner, local steps and mean head norm; and a table with the first and last distance and
the fitted linear (geometric) rate: the per-iteration factor r of dist ~ c r^i, fitted by least
squares on log dist over the rows where the distance is above `--floor` (default 1e-5, where
float32 rounding takes over). A run "recovers B*" when its last distance is below 1e-3 and
below a hundredth of its first. Globs are expanded. Reads HDF5 only.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from runfile import Run, RunFileError, figure_path, load_runs
from theory import fit_line

PROG = "representation"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN.h5", help="run files or glob patterns")
    parser.add_argument("--out", help="PNG to write (default: representation.png by the first)")
    parser.add_argument(
        "--floor", type=float, default=1e-5, help="rate fit only above this distance"
    )
    parser.add_argument("--allow-partial", action="store_true", help="also read unfinished runs")
    return parser.parse_args(argv)


def label(run: Run) -> str:
    """learner, local steps and mean head norm of a run."""
    learner = run.config.get("learner", {})
    linear = run.config.get("linear", {})
    text = str(learner.get("name", "?"))
    if learner.get("local_steps", 1) != 1:
        text += f" tau={learner['local_steps']}"
    return text + f" |mean w*|={linear.get('head_mean', 0):g}"


def rate(run: Run, floor: float) -> float:
    """The per-iteration factor of a geometric fit to dist above `floor` (NaN: too few rows)."""
    distance = run.series["centroid/rep_distance"]
    usable = np.isfinite(distance) & (distance > floor)
    if usable.sum() < 3:
        return math.nan
    fit = fit_line(run.iteration[usable].astype(float), np.log(distance[usable]))
    return math.exp(fit.slope)


def recovered(distance: np.ndarray) -> bool:
    """Whether the last distance is below 1e-3 and a hundredth of the first."""
    return bool(distance[-1] < 1e-3 and distance[-1] < distance[0] / 100)


def table(runs: list[Run], floor: float) -> str:
    """One row per run: first and last distance, fitted rate, verdict."""
    names = [label(run) for run in runs]
    width = max(len("run"), *(len(n) for n in names))
    lines = [
        f"{'run':<{width}}  {'dist first':>10}  {'dist last':>10}  {'rate/iter':>9}  "
        f"{'recovers B*':>11}"
    ]
    for run, name in zip(runs, names, strict=True):
        distance = run.series["centroid/rep_distance"]
        lines.append(
            f"{name:<{width}}  {distance[0]:>10.3e}  {distance[-1]:>10.3e}  "
            f"{rate(run, floor):>9.4f}  {'yes' if recovered(distance) else 'no':>11}"
        )
    return "\n".join(lines)


def plot(runs: list[Run], out: str) -> None:
    """dist(B, B*) of the centroid against iteration, log scale."""
    figure = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for run in runs:
        axes.semilogy(run.iteration, run.series["centroid/rep_distance"], lw=1.2, label=label(run))
    axes.set_xlabel("iteration i")
    axes.set_ylabel("dist(B_c, B*) = ||B_perp^T B*||_2")
    axes.set_title("representation learning on a graph of agents")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the table, write the figure."""
    args = parse_args(argv)
    try:
        runs = load_runs(
            args.runs,
            metrics=(),
            series=("centroid/rep_distance",),
            allow_partial=args.allow_partial,
        )
    except RunFileError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(table(runs, args.floor))
    out = figure_path(args.out, runs, "representation.png")
    try:
        plot(runs, out)
    except OSError as error:
        print(f"{PROG}: error: cannot write {out}: {error}", file=sys.stderr)
        return 2
    print(f"figure: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
