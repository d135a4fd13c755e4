"""Theorem 2 of the Dif-MAML paper: the centroid reaches an O(mu)-stationary point.

Usage (from the repository root):

    python analysis/theorem2.py RUN.h5 [RUN.h5 ...] [--out FIG.png] [--steady-fraction F]
                                [--window W] [--check] [--allow-partial]

For each run: the estimate of ||grad J(w_c)||^2 at the network centroid
(/centroid/stationarity, unbiased, with its sampling noise /centroid/stationarity_noise)
against iteration, smoothed by a moving average over W logged rows (default: a tenth of the
run's rows). The statistic is its steady-state mean, the mean over the last F of the
iterations (default a half) with a batch-means 95% interval, and a steady-state test (the
later half of that window against the earlier half: a drift of more than t(0.995) standard
errors and 5% of the mean prints a warning to run more iterations). The paper's reading of
eq. (24), the minimum over time, is the secondary column best*: the minimum of the smoothed
curve, biased low by the noise it selects, and not used in any fit or verdict.

The bound of eq. (24), 2 mu L C^2, evaluated from the run: C^2 as the steady-state mean
square of the agents' meta-gradient norms E||g||^2 (/metrics/grad_norm, as Theorem 1
estimates B^2 + C^2; it includes the agents' own ||grad J_k||^2, so it is not below the noise
at the visited points), and L as L_low, a lower estimate from the fastest decay of the
centroid's stationarity (theory.curvature_estimate, theorem1.path_estimates). L is not
estimable for a run whose stationarity never falls by e while above 10x its steady level and
its noise; its bound is then "-" and not checked.
The regime: the O(mu^2) term of eq. (24) is small next to the O(mu) term while mu L is
small; a sweep with a fitted run at mu L_low > 0.1 is outside the theory's regime and its
slope is reported, not tested.

The noise floor of a run is the steady mean of /centroid/stationarity_noise: the stationarity
tasks are fixed for a run, so their sampling error is nearly the same from row to row and
does not average out over time. Runs whose steady mean does not exceed it, or whose 95%
interval reaches zero, are left out of the fit and listed. For several step sizes mu (a sweep):
the least-squares slope of log steady stationarity against log mu with its standard error and
95% interval (t, n - 2 dof); theory: 1.
Globs are expanded. The last line is the verdict; with `--check` the exit status is 1 exactly
when it says FAIL: a slope whose 95% interval excludes 1 or is wider than +-0.5 inside the
regime, fewer than three step sizes above the noise floor, a run not in steady state, or a
run above its bound. Reads HDF5 only.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from runfile import Run, RunFileError, figure_path, load_runs, table_lines
from theorem1 import PathEstimates, optional, path_estimates, plot_fit, steady_statistics
from theory import (
    REGIME_FACTOR,
    BatchMean,
    LineFit,
    SteadyTest,
    fit_power_law,
    in_regime,
    moving_average,
    slope_verdict,
)

PROG = "theorem2"
THEORY_SLOPE = 1.0
SERIES = ("centroid/stationarity", "centroid/stationarity_noise")


@dataclass
class Stationarity:
    """The centroid's stationarity in one run: steady mean, test, bound, smoothed curve."""

    run: Run
    steady: BatchMean
    drift: SteadyTest
    estimates: PathEstimates
    window: int
    smoothed: np.ndarray  # [T - window + 1], the mean of rows t .. t + window - 1
    best: float  # min of `smoothed`: the paper's min over i, secondary
    best_iteration: int  # the middle iteration of the best window

    @property
    def mu_l(self) -> float | None:
        """mu L_low, or None when L_low is not estimated."""
        curvature = self.estimates.curvature
        return None if curvature is None else self.run.step_size * curvature

    @property
    def bound(self) -> float | None:
        """2 mu L_low E||g||^2: eq. (24) without its O(mu^2) term (None without L_low)."""
        return None if self.mu_l is None else 2 * self.mu_l * self.estimates.second_moment

    @property
    def below_bound(self) -> bool:
        """Steady mean <= bound (True where the bound is not evaluated)."""
        return self.bound is None or self.steady.mean <= self.bound

    @property
    def usable(self) -> bool:
        """Whether the run enters the fit: a steady mean above the noise floor and resolved
        from zero (its 95% interval above 0)."""
        floor = max(self.estimates.noise_floor, self.steady.half_width)
        return self.steady.mean > floor


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN.h5", help="run files or glob patterns")
    parser.add_argument("--out", help="PNG to write (default: theorem2.png next to the first run)")
    parser.add_argument(
        "--steady-fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="steady state = the last F of each run's iterations (default 0.5)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=0,
        metavar="W",
        help="moving average for the plot and best* in logged rows (default: a tenth of the rows)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 exactly when the printed verdict is FAIL"
    )
    parser.add_argument("--allow-partial", action="store_true", help="also read unfinished runs")
    args = parser.parse_args(argv)
    if not 0 < args.steady_fraction <= 1:
        parser.error("--steady-fraction must lie in (0, 1]")
    if args.window < 0:
        parser.error("--window must not be negative")
    return args


