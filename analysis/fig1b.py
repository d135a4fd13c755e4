"""Fig. 1b of the Dif-MAML paper: validation loss against iteration, one line per run.

Usage (from the repository root):

    python analysis/fig1b.py RUN.h5 [RUN.h5 ...] [--out FIG.png] [--title TEXT] [--log]
                             [--last N] [--allow-partial]

Each line is the validation loss averaged over agents, with a shaded band from the minimum to
the maximum over agents, labelled by the run's strategy. A table of final losses is printed,
with the ratio to the centralized run's final loss when a centralized run is among the inputs.
Globs are expanded (quote them to let this script do it). Reads HDF5 only.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from runfile import Run, RunFileError, figure_path, load_runs, table_lines

PROG = "fig1b"

LABELS = {
    "atc": "Dif-MAML (ATC)",
    "cta": "Dif-MAML (CTA)",
    "centralized": "Centralized",
    "noncooperative": "Non-cooperative",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN.h5", help="run files or glob patterns")
    parser.add_argument("--out", help="PNG to write (default: fig1b.png next to the first run)")
    parser.add_argument("--title", default="", help="figure title")
    parser.add_argument("--log", action="store_true", help="log-scale y axis")
    parser.add_argument(
        "--last",
        type=int,
        default=1,
        metavar="N",
        help="final loss = mean over agents of the last N logged rows (default 1)",
    )
    parser.add_argument("--allow-partial", action="store_true", help="also read unfinished runs")
    args = parser.parse_args(argv)
    if args.last < 1:
        parser.error("--last must be at least 1")
    return args


def _flat(config: dict, prefix: str = "") -> dict[str, object]:
    """Nested config sections as {"section.key": value}."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def labels(runs: list[Run]) -> list[str]:
    """Legend label of each run: its strategy, plus, when strategies repeat, the config keys
    in which the runs differ (e.g. "name=maml" for a sweep over learner.name), or else the
    file name."""
    names = [LABELS.get(run.strategy, run.strategy) for run in runs]
    counts = Counter(names)
    configs = [_flat(run.config) for run in runs]
    ignored = ("output.", "checkpoint.", "runtime.")
    # Keys every run has (a run made by an older dmeta may lack newer ones) and that differ.
    keys = sorted(
        key
        for key in set.intersection(*(set(c) for c in configs))
        if not key.startswith(ignored) and len({repr(c[key]) for c in configs}) > 1
    )
    result = []
    for name, run, config in zip(names, runs, configs, strict=True):
        if counts[name] == 1:
            result.append(name)
            continue
        differing = ", ".join(f"{key.rsplit('.', 1)[-1]}={config.get(key)}" for key in keys)
        result.append(f"{name} [{differing or os.path.basename(run.path)}]")
    return result


def final_loss(run: Run, last: int) -> float:
    """Mean over agents and over the last `last` rows of the validation loss."""
    val = run.metric("val_loss")
    if last > len(val):
        raise RunFileError(f"{run.path}: --last {last} but the run has only {len(val)} rows")
    return float(val[-last:].mean())


def plot(runs: list[Run], names: list[str], out: str, title: str, log: bool) -> None:
    """Write the figure: mean over agents with a min..max band, one line per run."""
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for run, name in zip(runs, names, strict=True):
        val = run.metric("val_loss")
        (line,) = axes.plot(run.iteration, val.mean(axis=1), label=name)
        axes.fill_between(
            run.iteration, val.min(axis=1), val.max(axis=1), color=line.get_color(), alpha=0.2
        )
    axes.set_xlabel("iteration")
    axes.set_ylabel("validation loss (line: mean over agents,\nband: min to max over agents)")
    if log:
        axes.set_yscale("log")
    if title:
        axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.savefig(out, dpi=150)


def table(runs: list[Run], names: list[str], finals: list[float], last: int) -> str:
    """The table of final losses, with the ratio to the first centralized run if any."""
    rows_text = "last row" if last == 1 else f"last {last} rows"
    header = ["strategy", "file", f"final val loss (mean over agents, {rows_text})"]
    central = next((i for i, run in enumerate(runs) if run.strategy == "centralized"), None)
    rows = [
        [name, run.path, f"{final:.6g}"]
        for name, run, final in zip(names, runs, finals, strict=True)
    ]
    if central is not None:
        header.append("ratio to centralized")
        for row, final in zip(rows, finals, strict=True):
            row.append(f"{final / finals[central]:.4g}" if finals[central] else "-")
    lines = table_lines(header, rows)
    if central is not None:
        lines.append(f"ratio = final loss / final loss of {runs[central].path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Plot Fig. 1b and print the table; 2 on a bad input file."""
    args = parse_args(argv)
    try:
        runs = load_runs(args.runs, metrics=("val_loss",), allow_partial=args.allow_partial)
        finals = [final_loss(run, args.last) for run in runs]
    except RunFileError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    names = labels(runs)
    out = figure_path(args.out, runs, "fig1b.png")
    try:
        plot(runs, names, out, args.title, args.log)
    except OSError as error:
        print(f"{PROG}: error: cannot write {out}: {error}", file=sys.stderr)
        return 2
    print(table(runs, names, finals, args.last))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
