"""Theorem 2 of the Dif-MAML paper: the centroid reaches an O(mu)-stationary point.

Usage (from the repository root):

    python analysis/theorem2.py RUN.h5 [RUN.h5 ...] [--out FIG.png] [--window W] [--check]
                                [--allow-partial]

For each run: the estimate of ||grad J(w_c)||^2 at the network centroid
(/centroid/stationarity, unbiased, with its sampling noise /centroid/stationarity_noise)
against iteration, smoothed by a moving average over W logged rows (default: a tenth of the
run's rows), and the best stationarity, the minimum of the smoothed curve. For several step
sizes mu (a sweep), the fitted slope of log best stationarity against log mu (theory: 1,
eq. 24); the table says whether it is positive and whether it lies in [0.6, 1.4]. Runs whose
best value is not above zero (below the estimate's noise) are left out of the fit, and said so.
Globs are expanded. `--check` exits with status 1 unless the slope is positive. Reads HDF5 only.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from runfile import Run, RunFileError, figure_path, load_runs
from theory import LineFit, fit_power_law, moving_average, verdict

PROG = "theorem2"
SLOPE_RANGE = (0.6, 1.4)


@dataclass
class Stationarity:
    """The smoothed stationarity curve of one run and its minimum."""

    run: Run
    window: int
    smoothed: np.ndarray  # [T - window + 1], the mean of rows t .. t + window - 1
    best: float
    best_iteration: int  # the middle iteration of the best window
    noise: float  # mean sampling noise of one estimate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN.h5", help="run files or glob patterns")
    parser.add_argument("--out", help="PNG to write (default: theorem2.png next to the first run)")
    parser.add_argument(
        "--window",
        type=int,
        default=0,
        metavar="W",
        help="moving-average window in logged rows (default: a tenth of each run's rows)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 unless the slope is positive")
    parser.add_argument("--allow-partial", action="store_true", help="also read unfinished runs")
    args = parser.parse_args(argv)
    if args.window < 0:
        parser.error("--window must not be negative")
    return args


def analyse(run: Run, window: int) -> Stationarity:
    """Smooth the run's stationarity estimates and find their minimum."""
    values = run.series["centroid/stationarity"]
    if not np.isfinite(values).any():
        raise RunFileError(f"{run.path}: /centroid/stationarity holds no finite value")
    window = min(window or max(1, len(values) // 10), len(values))
    smoothed = moving_average(values, window)
    best_row = int(np.nanargmin(smoothed))
    middle = min(best_row + window // 2, len(values) - 1)
    return Stationarity(
        run=run,
        window=window,
        smoothed=smoothed,
        best=float(smoothed[best_row]),
        best_iteration=int(run.iteration[middle]),
        noise=float(np.nanmean(run.series["centroid/stationarity_noise"])),
    )


def sweep_fit(results: list[Stationarity]) -> LineFit | None:
    """log best stationarity against log mu over the runs with a positive best value."""
    usable = [r for r in results if r.best > 0]
    mus = np.array([r.run.step_size for r in usable])
    if len(np.unique(mus)) < 2:
        return None
    return fit_power_law(mus, np.array([r.best for r in usable]))


def table(results: list[Stationarity], fit: LineFit | None) -> str:
    """The per-run table and, for a sweep, the fitted slope with its verdict."""
    width = max(len("run"), *(len(os.path.basename(r.run.path)) for r in results))
    lines = [
        f"{'run':<{width}}  {'mu':>9}  {'window':>6}  {'best ||grad J(w_c)||^2':>22}  "
        f"{'at iteration':>12}  {'noise':>9}"
    ]
    for r in results:
        lines.append(
            f"{os.path.basename(r.run.path):<{width}}  {r.run.step_size:>9.3g}  {r.window:>6d}  "
            f"{r.best:>22.3e}  {r.best_iteration:>12d}  {r.noise:>9.2e}"
        )
    left_out = [os.path.basename(r.run.path) for r in results if r.best <= 0]
    if left_out:
        lines.append(f"below the noise of the estimate, left out of the fit: {', '.join(left_out)}")
    if any(r.run.optimizer != "sgd" for r in results):
        lines.append("note: the theorem assumes the SGD outer step; some runs used another")
    if fit is not None:
        sign = "positive" if fit.slope > 0 else "NOT positive"
        lines.append(
            f"best stationarity ~ mu^{fit.slope:.2f} (R^2 {fit.r_squared:.3f}); theory: 1; "
            f"{sign}; {verdict(fit.slope, *SLOPE_RANGE)}"
        )
    return "\n".join(lines)


def plot(results: list[Stationarity], fit: LineFit | None, out: str) -> None:
    """Smoothed stationarity against iteration; for a sweep, the best value against mu."""
    panels = 2 if fit is not None else 1
    figure = Figure(figsize=(5.4 * panels, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    curves = axes[0]
    for r in results:
        middle = r.run.iteration[r.window // 2 : r.window // 2 + len(r.smoothed)]
        positive = np.where(r.smoothed > 0, r.smoothed, np.nan)  # a log axis shows no <= 0
        (line,) = curves.plot(middle, positive, lw=1, label=f"mu = {r.run.step_size:.3g}")
        curves.plot(
            [r.best_iteration],
            [r.best] if r.best > 0 else [np.nan],
            "o",
            ms=4,
            color=line.get_color(),
        )
    noise = float(np.mean([r.noise for r in results]))
    curves.axhline(noise, color="grey", ls=":", lw=1, label="noise of one estimate")
    curves.set_yscale("log")
    curves.set_xlabel("iteration i")
    curves.set_ylabel("||grad J(w_c,i)||^2, moving average")
    curves.set_title("centroid stationarity; dot: best")
    curves.legend(fontsize=7)
    if fit is not None:
        sweep = axes[1]
        usable = [r for r in results if r.best > 0]
        mus = np.array([r.run.step_size for r in usable])
        grid = np.geomspace(mus.min(), mus.max(), 50)
        sweep.loglog(mus, [r.best for r in usable], "o", label="best (smoothed minimum)")
        sweep.loglog(
            grid,
            np.exp(fit.intercept) * grid**fit.slope,
            "-",
            lw=1,
            label=f"fit: slope {fit.slope:.2f} (theory 1)",
        )
        sweep.set_xlabel("step size mu")
        sweep.set_ylabel("best ||grad J(w_c)||^2")
        sweep.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Entry point: analyse, print the table, write the figure."""
    args = parse_args(argv)
    try:
        runs = load_runs(
            args.runs,
            metrics=(),
            series=("centroid/stationarity", "centroid/stationarity_noise"),
            allow_partial=args.allow_partial,
        )
        results = [analyse(run, args.window) for run in runs]
    except RunFileError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    results.sort(key=lambda r: r.run.step_size)
    fit = sweep_fit(results)
    print(table(results, fit))
    out = figure_path(args.out, runs, "theorem2.png")
    try:
        plot(results, fit, out)
    except OSError as error:
        print(f"{PROG}: error: cannot write {out}: {error}", file=sys.stderr)
        return 2
    print(f"figure: {out}")
    if args.check and (fit is None or fit.slope <= 0):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
