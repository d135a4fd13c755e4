"""Statistics shared by the theorem scripts: line fits with intervals, batch means, the
steady-state test, the curvature estimate and the small-step-size regime rule.

numpy and scipy only; nothing here reads files.

The rules the scripts print and `--check` applies are defined here, once:

- Slope interval: ordinary least squares, standard error from the residuals, 95% interval
  slope +- t(0.975, n - 2) x SE (`fit_line`).
- Steady-state mean: the mean over the last fraction of a run, 95% interval by batch means
  (`BATCHES` contiguous batches, t with BATCHES - 1 dof; `batch_means`).
- Steady-state test: the steady window's later half against its earlier half; a run has not
  reached steady state when the difference of the two means exceeds t(0.995, dof) standard
  errors (batch means of each half) and `DRIFT_TOLERANCE` of the window's mean
  (`steady_state_test`).
- Curvature: L_low, a lower estimate of the Lipschitz constant L of grad J from the fastest
  decay of the centroid's stationarity (`curvature_estimate`).
- Regime: a slope is tested only where mu L_low <= `REGIME_FACTOR` x the scale that the
  expansion of the theorem is in (1 - lambda_2 for Theorem 1, 1 for Theorem 2; `in_regime`).
- Verdict: inside the regime a slope passes when its 95% interval contains the theory's and
  is no wider than +- `PRECISION` x the theory's slope (`slope_verdict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats

BATCHES = 10  # batches of the steady window for batch means (5 in each half for the drift)
DRIFT_TOLERANCE = 0.05  # a drift smaller than this fraction of the mean is not reported
DRIFT_QUANTILE = 0.995  # two-sided 1% test per run
RESOLVED = 10.0  # the curvature uses rows with stationarity above RESOLVED x its steady level
REGIME_FACTOR = 0.1  # mu L <= 0.1 x scale: the leading-order term dominates
PRECISION = 0.5  # a slope interval wider than +- PRECISION x the theory's slope tests nothing


@lru_cache(maxsize=256)
def t_quantile(probability: float, dof: int) -> float:
    """The `probability` quantile of Student's t with `dof` degrees of freedom (NaN if dof < 1)."""
    return float(stats.t.ppf(probability, dof)) if dof >= 1 else math.nan


@dataclass
class LineFit:
    """y = slope * x + intercept by least squares, with the slope's standard error."""

    slope: float
    intercept: float
    r_squared: float
    stderr: float  # of the slope, from the residuals (NaN for two points)
    points: int

    @property
    def ci95(self) -> tuple[float, float]:
        """The slope's 95% interval, slope +- t(0.975, n - 2) x SE."""
        half = t_quantile(0.975, self.points - 2) * self.stderr
        return self.slope - half, self.slope + half

    def covers(self, value: float) -> bool:
        """Whether the slope's 95% interval contains `value`."""
        low, high = self.ci95
        return low <= value <= high

    def describe(self) -> str:
        """'1.98 +- 0.03 (SE 0.01, 95% CI [1.95, 2.01], n 5, R^2 0.999)'."""
        low, high = self.ci95
        return (
            f"{self.slope:.3g} +- {(high - low) / 2:.2g} (SE {self.stderr:.2g}, "
            f"95% CI [{low:.3g}, {high:.3g}], n {self.points}, R^2 {self.r_squared:.3f})"
        )


