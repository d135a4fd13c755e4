"""Theorem 1 of the Dif-MAML paper: network disagreement, its steady state and its bound.

Usage (from the repository root):

    python analysis/theorem1.py RUN.h5 [RUN.h5 ...] [--out FIG.png] [--steady-fraction F]
                                [--agreement-factor X] [--check] [--allow-partial]

For each run: the network disagreement (1/K) sum_k ||w_k - w_c||^2 (/centroid/disagreement)
against iteration; its steady state, the mean over the last F of the iterations with a
batch-means 95% interval; a steady-state test (the later half of that window against the
earlier half: a drift of more than t(0.995) standard errors and 5% of the mean prints a
warning to run more iterations); the first iteration at which the disagreement is within X
times the steady state ("agreement", "-" for a run that started inside that band); and the
bound of eq. (22), mu^2 lambda_2^2 / (1 - lambda_2)^2 (B^2 + C^2), with lambda_2 the mixing
rate of the run's matrix and B^2 + C^2 estimated from the run's own steady-state
meta-gradient norms (/metrics/grad_norm) as their mean square E||g||^2, since
E||grad Q||^2 = ||grad J||^2 + E||noise||^2 <= B^2 + C^2 (Lemmas 2 and 4).

The regime: slope 2 is the leading order of eq. (22); the agents' own gradient steps add an
O(mu^3) term that contracts the disagreement once mu L is comparable to 1 - lambda_2 (for a
quadratic the local slope is about 2 - r / (1 + r), r = mu L / (1 - lambda_2)). L is
estimated from the run as L_low, a lower estimate from the fastest decay of the centroid's
stationarity (/centroid/stationarity above 10x its steady level and its noise; see
theory.curvature_estimate); the table prints mu L_low / (1 - lambda_2), and a sweep with a
fitted run above 0.1 is outside the theory's regime: its slope is reported, not tested.

For several step sizes mu (a sweep): the least-squares slope of log steady disagreement
against log mu with its standard error and 95% interval (t, n - 2 dof); theory: 2. Runs whose
steady disagreement is not positive (lambda_2 = 0: nothing to fit on a log scale) are left out
of the fit and listed. Also the slope of the iterations to agreement against ln mu (theory:
linear, eq. 23). Globs are expanded. The last line is the verdict; with `--check` the exit
status is 1 exactly when it says FAIL: a slope whose 95% interval excludes 2 or is wider than
+-1 inside the regime, fewer than three step sizes to fit, a run not in steady state, or a
run above its bound. Reads HDF5 only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from runfile import Run, RunFileError, figure_path, load_runs, table_lines
from theory import (
    REGIME_FACTOR,
    BatchMean,
    LineFit,
    SteadyTest,
    batch_means,
    curvature_estimate,
    fit_line,
    fit_power_law,
    in_regime,
    slope_verdict,
    steady_rows,
    steady_state_test,
)

PROG = "theorem1"
THEORY_SLOPE = 2.0
SERIES = ("centroid/disagreement", "centroid/stationarity", "centroid/stationarity_noise")


@dataclass
class PathEstimates:
    """What a run's own path says about the constants of the theorems."""

    second_moment: float  # E||grad Q||^2 over the steady state: B^2 + C^2 (T1), C^2 (T2)
    noise_floor: float  # steady mean of /centroid/stationarity_noise
    curvature: float | None  # L_low, a lower estimate of L (None: not estimable)