def analyse(run: Run, steady_fraction: float, window: int) -> Stationarity:
    """Steady mean and test, estimates of L and C^2, and the smoothed minimum of one run."""
    values = run.series["centroid/stationarity"]
    if not np.isfinite(values).any():
        raise RunFileError(
            f"{run.path}: /centroid/stationarity holds no finite value "
            "(a run with validation.stationarity_tasks = 0 has none)"
        )
    mask, steady, drift = steady_statistics(run, "centroid/stationarity", steady_fraction)
    window = min(window or max(1, len(values) // 10), len(values))
    smoothed = moving_average(values, window)
    best_row = int(np.nanargmin(smoothed))
    middle = min(best_row + window // 2, len(values) - 1)
    return Stationarity(
        run=run,
        steady=steady,
        drift=drift,
        estimates=path_estimates(run, mask),
        window=window,
        smoothed=smoothed,
        best=float(smoothed[best_row]),
        best_iteration=int(run.iteration[middle]),
    )


def sweep_fit(results: list[Stationarity]) -> LineFit | None:
    """log steady stationarity against log mu over the runs above their noise floor; None with
    fewer than three distinct step sizes there."""
    usable = [r for r in results if r.usable]
    mus = np.array([r.run.step_size for r in usable])
    if len(np.unique(mus)) < 3:
        return None
    return fit_power_law(mus, np.array([r.steady.mean for r in usable]))


def name(result: Stationarity) -> str:
    """The run's file name."""
    return os.path.basename(result.run.path)


def table(results: list[Stationarity]) -> list[str]:
    """One row per run."""
    header = ["run", "mu", "L_low", "mu L_low", "C^2~E||g||^2", "steady mean", "+-95%"]
    header += ["noise floor", "bound 2muLC^2", "below", "steady?", "best*", "at iteration"]
    rows = [
        [
            name(r),
            f"{r.run.step_size:.3g}",
            optional(r.estimates.curvature, ".3g"),
            optional(r.mu_l, ".3f"),
            f"{r.estimates.second_moment:.3g}",
            f"{r.steady.mean:.3e}",
            f"{r.steady.half_width:.1e}",
            f"{r.estimates.noise_floor:.2e}",
            optional(r.bound, ".3e"),
            "-" if r.bound is None else ("yes" if r.below_bound else "NO"),
            "yes" if r.drift.steady else "NO",
            f"{r.best:.3e}",
            str(r.best_iteration),
        ]
        for r in results
    ]
    return table_lines(header, rows)


def notes(results: list[Stationarity]) -> list[str]:
    """What the table's columns do not say: best*, dashes, assumptions, warnings, left out."""
    windows = sorted({r.window for r in results})
    lines = [
        f"best*: min over time of the {'/'.join(map(str, windows))}-row moving average (the "
        "paper's min over i); biased low, secondary: not in the fit or the verdict"
    ]
    if any(r.estimates.curvature is None for r in results):
        lines.append("L_low -: not estimable (no stretch of resolved stationarity falls by e)")
    if any(r.run.optimizer != "sgd" for r in results):
        lines.append("note: the theorem assumes the SGD outer step; some runs used another")
    if any(r.run.doubly_stochastic is False for r in results):
        lines.append("note: the theorem assumes a doubly-stochastic A; some runs' is not")
    lines += [r.drift.warning(name(r)) for r in results if not r.drift.steady]
    left_out = [name(r) for r in results if not r.usable]
    if left_out:
        lines.append(
            "below the noise floor (steady mean <= noise floor or its 95% half-width), left out "
            f"of the fit: {', '.join(left_out)}"
        )
    return lines


def regime_line(results: list[Stationarity]) -> str:
    """Whether the fitted runs lie in the small-mu regime mu L <= 0.1."""
    usable = [r for r in results if r.usable]
    rule = f"mu L_low <= {REGIME_FACTOR:g}"
    outside = [name(r) for r in usable if in_regime(r.mu_l, 1.0) is False]
    if outside:
        return (
            f"outside the small-mu regime ({rule} fails) in {', '.join(outside)}: the O(mu^2) "
            "term of eq. (24) bends the slope there; smaller mu tests slope 1"
        )
    if any(r.mu_l is None for r in usable):
        return f"regime: {rule} not checked where L_low is -"
    return f"regime: {rule} in every fitted run"


def verdict(results: list[Stationarity], fit: LineFit | None) -> tuple[list[str], list[str]]:
    """The sweep's lines after the table and the reasons the verdict fails (empty: PASS)."""
    lines, failures = [regime_line(results)], []
    if fit is None:
        lines.append("no slope: fewer than three step sizes above their noise floor")
        failures.append("no slope")
    else:
        regime = [in_regime(r.mu_l, 1.0) for r in results if r.usable]
        text, passed = slope_verdict(fit, THEORY_SLOPE, regime)
        lines.append(f"steady stationarity ~ mu^{fit.describe()}; theory: 1 (eq. 24); {text}")
        if not passed:
            failures.append("slope")
    above = [name(r) for r in results if not r.below_bound]
    checked = [r for r in results if r.bound is not None]
    lines.append(
        f"steady stationarity below 2 mu L_low C^2 in every run with L_low "
        f"({len(checked)} of {len(results)}): {not above}"
    )
    if above:
        failures.append(f"above the bound: {', '.join(above)}")
    drifting = [name(r) for r in results if not r.drift.steady]
    if drifting:
        failures.append(f"not in steady state: {', '.join(drifting)}")
    return lines, failures


def report(results: list[Stationarity], fit: LineFit | None) -> tuple[str, bool]:
    """The printed report, ending in the verdict line, and whether the verdict passes."""
    lines, failures = verdict(results, fit)
    final = "theorem 2 verdict: " + (f"FAIL ({'; '.join(failures)})" if failures else "PASS")
    return "\n".join([*table(results), *notes(results), *lines, final]), not failures


def plot_curves(axes: Axes, results: list[Stationarity]) -> None:
    """Smoothed stationarity against iteration on a symlog axis (negative values show)."""
    floor = min(r.estimates.noise_floor for r in results)
    for r in results:
        middle = r.run.iteration[r.window // 2 : r.window // 2 + len(r.smoothed)]
        label = f"mu = {r.run.step_size:.3g}"
        label += "" if r.usable else " (below noise floor)"
        label += "" if r.drift.steady else " (NOT steady)"
        (line,) = axes.plot(middle, r.smoothed, lw=1, label=label)
        axes.axhline(r.steady.mean, color=line.get_color(), ls="--", lw=0.8)
        axes.plot([r.best_iteration], [r.best], "o", ms=4, mfc="none", color=line.get_color())
    axes.axhline(floor, color="grey", ls=":", lw=1, label="noise floor")
    # Linear within the noise floor, logarithmic beyond: estimates below zero stay visible.
    axes.set_yscale("symlog", linthresh=floor if floor > 0 else 1e-12)
    lowest = min(float(np.nanmin(r.smoothed)) for r in results)
    axes.set_ylim(bottom=2 * lowest if lowest < 0 else 0.0)
    axes.set_xlabel("iteration i")
    axes.set_ylabel("||grad J(w_c,i)||^2, moving average")
    axes.set_title("centroid stationarity; dashed: steady mean, circle: best*")
    axes.legend(fontsize=7)


def plot_sweep(axes: Axes, results: list[Stationarity], fit: LineFit) -> None:
    """Steady means with 95% bars, best*, the bound, the fit, the slope-1 reference, and the
    runs left out (at their noise floor, as upper limits)."""
    plot_fit(axes, results, fit, THEORY_SLOPE)
    positive = [r for r in results if r.best > 0]
    hidden = len(results) - len(positive)
    axes.plot(
        [r.run.step_size for r in positive],
        [r.best for r in positive],
        ".",
        color="grey",
        label="best* (min over time, secondary)" + (f"; {hidden} <= 0 not shown" if hidden else ""),
    )
    bounded = [r for r in results if r.bound is not None]
    axes.plot(
        [r.run.step_size for r in bounded],
        [r.bound for r in bounded],
        "k-",
        lw=1,
        label="2 mu L C^2",
    )
    left_out = [r for r in results if not r.usable]
    if left_out:
        axes.plot(
            [r.run.step_size for r in left_out],
            [r.estimates.noise_floor for r in left_out],
            "rv",
            label="left out: below noise floor",
        )
    axes.set_ylabel("steady-state ||grad J(w_c)||^2")
    axes.legend(fontsize=7)


def plot(results: list[Stationarity], fit: LineFit | None, out: str) -> None:
    """Smoothed stationarity against iteration; for a sweep, the steady mean against mu."""
    panels = 2 if fit is not None else 1
    figure = Figure(figsize=(5.4 * panels, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    plot_curves(axes[0], results)
    if fit is not None:
        plot_sweep(axes[1], results, fit)
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Entry point: analyse, print the report, write the figure; exit 1 on FAIL with --check."""
    args = parse_args(argv)
    try:
        runs = load_runs(
            args.runs, metrics=("grad_norm",), series=SERIES, allow_partial=args.allow_partial
        )
        results = [analyse(run, args.steady_fraction, args.window) for run in runs]
    except RunFileError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    results.sort(key=lambda r: r.run.step_size)
    fit = sweep_fit(results)
    text, passed = report(results, fit)
    print(text)
    out = figure_path(args.out, runs, "theorem2.png")
    try:
        plot(results, fit, out)
    except OSError as error:
        print(f"{PROG}: error: cannot write {out}: {error}", file=sys.stderr)
        return 2
    print(f"figure: {out}")
    return 1 if args.check and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
