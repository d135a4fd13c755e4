"""Small numerical helpers shared by the theorem scripts: power-law fits, smoothing, steady state.

numpy only; nothing here reads files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LineFit:
    """y = slope * x + intercept by least squares, with its coefficient of determination."""

    slope: float
    intercept: float
    r_squared: float


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
    return LineFit(float(slope), float(intercept), float(r_squared))


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


def verdict(value: float, low: float, high: float) -> str:
    """ "inside [low, high]" or "outside [low, high]"."""
    inside = low <= value <= high
    return f"{'inside' if inside else 'outside'} [{low:g}, {high:g}]"