def path_estimates(run: Run, steady: np.ndarray) -> PathEstimates:
    """E||g||^2 over the steady rows `steady`, the stationarity noise floor and L_low (read
    above 10x the steady level of the stationarity: its steady mean plus one standard
    deviation, at least the noise floor)."""
    norms = run.metric("grad_norm")[steady]
    norms = norms[np.isfinite(norms)]
    if norms.size == 0:
        raise RunFileError(f"{run.path}: no finite /metrics/grad_norm in the steady state")
    noise = run.series["centroid/stationarity_noise"][steady]
    noise = noise[np.isfinite(noise)]
    if noise.size == 0:
        raise RunFileError(
            f"{run.path}: no finite /centroid/stationarity_noise in the steady state"
        )
    floor = float(np.mean(noise))
    values = run.series["centroid/stationarity"]
    steady_values = values[steady][np.isfinite(values[steady])]
    # The decay is read where S stands well above the level it settles to, so neither the
    # estimator's noise nor the steady-state fluctuations make an e-fold.
    level = max(floor, float(np.mean(steady_values) + np.std(steady_values)))
    curvature = curvature_estimate(run.iteration, values, level, run.step_size)
    return PathEstimates(float(np.mean(norms**2)), floor, curvature)


def steady_statistics(
    run: Run, name: str, fraction: float
) -> tuple[np.ndarray, BatchMean, SteadyTest]:
    """The steady rows of /`name`, their batch-means mean and the steady-state test."""
    mask = steady_rows(run.iteration, fraction)
    values = run.series[name][mask]
    if np.isfinite(values).sum() < 4:
        raise RunFileError(
            f"{run.path}: fewer than 4 finite rows of /{name} in the steady state "
            "(log more rows or raise --steady-fraction)"
        )
    return mask, batch_means(values), steady_state_test(values)


@dataclass
class Agreement:
    """What Theorem 1 says about one run, measured and evaluated."""

    run: Run
    factor: float  # agreement = within this factor of the steady state
    steady: BatchMean  # disagreement over the steady state
    drift: SteadyTest
    agreement_iteration: int | None  # first iteration inside the band
    estimates: PathEstimates
    bound: float  # eq. (22) without its O(mu^3) term
    theory_iterations: float  # 3 log mu / log lambda_2 (eq. 23)

    @property
    def below_bound(self) -> bool:
        """Steady mean <= bound (with rounding allowed when lambda_2 = 0 makes the bound 0)."""
        tolerance = 1e-9 * float(np.max(self.run.series["centroid/disagreement"]))
        return self.steady.mean <= self.bound + tolerance

    @property
    def regime_ratio(self) -> float | None:
        """mu L_low / (1 - lambda_2), or None when L_low is not estimated."""
        if self.estimates.curvature is None or self.run.lambda2 >= 1:
            return None
        return self.run.step_size * self.estimates.curvature / (1 - self.run.lambda2)

    @property
    def usable(self) -> bool:
        """Whether the run enters the fit: a positive steady disagreement."""
        return self.steady.mean > 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN.h5", help="run files or glob patterns")
    parser.add_argument("--out", help="PNG to write (default: theorem1.png next to the first run)")
    parser.add_argument(
        "--steady-fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="steady state = the last F of each run's iterations (default 0.5)",
    )
    parser.add_argument(
        "--agreement-factor",
        type=float,
        default=2.0,
        metavar="X",
        help="agreement = first iteration with disagreement <= X x steady state (default 2)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 exactly when the printed verdict is FAIL"
    )
    parser.add_argument("--allow-partial", action="store_true", help="also read unfinished runs")
    args = parser.parse_args(argv)
    if not 0 < args.steady_fraction <= 1:
        parser.error("--steady-fraction must lie in (0, 1]")
    if args.agreement_factor <= 1:
        parser.error("--agreement-factor must exceed 1")
    return args