def fit_line(x: np.ndarray, y: np.ndarray) -> LineFit:
    """Least-squares line through (x, y); needs at least two distinct x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("a fit needs finite values")
    if len(np.unique(x)) < 2:
        raise ValueError("a fit needs at least two distinct x values")
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = np.sum((y - y.mean()) ** 2)
    r_squared = 1.0 - np.sum(residual**2) / total if total > 0 else 1.0
    dof = len(x) - 2
    spread = np.sum((x - x.mean()) ** 2)
    stderr = math.sqrt(np.sum(residual**2) / dof / spread) if dof > 0 else math.nan
    return LineFit(float(slope), float(intercept), float(r_squared), stderr, len(x))


def fit_power_law(x: np.ndarray, y: np.ndarray) -> LineFit:
    """y = c x^slope: the line through (log x, log y); x and y must be positive."""
    return fit_line(np.log(x), np.log(y))


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Means over `window` consecutive values (len - window + 1 of them); NaNs are skipped."""
    values = np.asarray(values, dtype=float)
    window = max(1, min(window, len(values)))
    finite = np.isfinite(values)
    sums = np.convolve(np.where(finite, values, 0.0), np.ones(window), mode="valid")
    counts = np.convolve(finite.astype(float), np.ones(window), mode="valid")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def steady_rows(iteration: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of the rows in the last `fraction` of the run's iterations: its steady state."""
    iteration = np.asarray(iteration, dtype=float)
    first, last = iteration[0], iteration[-1]
    return iteration >= last - fraction * (last - first)


@dataclass
class BatchMean:
    """The mean of a correlated series with its batch-means 95% half-width."""

    mean: float
    half_width: float
    stderr: float


def batch_means(values: np.ndarray, batches: int = BATCHES) -> BatchMean:
    """Mean of the finite `values` and its 95% interval from `batches` contiguous batch means
    (mean +- t(0.975, b - 1) s_b / sqrt(b), s_b the batch means' standard deviation); needs
    at least two values."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        raise ValueError("batch means need at least two finite values")
    means = np.array([part.mean() for part in np.array_split(values, min(batches, len(values)))])
    stderr = float(np.std(means, ddof=1) / math.sqrt(len(means)))
    return BatchMean(float(values.mean()), t_quantile(0.975, len(means) - 1) * stderr, stderr)


@dataclass
class SteadyTest:
    """The steady window's later-half mean minus its earlier-half mean, against its noise."""

    drift: float  # later minus earlier
    stderr: float  # of the drift, from batch means of each half
    threshold: float  # t(DRIFT_QUANTILE, dof)
    mean: float  # of the whole window

    @property
    def steady(self) -> bool:
        """False when the drift is significant and larger than DRIFT_TOLERANCE of the mean."""
        significant = abs(self.drift) > self.threshold * self.stderr
        return not (significant and abs(self.drift) > DRIFT_TOLERANCE * abs(self.mean))

    def warning(self, name: str) -> str:
        """One line naming the run, its drift and the fix."""
        relative = self.drift / abs(self.mean) if self.mean else math.inf
        return (
            f"warning: {name} has not reached steady state (later half of the steady window "
            f"{relative:+.0%} against the earlier, {abs(self.drift) / self.stderr:.1f} standard "
            f"errors): run more iterations"
        )


def steady_state_test(values: np.ndarray, batches: int = BATCHES) -> SteadyTest:
    """Compare the two halves of a steady window (e.g. the last two quarters of a run): each
    half's mean with its batch-means error (batches / 2 batches each); Welch's difference."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 4:
        raise ValueError("the steady-state test needs at least four finite values")
    earlier, later = np.array_split(values, 2)
    half = max(2, batches // 2)
    first, second = batch_means(earlier, half), batch_means(later, half)
    stderr = math.hypot(first.stderr, second.stderr)
    dof = 2 * (min(half, len(earlier), len(later)) - 1)
    return SteadyTest(
        drift=second.mean - first.mean,
        stderr=stderr,
        threshold=t_quantile(DRIFT_QUANTILE, dof),
        mean=float(values.mean()),
    )


def curvature_estimate(
    iteration: np.ndarray, stationarity: np.ndarray, level: float, mu: float
) -> float | None:
    """L_low, a lower estimate of the Lipschitz constant L of grad J (Lemma 3, eq. 20).

    A gradient step shrinks the gradient by at most a factor 1 - mu L: ||grad J(w - mu g)|| >=
    (1 - mu L) ||grad J(w)|| for mu L < 1 (the mean-value theorem; gradient noise only adds
    to E||grad J||^2). So the centroid's stationarity S_i (an estimate of ||grad J(w_c,i)||^2)
    falls by e no faster than in tau >= 1 / (2 mu L) iterations, and the shortest time tau in
    which S falls by e from a record low, over the first rows where S exceeds RESOLVED x
    `level` (up to the first that does not; `level` above the noise and the steady state), gives
    L >= L_low = (1 - exp(-1 / (2 tau))) / mu. It is the curvature along the run's own path
    (its fastest-decaying directions), not a worst case. None when no resolved stretch of the
    run falls by e (a run started near stationarity, or too few rows).
    """
    iteration = np.asarray(iteration, dtype=float)
    values = np.asarray(stationarity, dtype=float)
    below = np.flatnonzero(~(values > RESOLVED * level))
    end = int(below[0]) if below.size else len(values)
    # From each record low a (a row below every earlier one), the first row j whose record is
    # below values[a] / e: values fell by e in iteration[j] - iteration[a].
    record = np.minimum.accumulate(values[:end])
    starts = np.flatnonzero(values[:end] == record)
    ends = np.searchsorted(-record, -record[starts] / math.e, side="left")
    fell = ends < end
    if not fell.any():
        return None
    shortest = float(np.min(iteration[ends[fell]] - iteration[starts[fell]]))
    return -math.expm1(-1.0 / (2.0 * shortest)) / mu


def in_regime(mu_l: float | None, scale: float) -> bool | None:
    """Whether mu L <= REGIME_FACTOR x scale (None when L was not estimated)."""
    return None if mu_l is None else mu_l <= REGIME_FACTOR * scale


def slope_verdict(fit: LineFit, theory: float, regime: list[bool | None]) -> tuple[str, bool]:
    """The printed verdict on a fitted slope and whether it passes.

    Outside the theory's regime (some fitted run has mu L > REGIME_FACTOR x scale) the slope
    is not tested and the verdict passes: a slope away from `theory` there is the next order
    of the expansion, not a failure. Otherwise it passes when the 95% interval holds `theory`
    and is no wider than +- PRECISION x `theory` (a wider one is inconclusive and fails).
    """
    low, high = fit.ci95
    interval = f"the 95% interval [{low:.3g}, {high:.3g}]"
    if any(r is False for r in regime):
        return f"outside the theory's regime (slope {theory:g} not tested)", True
    note = "" if all(regime) else " (regime not checked: L not estimated for some runs)"
    if not (high - low) / 2 <= PRECISION * abs(theory):
        return f"FAIL: {interval} is too wide to test {theory:g} (inconclusive){note}", False
    if fit.covers(theory):
        return f"PASS: {interval} contains {theory:g}{note}", True
    return f"FAIL: {interval} excludes {theory:g}{note}", False
