"""Theorem 1 of the Dif-MAML paper: network disagreement, its steady state and its bound.

Usage (from the repository root):

    python analysis/theorem1.py RUN.h5 [RUN.h5 ...] [--out FIG.png] [--steady-fraction F]
                                [--agreement-factor X] [--check] [--allow-partial]

For each run: the network disagreement (1/K) sum_k ||w_k - w_c||^2 (/centroid/disagreement)
against iteration; its steady state, the mean over the last F of the iterations; the first
iteration at which it is within X times the steady state ("agreement", "-" for a run that
started inside that band); and the bound of eq. (22),
mu^2 lambda_2^2 / (1 - lambda_2)^2 (B^2 + C^2), with lambda_2 the mixing rate of the run's
matrix and B^2 + C^2 estimated from the run's own
steady-state meta-gradient norms (/metrics/grad_norm) as their mean square E||g||^2, since
E||grad Q||^2 = ||grad J||^2 + E||noise||^2 <= B^2 + C^2 (Lemmas 2 and 4). For several step
sizes mu (a sweep), also the fitted slope of log steady disagreement against log mu (theory:
2) and of the iterations to agreement against log mu (theory: linear, eq. 23). Globs are
expanded.
`--check` exits with status 1 unless there is a slope, it lies in [1.6, 2.4] and every run
stays below its bound. Reads HDF5 only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from runfile import Run, RunFileError, figure_path, load_runs
from theory import LineFit, fit_line, fit_power_law, steady_rows, verdict

PROG = "theorem1"
SLOPE_RANGE = (1.6, 2.4)


@dataclass
class Agreement:
    """What Theorem 1 says about one run, measured and evaluated."""

    run: Run
    factor: float  # agreement = within this factor of the steady state
    steady: float  # mean disagreement over the steady state
    agreement_iteration: int | None  # first iteration from which it stays within the factor
    gradient_second_moment: float  # E||grad Q||^2, the estimate of B^2 + C^2
    bound: float  # eq. (22) without its O(mu^3) term
    theory_iterations: float  # 3 log mu / log lambda_2 (eq. 23)

    @property
    def below_bound(self) -> bool:
        # With lambda_2 = 0 (centralized, complete graph) the bound is 0: allow rounding.
        tolerance = 1e-9 * float(self.run.series["centroid/disagreement"][0])
        return self.steady <= self.bound + tolerance


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
    parser.add_argument("--check", action="store_true", help="exit 1 if a theory check fails")
    parser.add_argument("--allow-partial", action="store_true", help="also read unfinished runs")
    args = parser.parse_args(argv)
    if not 0 < args.steady_fraction <= 1:
        parser.error("--steady-fraction must lie in (0, 1]")
    if args.agreement_factor <= 1:
        parser.error("--agreement-factor must exceed 1")
    return args


def analyse(run: Run, steady_fraction: float, agreement_factor: float) -> Agreement:
    """Steady state, agreement time and the bound of eq. (22) for one run."""
    if run.lambda2 is None:
        raise RunFileError(f"{run.path}: /topology/A has no lambda2 attribute")
    disagreement = run.series["centroid/disagreement"]
    if not np.isfinite(disagreement).all():
        raise RunFileError(f"{run.path}: /centroid/disagreement holds NaN or inf (diverged?)")
    steady_mask = steady_rows(run.iteration, steady_fraction)
    steady = float(np.mean(disagreement[steady_mask]))
    # Agreement: the first row inside the band, for a run that started above it (eq. 23 counts
    # from launch models apart; runs launched together start in agreement).
    inside = np.flatnonzero(disagreement <= agreement_factor * steady)
    agreement = None
    if disagreement[0] > agreement_factor * steady and inside.size:
        agreement = int(run.iteration[inside[0]])
    norms = run.metric("grad_norm")[steady_mask]
    norms = norms[np.isfinite(norms)]
    if norms.size == 0:
        raise RunFileError(f"{run.path}: no finite /metrics/grad_norm in the steady state")
    # E||grad Q||^2 = ||grad J||^2 + E||noise||^2 <= B^2 + C^2 (Lemmas 2 and 4).
    second_moment = float(np.mean(norms**2))
    lambda2, mu = run.lambda2, run.step_size
    if lambda2 >= 1:
        bound = math.inf
    else:
        bound = mu**2 * lambda2**2 / (1 - lambda2) ** 2 * second_moment
    theory = 3 * math.log(mu) / math.log(lambda2) if 0 < lambda2 < 1 else math.nan
    return Agreement(
        run=run,
        factor=agreement_factor,
        steady=steady,
        agreement_iteration=agreement,
        gradient_second_moment=second_moment,
        bound=bound,
        theory_iterations=theory,
    )


def sweep_fits(results: list[Agreement]) -> tuple[LineFit | None, LineFit | None]:
    """(log steady vs log mu, agreement iteration vs log mu); None where fewer than two step
    sizes have a positive steady state (or an agreement time)."""
    positive = [r for r in results if r.steady > 0]
    timed = [r for r in results if r.agreement_iteration is not None]
    power = timing = None
    if len({r.run.step_size for r in positive}) >= 2:
        power = fit_power_law(
            np.array([r.run.step_size for r in positive]), np.array([r.steady for r in positive])
        )
    if len({r.run.step_size for r in timed}) >= 2:
        timing = fit_line(
            np.log([r.run.step_size for r in timed]),
            np.array([r.agreement_iteration for r in timed], dtype=float),
        )
    return power, timing


def table(results: list[Agreement], fits: tuple[LineFit | None, LineFit | None]) -> str:
    """The per-run table and, for a sweep, the fitted slopes with their verdicts."""
    width = max(len("run"), *(len(os.path.basename(r.run.path)) for r in results))
    lines = [
        f"{'run':<{width}}  {'mu':>9}  {'lambda2':>7}  {'E||g||^2':>9}  "
        f"{'steady':>10}  {'bound':>10}  {'below':>5}  {'agree at':>8}  {'3logmu/loglam2':>14}"
    ]
    for r in results:
        agree = "-" if r.agreement_iteration is None else str(r.agreement_iteration)
        lines.append(
            f"{os.path.basename(r.run.path):<{width}}  {r.run.step_size:>9.3g}  "
            f"{r.run.lambda2:>7.4f}  {r.gradient_second_moment:>9.3g}  "
            f"{r.steady:>10.3e}  {r.bound:>10.3e}  {'yes' if r.below_bound else 'NO':>5}  "
            f"{agree:>8}  {r.theory_iterations:>14.1f}"
        )
    if any(r.agreement_iteration is None for r in results):
        lines.append("agree at -: the run started within the band (e.g. from one launch model)")
    if any(r.run.optimizer != "sgd" for r in results):
        lines.append("note: the theorem assumes the SGD outer step; some runs used another")
    power, timing = fits
    if power is None:
        lines.append("no slope: fewer than two step sizes with a positive steady state")
    else:
        lines.append(
            f"steady disagreement ~ mu^{power.slope:.2f} (R^2 {power.r_squared:.3f}); "
            f"theory: 2; {verdict(power.slope, *SLOPE_RANGE)}"
        )
    if timing is not None:
        lines.append(
            f"iterations to agreement = {timing.slope:.1f} x ln(mu) + {timing.intercept:.0f} "
            f"(R^2 {timing.r_squared:.3f}); theory: linear in log mu"
        )
    below = all(r.below_bound for r in results)
    lines.append(f"steady disagreement below the bound of eq. (22) in every run: {below}")
    return "\n".join(lines)


def plot(results: list[Agreement], fits: tuple[LineFit | None, LineFit | None], out: str) -> None:
    """Disagreement against iteration; for a sweep, steady state and agreement time against mu."""
    power, timing = fits
    panels = 1 + (power is not None) + (timing is not None)
    figure = Figure(figsize=(5.2 * panels, 4.2))
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(1, panels, squeeze=False)[0])
    curves = axes.pop(0)
    for r in results:
        label = f"mu = {r.run.step_size:.3g}"
        (line,) = curves.plot(
            r.run.iteration, r.run.series["centroid/disagreement"], lw=1, label=label
        )
        curves.axhline(r.steady, color=line.get_color(), ls="--", lw=0.8)
        if r.agreement_iteration is not None:
            curves.plot(
                [r.agreement_iteration], [r.steady * r.factor], "o", color=line.get_color(), ms=4
            )
    curves.set_yscale("log")
    # Linear up to 1% of the shortest run, logarithmic beyond: both the transient and the
    # steady state stay visible.
    curves.set_xscale("symlog", linthresh=max(1, min(r.run.iteration[-1] for r in results) / 100))
    curves.set_xlim(left=0)
    curves.set_xlabel("iteration i")
    curves.set_ylabel("(1/K) sum_k ||w_k,i - w_c,i||^2")
    curves.set_title("disagreement; dashed: steady state, dot: agreement")
    curves.legend(fontsize=7)
    mus = np.array([r.run.step_size for r in results])
    grid = np.geomspace(mus.min(), mus.max(), 50)
    if power is not None:
        slope_axes = axes.pop(0)
        positive = [r for r in results if r.steady > 0]
        slope_axes.loglog(
            [r.run.step_size for r in positive],
            [r.steady for r in positive],
            "o",
            label="measured steady state",
        )
        slope_axes.loglog(mus, [r.bound for r in results], "s", mfc="none", label="bound (22)")
        slope_axes.loglog(
            grid,
            np.exp(power.intercept) * grid**power.slope,
            "-",
            lw=1,
            label=f"fit: slope {power.slope:.2f} (theory 2)",
        )
        slope_axes.set_xlabel("step size mu")
        slope_axes.set_ylabel("steady-state disagreement")
        slope_axes.legend(fontsize=7)
    if timing is not None:
        time_axes = axes.pop(0)
        timed = [r for r in results if r.agreement_iteration is not None]
        time_axes.semilogx(
            [r.run.step_size for r in timed],
            [r.agreement_iteration for r in timed],
            "o",
            label="measured",
        )
        time_axes.semilogx(
            grid, timing.slope * np.log(grid) + timing.intercept, "-", lw=1, label="linear fit"
        )
        time_axes.set_xlabel("step size mu")
        time_axes.set_ylabel("iterations to agreement")
        time_axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Entry point: analyse, print the table, write the figure."""
    args = parse_args(argv)
    try:
        runs = load_runs(
            args.runs,
            metrics=("grad_norm",),
            series=("centroid/disagreement",),
            allow_partial=args.allow_partial,
        )
        results = [analyse(run, args.steady_fraction, args.agreement_factor) for run in runs]
    except RunFileError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    results.sort(key=lambda r: r.run.step_size)
    fits = sweep_fits(results)
    print(table(results, fits))
    out = figure_path(args.out, runs, "theorem1.png")
    try:
        plot(results, fits, out)
    except OSError as error:
        print(f"{PROG}: error: cannot write {out}: {error}", file=sys.stderr)
        return 2
    print(f"figure: {out}")
    if args.check:
        power = fits[0]
        slope_ok = power is not None and SLOPE_RANGE[0] <= power.slope <= SLOPE_RANGE[1]
        if not slope_ok or not all(r.below_bound for r in results):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