def analyse(run: Run, steady_fraction: float, agreement_factor: float) -> Agreement:
    """Steady state, steady-state test, agreement time and the bound of eq. (22) for one run."""
    if run.lambda2 is None:
        raise RunFileError(f"{run.path}: no lambda2 attribute on /topology or /topology/A")
    disagreement = run.series["centroid/disagreement"]
    if not np.isfinite(disagreement).all():
        raise RunFileError(f"{run.path}: /centroid/disagreement holds NaN or inf (diverged?)")
    mask, steady, drift = steady_statistics(run, "centroid/disagreement", steady_fraction)
    # Agreement: the first row inside the band, for a run that started above it (eq. 23 counts
    # from launch models apart; runs launched together start in agreement).
    band = agreement_factor * steady.mean
    inside = np.flatnonzero(disagreement <= band)
    agreement = None
    if disagreement[0] > band and inside.size:
        agreement = int(run.iteration[inside[0]])
    estimates = path_estimates(run, mask)
    lambda2, mu = run.lambda2, run.step_size
    # E||grad Q||^2 = ||grad J||^2 + E||noise||^2 <= B^2 + C^2 (Lemmas 2 and 4).
    bound = math.inf
    if lambda2 < 1:
        bound = mu**2 * lambda2**2 / (1 - lambda2) ** 2 * estimates.second_moment
    theory = 3 * math.log(mu) / math.log(lambda2) if 0 < lambda2 < 1 else math.nan
    return Agreement(run, agreement_factor, steady, drift, agreement, estimates, bound, theory)


def sweep_fits(results: list[Agreement]) -> tuple[LineFit | None, LineFit | None]:
    """(log steady vs log mu over the usable runs, agreement iteration vs ln mu); None where
    fewer than three distinct step sizes qualify (no interval with n - 2 < 1 dof)."""
    usable = [r for r in results if r.usable]
    timed = [r for r in results if r.agreement_iteration is not None]
    power = timing = None
    if len({r.run.step_size for r in usable}) >= 3:
        power = fit_power_law(
            np.array([r.run.step_size for r in usable]),
            np.array([r.steady.mean for r in usable]),
        )
    if len({r.run.step_size for r in timed}) >= 3:
        timing = fit_line(
            np.log([r.run.step_size for r in timed]),
            np.array([r.agreement_iteration for r in timed], dtype=float),
        )
    return power, timing


def name(result: Agreement) -> str:
    """The run's file name."""
    return os.path.basename(result.run.path)


