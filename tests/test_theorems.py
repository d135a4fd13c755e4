"""The Theorem 1 and 2 scripts on synthetic sweeps whose slopes are known exactly."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))

import representation  # noqa: E402, F401
import theorem1  # noqa: E402
import theorem2  # noqa: E402
from runfile import open_run  # noqa: E402
from theory import fit_power_law, moving_average  # noqa: E402

K = 4
LAMBDA2 = 0.8
STEPS = [0.001, 0.002, 0.004, 0.008, 0.016]
ITERATIONS = np.arange(0, 1001)


def write_sweep_run(path: Path, mu: float, **series: np.ndarray) -> Path:
    """A run file with the dmeta layout, SGD at step size `mu`, holding the given series."""
    rows = len(ITERATIONS)
    config = {"strategy": "atc", "agents": K, "optimizer": {"name": "sgd", "lr": mu}}
    with h5py.File(path, "w") as file:
        file.attrs.update({"config": json.dumps(config), "strategy": "atc", "complete": True})
        file["time/iteration"] = ITERATIONS
        file["time/wall"] = np.linspace(0, 1, rows)
        for name, data in series.items():
            file[name] = data
        file["topology/A"] = np.full((K, K), 1 / K)
        file["topology/A"].attrs["lambda2"] = LAMBDA2
    return path


def disagreement_sweep(folder: Path, power: float, scale: float) -> list[Path]:
    """Disagreement 0.5 lambda2^(2i) down to a steady state scale x mu^power; the agents'
    gradient norms are 2 and 4 (mean square 10)."""
    paths = []
    spread = np.tile([2.0, 4.0, 2.0, 4.0], (len(ITERATIONS), 1))
    for index, mu in enumerate(STEPS):
        steady = scale * mu**power
        curve = np.maximum(0.5 * LAMBDA2 ** (2.0 * ITERATIONS), steady)
        paths.append(
            write_sweep_run(
                folder / f"run{index}.h5",
                mu,
                **{"centroid/disagreement": curve, "metrics/grad_norm": spread},
            )
        )
    return paths


def test_fits_recover_known_power_laws_and_lines() -> None:
    x = np.array([1.0, 2.0, 4.0, 8.0])
    fit = fit_power_law(x, 3.0 * x**1.7)
    assert fit.slope == pytest.approx(1.7) and math.exp(fit.intercept) == pytest.approx(3.0)
    assert fit.r_squared == pytest.approx(1.0)
    np.testing.assert_allclose(moving_average(np.array([1.0, 2.0, np.nan, 4.0]), 2), [1.5, 2, 4])


def test_theorem1_recovers_slope_two_agreement_times_and_the_bound(tmp_path, capsys) -> None:
    paths = disagreement_sweep(tmp_path, power=2.0, scale=0.5)
    out = tmp_path / "t1.png"
    assert theorem1.main([str(tmp_path / "run*.h5"), "--out", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "~ mu^2.00" in printed and "inside [1.6, 2.4]" in printed
    assert "below the bound of eq. (22) in every run: True" in printed
    assert out.is_file()

    results = [
        theorem1.analyse(
            open_run(p, metrics=("grad_norm",), series=("centroid/disagreement",)),
            0.5,
            2.0,
        )
        for p in paths
    ]
    for r, mu in zip(results, STEPS, strict=True):
        assert r.steady == pytest.approx(0.5 * mu**2)
        # Norms 2 and 4: mean square B^2 + C^2 = 10.
        assert r.gradient_second_moment == pytest.approx(10.0)
        assert r.bound == pytest.approx(mu**2 * LAMBDA2**2 / (1 - LAMBDA2) ** 2 * 10)
        # 0.5 lambda2^(2i) <= 2 x 0.5 mu^2 first at i = ceil(ln(2 mu^2) / (2 ln lambda2)).
        expected = math.ceil(math.log(2 * mu**2) / (2 * math.log(LAMBDA2)))
        assert r.agreement_iteration == expected
    fits = theorem1.sweep_fits(results)
    # Agreement time is linear in ln mu with slope 2 / (2 ln lambda2), up to the ceiling.
    assert fits[1].slope == pytest.approx(1 / math.log(LAMBDA2), rel=0.05)


def test_theorem1_flags_a_wrong_slope_and_a_broken_bound(tmp_path, capsys) -> None:
    disagreement_sweep(tmp_path, power=1.0, scale=50.0)
    assert (
        theorem1.main([str(tmp_path / "run*.h5"), "--out", str(tmp_path / "f.png"), "--check"]) == 1
    )
    printed = capsys.readouterr().out
    assert "~ mu^1.00" in printed and "outside [1.6, 2.4]" in printed
    assert "every run: False" in printed and " NO " in printed


def stationarity_sweep(folder: Path, power: float, floor: list[float] | None = None) -> list[Path]:
    """Stationarity decaying from 2 to a plateau 0.3 mu^power (or the given plateaus)."""
    paths = []
    for index, mu in enumerate(STEPS):
        plateau = floor[index] if floor else 0.3 * mu**power
        curve = plateau + 2.0 * np.exp(-ITERATIONS / 20.0)
        noise = np.full(len(ITERATIONS), 1e-6)
        paths.append(
            write_sweep_run(
                folder / f"run{index}.h5",
                mu,
                **{"centroid/stationarity": curve, "centroid/stationarity_noise": noise},
            )
        )
    return paths


def test_theorem2_recovers_slope_one(tmp_path, capsys) -> None:
    stationarity_sweep(tmp_path, power=1.0)
    out = tmp_path / "t2.png"
    assert theorem2.main([str(tmp_path / "run*.h5"), "--out", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "~ mu^1.00" in printed and "positive; inside [0.6, 1.4]" in printed
    assert out.is_file()


def test_theorem2_says_when_the_slope_is_not_positive(tmp_path, capsys) -> None:
    stationarity_sweep(tmp_path, power=-0.5)
    assert (
        theorem2.main([str(tmp_path / "run*.h5"), "--out", str(tmp_path / "f.png"), "--check"]) == 1
    )
    printed = capsys.readouterr().out
    assert "~ mu^-0.50" in printed and "NOT positive; outside [0.6, 1.4]" in printed


def test_theorem2_leaves_runs_below_the_noise_out_of_the_fit(tmp_path, capsys) -> None:
    plateaus = [-1e-4, 0.3 * 0.002**1.2, 0.3 * 0.004**1.2, 0.3 * 0.008**1.2, 0.3 * 0.016**1.2]
    stationarity_sweep(tmp_path, power=1.0, floor=plateaus)
    assert theorem2.main([str(tmp_path / "run*.h5"), "--out", str(tmp_path / "f.png")]) == 0
    printed = capsys.readouterr().out
    assert "left out of the fit: run0.h5" in printed
    assert "~ mu^1.20" in printed


def test_theorem_scripts_name_a_missing_series(tmp_path, capsys) -> None:
    path = write_sweep_run(tmp_path / "bare.h5", 0.01)
    assert theorem1.main([str(path)]) == 2
    assert "missing dataset /metrics/grad_norm" in capsys.readouterr().err
    assert theorem2.main([str(path)]) == 2
    assert "missing dataset /centroid/stationarity" in capsys.readouterr().err


def test_theorem1_reports_no_agreement_for_a_rising_curve_and_refuses_nan(tmp_path, capsys) -> None:
    spread = np.full((len(ITERATIONS), K), 3.0)
    rising = 1e-4 * (1 - np.exp(-ITERATIONS / 30.0))
    write_sweep_run(
        tmp_path / "rising.h5",
        0.01,
        **{"centroid/disagreement": rising, "metrics/grad_norm": spread},
    )
    assert theorem1.main([str(tmp_path / "rising.h5"), "--out", str(tmp_path / "r.png")]) == 0
    printed = capsys.readouterr().out
    assert "started within the band" in printed
    assert "no slope: fewer than two step sizes" in printed
    diverged = rising.copy()
    diverged[-1] = np.nan
    write_sweep_run(
        tmp_path / "nan.h5",
        0.01,
        **{"centroid/disagreement": diverged, "metrics/grad_norm": spread},
    )
    assert theorem1.main([str(tmp_path / "nan.h5")]) == 2
    assert "holds NaN or inf" in capsys.readouterr().err


def test_theorem2_clamps_a_window_longer_than_the_run(tmp_path, capsys) -> None:
    stationarity_sweep(tmp_path, power=1.0)
    argv = [str(tmp_path / "run0.h5"), "--window", "5000", "--out", str(tmp_path / "w.png")]
    assert theorem2.main(argv) == 0
    assert f"{len(ITERATIONS):>6d}" in capsys.readouterr().out


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
        **{"centroid/stationarity": nothing, "centroid/stationarity_noise": nothing},
    )
    assert theorem2.main([str(path)]) == 2
    assert "holds no finite value" in capsys.readouterr().err
