"""The Theorem 1 and 2 scripts on synthetic sweeps whose slopes and noise are known exactly."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import signal, stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))

import representation  # noqa: E402, F401
import theorem1  # noqa: E402
import theorem2  # noqa: E402
from runfile import load_runs  # noqa: E402
from theory import (  # noqa: E402
    batch_means,
    curvature_estimate,
    fit_line,
    fit_power_law,
    moving_average,
    steady_state_test,
)

K = 4
LAMBDA2 = 0.8
STEPS = [0.001, 0.002, 0.004, 0.008, 0.016]  # Theorem 1: mu / (1 - lambda2) <= 0.08
STEPS2 = [0.0003, 0.0006, 0.0012, 0.0024, 0.0048]  # Theorem 2: mu x CURVATURE2 <= 0.096
CURVATURE2 = 20.0
ITERATIONS = np.arange(0, 2001)
FLOOR = 1e-7  # /centroid/stationarity_noise of the synthetic runs


def write_sweep_run(path: Path, mu: float, **series: np.ndarray) -> Path:
    """A run file with the dmeta layout (sparse /topology), SGD at step size `mu`."""
    rows = len(ITERATIONS)
    config = {"strategy": "atc", "agents": K, "optimizer": {"name": "sgd", "lr": mu}}
    ring = np.array([(k, (k + d) % K) for k in range(K) for d in (-1, 0, 1)], dtype=np.int64)
    with h5py.File(path, "w") as file:
        file.attrs.update({"config": json.dumps(config), "strategy": "atc", "complete": True})
        file["time/iteration"] = ITERATIONS
        file["time/wall"] = np.linspace(0, 1, rows)
        for name, data in series.items():
            file[name] = data
        topology = file.create_group("topology")
        topology.attrs.update(
            {"lambda2": LAMBDA2, "lambda2_method": "dense", "doubly_stochastic": True}
        )
        topology.attrs["num_agents"] = K
        topology["edges"] = ring
        topology["weights"] = np.full(len(ring), 1 / 3)
    return path


def ar1(rng: np.random.Generator, rows: int, phi: float = 0.9) -> np.ndarray:
    """A stationary AR(1) series with coefficient `phi` and unit variance."""
    start = rng.normal() / math.sqrt(1 - phi**2)
    series = signal.lfilter([1.0], [1.0, -phi], rng.normal(size=rows), zi=[phi * start])[0]
    return series * math.sqrt(1 - phi**2)


def stationarity(mu: float, plateau: float, curvature: float, rng=None, sigma=0.0) -> dict:
    """The stationarity datasets: plateau x (1 + sigma AR(1)) + exp(-2 mu curvature i), the
    decay of ||grad J||^2 under gradient descent on a quadratic of that curvature."""
    noise = 0.0 if rng is None else sigma * ar1(rng, len(ITERATIONS))
    curve = plateau * (1 + noise) + np.exp(-2 * mu * curvature * ITERATIONS)
    return {
        "centroid/stationarity": curve,
        "centroid/stationarity_noise": np.full(len(ITERATIONS), FLOOR),
    }


def disagreement_sweep(
    folder: Path, power: float, scale: float, decay: float = 50.0, rng=None, sigma=0.3
) -> list[Path]:
    """Disagreement 0.5 lambda2^(2i) down to a steady state scale x mu^power (times
    exp(sigma AR(1) - sigma^2 / 2) when `rng` is given); the agents' gradient norms are 2
    and 4 (mean square 10); the stationarity falls by e every `decay` iterations, so
    mu L_low = 1 / (2 decay)."""
    paths = []
    spread = np.tile([2.0, 4.0, 2.0, 4.0], (len(ITERATIONS), 1))
    for index, mu in enumerate(STEPS):
        steady = scale * mu**power
        if rng is not None:  # lognormal, mean 1: a disagreement is never negative
            steady = steady * np.exp(sigma * ar1(rng, len(ITERATIONS)) - sigma**2 / 2)
        curve = np.maximum(0.5 * LAMBDA2 ** (2.0 * ITERATIONS), steady)
        paths.append(
            write_sweep_run(
                folder / f"run{index}.h5",
                mu,
                **{"centroid/disagreement": curve, "metrics/grad_norm": spread},
                **stationarity(mu, 1e-6, 1 / (2 * mu * decay)),
            )
        )
    return paths


def stationarity_sweep(
    folder: Path, power: float, plateaus: list[float] | None = None, rng=None, sigma=0.5
) -> list[Path]:
    """Stationarity decaying from 1 to a plateau 0.3 mu^power (or the given plateaus), with
    1 + sigma AR(1) noise when `rng` is given; gradient norms 2 and 4."""
    spread = np.tile([2.0, 4.0, 2.0, 4.0], (len(ITERATIONS), 1))
    paths = []
    for index, mu in enumerate(STEPS2):
        plateau = plateaus[index] if plateaus else 0.3 * mu**power
        datasets = stationarity(mu, plateau, CURVATURE2, rng, sigma)
        paths.append(
            write_sweep_run(
                folder / f"run{index}.h5", mu, **datasets, **{"metrics/grad_norm": spread}
            )
        )
    return paths


def run_script(script, folder: Path, capsys, *extra: str) -> tuple[int, str]:
    """Run a theorem script with --check on folder/run*.h5: (exit status, printed text)."""
    argv = [str(folder / "run*.h5"), "--out", str(folder / "fig.png"), "--check", *extra]
    status = script.main(argv)
    return status, capsys.readouterr().out


def test_line_fit_interval_matches_scipy() -> None:
    x = np.log([1.0, 2.0, 4.0, 8.0, 16.0])
    y = 1.7 * x + np.array([0.05, -0.03, 0.02, -0.06, 0.01])
    fit, reference = fit_line(x, y), stats.linregress(x, y)
    assert fit.slope == pytest.approx(reference.slope)
    assert fit.stderr == pytest.approx(reference.stderr)
    half = stats.t.ppf(0.975, 3) * reference.stderr
    assert fit.ci95 == pytest.approx((fit.slope - half, fit.slope + half))
    assert fit.covers(1.7) and not fit.covers(2.0)
    exact = fit_power_law(np.exp(x), 3.0 * np.exp(x) ** 1.7)
    assert exact.slope == pytest.approx(1.7) and math.exp(exact.intercept) == pytest.approx(3.0)
    assert math.isnan(fit_line(x[:2], y[:2]).stderr)
    np.testing.assert_allclose(moving_average(np.array([1.0, 2.0, np.nan, 4.0]), 2), [1.5, 2, 4])


def test_batch_means_steady_state_test_and_curvature() -> None:
    rng = np.random.default_rng(1)
    series = 5.0 + ar1(rng, 4000)
    mean = batch_means(series)
    assert abs(mean.mean - 5.0) < mean.half_width < 0.5
    assert steady_state_test(series).steady
    drifting = steady_state_test(series + np.linspace(0.0, 2.0, 4000))
    assert not drifting.steady and "run more iterations" in drifting.warning("x.h5")
    # exp(-2 mu h i): falls by e in 1 / (2 mu h) iterations, so L_low = (1 - e^(-mu h)) / mu.
    decay = np.exp(-2 * 0.01 * 5.0 * ITERATIONS)
    low = curvature_estimate(ITERATIONS, decay, 1e-30, 0.01)
    assert low == pytest.approx(-math.expm1(-0.05) / 0.01, rel=0.05) and low <= 5.0
    assert curvature_estimate(ITERATIONS, np.full(len(ITERATIONS), 1.0), 1e-3, 0.01) is None


def test_theorem1_recovers_slope_two_agreement_times_and_the_bound(tmp_path, capsys) -> None:
    paths = disagreement_sweep(tmp_path, power=2.0, scale=0.5)
    status, printed = run_script(theorem1, tmp_path, capsys)
    assert status == 0, printed
    assert "~ mu^2 +- " in printed and "PASS: the 95% interval" in printed
    assert "regime: mu L_low <= 0.1 (1 - lambda2) in every fitted run" in printed
    assert "below the bound of eq. (22) in every run: True" in printed
    assert printed.splitlines()[-2] == "theorem 1 verdict: PASS"
    assert (tmp_path / "fig.png").is_file()

    runs = load_runs([str(p) for p in paths], metrics=("grad_norm",), series=theorem1.SERIES)
    results = [theorem1.analyse(run, 0.5, 2.0) for run in runs]
    for r, mu in zip(results, STEPS, strict=True):
        assert r.steady.mean == pytest.approx(0.5 * mu**2)
        # Norms 2 and 4: mean square B^2 + C^2 = 10.
        assert r.estimates.second_moment == pytest.approx(10.0)
        assert r.bound == pytest.approx(mu**2 * LAMBDA2**2 / (1 - LAMBDA2) ** 2 * 10)
        assert r.estimates.curvature == pytest.approx(1 / (2 * mu * 50), rel=0.03)
        # 0.5 lambda2^(2i) <= 2 x 0.5 mu^2 first at i = ceil(ln(2 mu^2) / (2 ln lambda2)).
        expected = math.ceil(math.log(2 * mu**2) / (2 * math.log(LAMBDA2)))
        assert r.agreement_iteration == expected
    timing = theorem1.sweep_fits(results)[1]
    # Agreement time is linear in ln mu with slope 2 / (2 ln lambda2), up to the ceiling.
    assert timing.slope == pytest.approx(1 / math.log(LAMBDA2), rel=0.05)


def test_theorem1_flags_a_wrong_slope_and_a_broken_bound(tmp_path, capsys) -> None:
    disagreement_sweep(tmp_path, power=1.0, scale=50.0)
    status, printed = run_script(theorem1, tmp_path, capsys)
    assert status == 1
    assert "~ mu^1 +- " in printed and "FAIL: the 95% interval" in printed
    assert "excludes 2" in printed and "every run: False" in printed and " NO " in printed
    assert printed.splitlines()[-2].startswith("theorem 1 verdict: FAIL (slope; above the bound")


def test_theorem1_outside_the_regime_reports_the_slope_untested(tmp_path, capsys) -> None:
    disagreement_sweep(tmp_path, power=1.5, scale=0.05, decay=2.0)
    status, printed = run_script(theorem1, tmp_path, capsys)
    assert "outside the small-mu regime (mu L_low <= 0.1 (1 - lambda2) fails) in " in printed
    assert "run4.h5" in printed and "outside the theory's regime (slope 2 not tested)" in printed
    assert status == 0 and printed.splitlines()[-2] == "theorem 1 verdict: PASS"


def noisy_sweep(folder: Path, rng: np.random.Generator) -> None:
    """Both theorems' series at STEPS2 with AR(1) noise on every row (coefficient 0.9): steady
    disagreement 0.5 mu^2 x exp(0.3 noise - 0.045), steady stationarity 0.3 mu x (1 + 0.5 noise)."""
    spread = np.tile([2.0, 4.0, 2.0, 4.0], (len(ITERATIONS), 1))
    for index, mu in enumerate(STEPS2):
        steady = 0.5 * mu**2 * np.exp(0.3 * ar1(rng, len(ITERATIONS)) - 0.045)
        disagreement = np.maximum(0.5 * LAMBDA2 ** (2.0 * ITERATIONS), steady)
        write_sweep_run(
            folder / f"run{index}.h5",
            mu,
            **{"centroid/disagreement": disagreement, "metrics/grad_norm": spread},
            **stationarity(mu, 0.3 * mu, CURVATURE2, rng, 0.5),
        )


def test_intervals_cover_the_true_slopes(tmp_path) -> None:
    """100 seeded noisy sweeps of 5 step sizes (`noisy_sweep`): the 95% interval held the
    true slope in 98 of 100 for Theorem 1 (slope 2) and 93 of 100 for Theorem 2 (slope 1).
    Binomial(100, 0.95) lies in [90, 99] with probability 0.98, so each must be >= 88."""
    hits = {1: 0, 2: 0}
    for seed in range(100):
        noisy_sweep(tmp_path, np.random.default_rng(seed))
        runs = load_runs(
            [str(tmp_path / "run*.h5")], metrics=("grad_norm",), series=theorem1.SERIES
        )
        power = theorem1.sweep_fits([theorem1.analyse(run, 0.5, 2.0) for run in runs])[0]
        hits[1] += power.covers(2.0)
        hits[2] += theorem2.sweep_fit([theorem2.analyse(run, 0.5, 0) for run in runs]).covers(1.0)
    print(f"coverage of the 95% intervals: {hits}")
    assert hits[1] >= 88 and hits[2] >= 88


@pytest.mark.parametrize("script", [theorem1, theorem2])
def test_a_run_too_short_for_steady_state_fails_check(script, tmp_path, capsys) -> None:
    """The middle run still decays through its last half: the warning names it and the fix."""
    if script is theorem1:
        paths = disagreement_sweep(tmp_path, power=2.0, scale=0.5)
        name, slow = "centroid/disagreement", 0.5 * 0.004**2 * (1 + np.exp(-ITERATIONS / 800))
    else:
        paths = stationarity_sweep(tmp_path, power=1.0)
        name, slow = "centroid/stationarity", 0.3 * 0.0012 * (1 + np.exp(-ITERATIONS / 800))
    with h5py.File(paths[2], "a") as file:
        file[name][...] = slow
    status, printed = run_script(script, tmp_path, capsys)
    warning = [line for line in printed.splitlines() if line.startswith("warning: run2.h5")]
    assert len(warning) == 1 and warning[0].endswith("run more iterations")
    assert "has not reached steady state" in warning[0]
    assert status == 1 and "not in steady state: run2.h5" in printed.splitlines()[-2]


@pytest.mark.parametrize(
    "script, power, theory",
    [(theorem1, 2.0, 2.0), (theorem1, 2.6, 2.0), (theorem2, 1.0, 1.0), (theorem2, 0.5, 1.0)],
)
def test_check_status_is_the_printed_verdict(script, power, theory, tmp_path, capsys) -> None:
    """Noisy sweeps at the theory's slope and away from it: the exit status says FAIL exactly
    when the verdict line does, and the slope line agrees with the interval."""
    rng = np.random.default_rng(7)
    if script is theorem1:
        disagreement_sweep(tmp_path, power=power, scale=0.5 * 0.004 ** (2 - power), rng=rng)
    else:
        stationarity_sweep(tmp_path, power=power, rng=rng)
    status, printed = run_script(script, tmp_path, capsys)
    final = printed.splitlines()[-2]
    assert final.split(": ")[1].startswith("FAIL") == (status == 1)
    assert ("PASS: the 95% interval" in printed) == (status == 0) == (power == theory)


def test_theorem2_steady_mean_bound_and_best(tmp_path, capsys) -> None:
    paths = stationarity_sweep(tmp_path, power=1.0)
    status, printed = run_script(theorem2, tmp_path, capsys)
    assert status == 0, printed
    assert "~ mu^0.998 +- " in printed and "contains 1" in printed  # 0.6% transient at mu0
    assert "regime: mu L_low <= 0.1 in every fitted run" in printed
    assert "below 2 mu L_low C^2 in every run with L_low (5 of 5): True" in printed
    assert "best*: min over time" in printed and printed.splitlines()[-2].endswith("PASS")
    runs = load_runs([str(p) for p in paths], metrics=("grad_norm",), series=theorem2.SERIES)
    for run, mu in zip(runs, STEPS2, strict=True):
        r = theorem2.analyse(run, 0.5, 0)
        assert r.steady.mean == pytest.approx(0.3 * mu, rel=0.01)
        # A lower estimate: the e-fold of 1 / (2 mu h) <= 5.2 iterations is counted in whole rows.
        assert 0.8 * CURVATURE2 < r.estimates.curvature <= CURVATURE2
        assert r.bound == pytest.approx(2 * mu * r.estimates.curvature * 10.0)


def test_theorem2_lists_runs_below_the_noise_floor(tmp_path, capsys) -> None:
    plateaus = [-1e-4, 0.5 * FLOOR, *(0.3 * mu**1.2 for mu in STEPS2[2:])]
    stationarity_sweep(tmp_path, power=1.0, plateaus=plateaus)
    status, printed = run_script(theorem2, tmp_path, capsys)
    assert "half-width), left out of the fit: run0.h5, run1.h5" in printed
    assert "~ mu^1.2 +- " in printed and "n 3," in printed
    assert status == 1 and (tmp_path / "fig.png").is_file()


def test_theorem2_without_a_transient_has_no_curvature_or_bound(tmp_path, capsys) -> None:
    flat = {
        "centroid/stationarity": np.full(len(ITERATIONS), 1e-3),
        "centroid/stationarity_noise": np.full(len(ITERATIONS), FLOOR),
        "metrics/grad_norm": np.full((len(ITERATIONS), K), 3.0),
    }
    write_sweep_run(tmp_path / "run0.h5", 0.01, **flat)
    status, printed = run_script(theorem2, tmp_path, capsys)
    assert "L_low -: not estimable" in printed and "(0 of 1): True" in printed
    assert "regime: mu L_low <= 0.1 not checked" in printed
    assert "no slope: fewer than three step sizes" in printed and status == 1


def test_theorem_scripts_name_a_missing_series(tmp_path, capsys) -> None:
    path = write_sweep_run(tmp_path / "bare.h5", 0.01)
    assert theorem1.main([str(path)]) == 2
    assert "missing dataset /metrics/grad_norm" in capsys.readouterr().err
    with h5py.File(path, "a") as file:
        file["metrics/grad_norm"] = np.ones((len(ITERATIONS), K))
    assert theorem2.main([str(path)]) == 2
    assert "missing dataset /centroid/stationarity" in capsys.readouterr().err


def test_theorem1_reports_no_agreement_for_a_rising_curve_and_refuses_nan(tmp_path, capsys) -> None:
    spread = np.full((len(ITERATIONS), K), 3.0)
    rising = 1e-4 * (1 - np.exp(-ITERATIONS / 30.0))
    flat = stationarity(0.01, 1e-3, 1.0)
    write_sweep_run(
        tmp_path / "rising.h5",
        0.01,
        **{"centroid/disagreement": rising, "metrics/grad_norm": spread},
        **flat,
    )
    assert theorem1.main([str(tmp_path / "rising.h5"), "--out", str(tmp_path / "r.png")]) == 0
    printed = capsys.readouterr().out
    assert "started within the band" in printed
    assert "no slope: fewer than three step sizes" in printed
    diverged = rising.copy()
    diverged[-1] = np.nan
    write_sweep_run(
        tmp_path / "nan.h5",
        0.01,
        **{"centroid/disagreement": diverged, "metrics/grad_norm": spread},
        **flat,
    )
    assert theorem1.main([str(tmp_path / "nan.h5")]) == 2
    assert "holds NaN or inf" in capsys.readouterr().err


def test_theorem2_clamps_a_window_longer_than_the_run(tmp_path, capsys) -> None:
    stationarity_sweep(tmp_path, power=1.0)
    argv = [str(tmp_path / "run0.h5"), "--window", "5000", "--out", str(tmp_path / "w.png")]
    assert theorem2.main(argv) == 0
    assert f"best*: min over time of the {len(ITERATIONS)}-row" in capsys.readouterr().out


def test_representation_script_fits_a_known_geometric_rate(tmp_path, capsys) -> None:
    for name, factor, learner, steps in [("fast", 0.99, "anil", 1), ("stuck", 1.0, "arm", 5)]:
        distance = 0.5 * factor ** ITERATIONS.astype(float)
        path = write_sweep_run(tmp_path / f"{name}.h5", 0.01, **{"centroid/rep_distance": distance})
        with h5py.File(path, "a") as f:
            config = json.loads(f.attrs["config"])
            config["learner"] = {"name": learner, "local_steps": steps}
            config["linear"] = {"head_mean": 0.0}
            f.attrs["config"] = json.dumps(config)
    out = tmp_path / "rep.png"
    assert representation.main([str(tmp_path / "*.h5"), "--out", str(out)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["anil"][-2] == "0.9900" and rows["anil"][-1] == "yes"
    assert rows["arm"][1] == "tau=5" and rows["arm"][-2] == "1.0000" and rows["arm"][-1] == "no"
    assert out.is_file()


def test_theorem2_names_a_run_without_a_finite_estimate(tmp_path, capsys) -> None:
    nothing = np.full(len(ITERATIONS), np.nan)
    path = write_sweep_run(
        tmp_path / "nan.h5",
        0.01,
        **{
            "centroid/stationarity": nothing,
            "centroid/stationarity_noise": nothing,
            "metrics/grad_norm": np.ones((len(ITERATIONS), K)),
        },
    )
    assert theorem2.main([str(path)]) == 2
    assert "holds no finite value" in capsys.readouterr().err