def optional(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`, or "-" for None."""
    return "-" if value is None else format(value, spec)


def table(results: list[Agreement]) -> list[str]:
    """One row per run."""
    header = ["run", "mu", "lambda2", "L_low", "muL/(1-lam2)", "E||g||^2", "steady", "+-95%"]
    header += ["bound (22)", "below", "steady?", "agree at", "3logmu/loglam2"]
    rows = [
        [
            name(r),
            f"{r.run.step_size:.3g}",
            f"{r.run.lambda2:.4f}",
            optional(r.estimates.curvature, ".3g"),
            optional(r.regime_ratio, ".3f"),
            f"{r.estimates.second_moment:.3g}",
            f"{r.steady.mean:.3e}",
            f"{r.steady.half_width:.1e}",
            f"{r.bound:.3e}",
            "yes" if r.below_bound else "NO",
            "yes" if r.drift.steady else "NO",
            optional(r.agreement_iteration, "d"),
            f"{r.theory_iterations:.1f}",
        ]
        for r in results
    ]
    return table_lines(header, rows)


def notes(results: list[Agreement]) -> list[str]:
    """What the table's columns do not say: dashes, assumptions, steady-state warnings."""
    lines = []
    if any(r.estimates.curvature is None for r in results):
        lines.append("L_low -: not estimable (no stretch of resolved stationarity falls by e)")
    if any(r.agreement_iteration is None for r in results):
        lines.append("agree at -: the run started within the band (e.g. from one launch model)")
    if any(r.run.optimizer != "sgd" for r in results):
        lines.append("note: the theorem assumes the SGD outer step; some runs used another")
    if any(r.run.doubly_stochastic is False for r in results):
        lines.append("note: the theorem assumes a doubly-stochastic A; some runs' is not")
    lines += [r.drift.warning(name(r)) for r in results if not r.drift.steady]
    left_out = [name(r) for r in results if not r.usable]
    if left_out:
        lines.append(
            f"left out of the fit (steady disagreement not positive): {', '.join(left_out)}"
        )
    return lines


def regime_line(results: list[Agreement]) -> str:
    """Whether the fitted runs lie in the small-mu regime mu L <= 0.1 (1 - lambda_2)."""
    usable = [r for r in results if r.usable]
    rule = f"mu L_low <= {REGIME_FACTOR:g} (1 - lambda2)"
    outside = [
        name(r) for r in usable if r.regime_ratio is not None and r.regime_ratio > REGIME_FACTOR
    ]
    if outside:
        return (
            f"outside the small-mu regime ({rule} fails) in {', '.join(outside)}: the agents' "
            "own steps lower the slope there (O(mu^3) in eq. 22); smaller mu tests slope 2"
        )
    if any(r.regime_ratio is None for r in usable):
        return f"regime: {rule} not checked where L_low is -"
    return f"regime: {rule} in every fitted run"


def verdict(
    results: list[Agreement], fits: tuple[LineFit | None, LineFit | None]
) -> tuple[list[str], list[str]]:
    """The sweep's lines after the table and the reasons the verdict fails (empty: PASS)."""
    power, timing = fits
    lines, failures = [regime_line(results)], []
    if power is None:
        lines.append("no slope: fewer than three step sizes with a positive steady state")
        failures.append("no slope")
    else:
        regime = [in_regime(r.regime_ratio, 1.0) for r in results if r.usable]
        text, passed = slope_verdict(power, THEORY_SLOPE, regime)
        lines.append(f"steady disagreement ~ mu^{power.describe()}; theory: 2 (eq. 22); {text}")
        if not passed:
            failures.append("slope")
    if timing is not None:
        lines.append(
            f"iterations to agreement = a ln(mu) + b, a = {timing.describe()}, "
            f"b = {timing.intercept:.3g}; theory: linear in ln mu (eq. 23)"
        )
    above = [name(r) for r in results if not r.below_bound]
    lines.append(f"steady disagreement below the bound of eq. (22) in every run: {not above}")
    if above:
        failures.append(f"above the bound: {', '.join(above)}")
    drifting = [name(r) for r in results if not r.drift.steady]
    if drifting:
        failures.append(f"not in steady state: {', '.join(drifting)}")
    return lines, failures


def report(
    results: list[Agreement], fits: tuple[LineFit | None, LineFit | None]
) -> tuple[str, bool]:
    """The printed report, ending in the verdict line, and whether the verdict passes."""
    lines, failures = verdict(results, fits)
    final = "theorem 1 verdict: " + (f"FAIL ({'; '.join(failures)})" if failures else "PASS")
    return "\n".join([*table(results), *notes(results), *lines, final]), not failures


def plot_curves(axes: Axes, results: list[Agreement]) -> None:
    """Disagreement against iteration with each run's steady mean."""
    for r in results:
        label = f"mu = {r.run.step_size:.3g}"
        if not r.usable:
            label += " (zero: not on this log axis)"
        elif not r.drift.steady:
            label += " (NOT steady)"
        (line,) = axes.plot(
            r.run.iteration, r.run.series["centroid/disagreement"], lw=1, label=label
        )
        if r.usable:
            axes.axhline(r.steady.mean, color=line.get_color(), ls="--", lw=0.8)
        if r.agreement_iteration is not None:
            axes.plot(
                [r.agreement_iteration],
                [r.steady.mean * r.factor],
                "o",
                color=line.get_color(),
                ms=4,
            )
    axes.set_yscale("log")
    # Linear up to 1% of the shortest run, logarithmic beyond: transient and steady state show.
    axes.set_xscale("symlog", linthresh=max(1, min(r.run.iteration[-1] for r in results) / 100))
    axes.set_xlim(left=0)
    axes.set_xlabel("iteration i")
    axes.set_ylabel("(1/K) sum_k ||w_k,i - w_c,i||^2")
    axes.set_title("disagreement; dashed: steady state, dot: agreement")
    axes.legend(fontsize=7)


def plot_fit(axes: Axes, results: list, fit: LineFit, theory: float) -> None:
    """The usable runs' steady means with 95% bars (hollow squares: not steady), the fitted
    power law and the theory's slope through the points' geometric centre. `results` are
    Agreement or theorem2.Stationarity (both have run, steady, drift and usable)."""
    usable = [r for r in results if r.usable]
    for steady, style, label in [(True, "o", "steady mean, 95% CI"), (False, "s", "NOT steady")]:
        chosen = [r for r in usable if r.drift.steady == steady]
        if chosen:
            axes.errorbar(
                [r.run.step_size for r in chosen],
                [r.steady.mean for r in chosen],
                yerr=[r.steady.half_width for r in chosen],
                fmt=style,
                mfc=None if steady else "none",
                capsize=3,
                label=label,
            )
    mus = np.log([r.run.step_size for r in usable])
    means = np.log([r.steady.mean for r in usable])
    grid = np.geomspace(np.exp(mus.min()), np.exp(mus.max()), 50)
    axes.plot(
        grid,
        np.exp(fit.intercept) * grid**fit.slope,
        "-",
        lw=1,
        label=f"fit: slope {fit.slope:.2f}",
    )
    center = np.exp(means.mean() + theory * (np.log(grid) - mus.mean()))
    axes.plot(grid, center, ":", color="grey", label=f"theory: slope {theory:g}")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("step size mu")


def plot_sweep(axes: Axes, results: list[Agreement], power: LineFit) -> None:
    """Steady means with 95% bars, the bound, the fit, the slope-2 reference, runs left out."""
    plot_fit(axes, results, power, THEORY_SLOPE)
    finite = [r for r in results if math.isfinite(r.bound) and r.bound > 0]
    axes.plot(
        [r.run.step_size for r in finite], [r.bound for r in finite], "k-", lw=1, label="bound (22)"
    )
    left_out = [r.run.step_size for r in results if not r.usable]
    if left_out:
        axes.plot(
            left_out,
            [0.02] * len(left_out),
            "rx",
            transform=axes.get_xaxis_transform(),
            label="left out (zero)",
        )
    axes.set_ylabel("steady-state disagreement")
    axes.legend(fontsize=7)


def plot_timing(axes: Axes, results: list[Agreement], timing: LineFit) -> None:
    """Iterations to agreement against mu with the fitted line."""
    timed = [r for r in results if r.agreement_iteration is not None]
    mus = np.array([r.run.step_size for r in timed])
    grid = np.geomspace(mus.min(), mus.max(), 50)
    axes.semilogx(mus, [r.agreement_iteration for r in timed], "o", label="measured")
    axes.semilogx(
        grid, timing.slope * np.log(grid) + timing.intercept, "-", lw=1, label="linear fit"
    )
    axes.set_xlabel("step size mu")
    axes.set_ylabel("iterations to agreement")
    axes.legend(fontsize=7)


def plot(results: list[Agreement], fits: tuple[LineFit | None, LineFit | None], out: str) -> None:
    """Disagreement against iteration; for a sweep, steady state and agreement time against mu."""
    power, timing = fits
    panels = 1 + (power is not None) + (timing is not None)
    figure = Figure(figsize=(5.2 * panels, 4.2))
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(1, panels, squeeze=False)[0])
    plot_curves(axes.pop(0), results)
    if power is not None:
        plot_sweep(axes.pop(0), results, power)
    if timing is not None:
        plot_timing(axes.pop(0), results, timing)
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Entry point: analyse, print the report, write the figure; exit 1 on FAIL with --check."""
    args = parse_args(argv)
    try:
        runs = load_runs(
            args.runs, metrics=("grad_norm",), series=SERIES, allow_partial=args.allow_partial
        )
        results = [analyse(run, args.steady_fraction, args.agreement_factor) for run in runs]
    except RunFileError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    results.sort(key=lambda r: r.run.step_size)
    fits = sweep_fits(results)
    text, passed = report(results, fits)
    print(text)
    out = figure_path(args.out, runs, "theorem1.png")
    try:
        plot(results, fits, out)
    except OSError as error:
        print(f"{PROG}: error: cannot write {out}: {error}", file=sys.stderr)
        return 2
    print(f"figure: {out}")
    return 1 if args.check and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
