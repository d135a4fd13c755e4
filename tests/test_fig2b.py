"""analysis/fig2b.py on synthetic few-shot run files (h5py only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))

import fig2b  # noqa: E402

K = 3
TASKS = 600


def write_fewshot_run(path: Path, strategy: str, accuracy: float, shots: int = 1) -> Path:
    """A complete run whose final meta-test accuracy has network mean `accuracy`."""
    per_agent = accuracy + np.array([-0.01, 0.0, 0.01])
    config = {"strategy": strategy, "fewshot": {"dataset": "omniglot", "ways": 5, "shots": shots}}
    with h5py.File(path, "w") as file:
        file.attrs.update({"config": json.dumps(config), "strategy": strategy, "complete": True})
        file["time/iteration"] = np.array([0, 50, 100])
        file["time/wall"] = np.array([0.0, 1.0, 2.0])
        file["metrics/val_accuracy"] = np.linspace(0.2, accuracy, 3)[:, None].repeat(K, axis=1)
        final = file.create_dataset("final/test_accuracy", data=per_agent)
        final.attrs.update({"network_mean": accuracy, "network_ci95": 0.005})
        file["final/test_accuracy_ci95"] = np.full(K, 0.008)
    return path


def runs(folder: Path, diffusion: float, central: float, alone: float, shots: int = 1) -> list:
    return [
        str(write_fewshot_run(folder / f"{s}{shots}.h5", s, a, shots))
        for s, a in (("atc", diffusion), ("centralized", central), ("noncooperative", alone))
    ]


def test_the_table_gives_accuracies_with_intervals_and_the_differences(tmp_path, capsys) -> None:
    files = runs(tmp_path, 0.90, 0.91, 0.84) + runs(tmp_path, 0.95, 0.95, 0.93, shots=5)
    assert fig2b.main([*files, "--out", str(tmp_path / "f.png"), "--check"]) == 1
    out, err = capsys.readouterr()
    assert "90.00 +- 0.50" in out and "89.00..91.00" in out
    assert "omniglot 5-way 1-shot: Dif-MAML - Centralized = -1.00 points" in out
    assert "omniglot 5-way 1-shot: Dif-MAML - Non-cooperative = +6.00 points" in out
    # 5-shot: 2 points above non-cooperative is short of the 3-point margin.
    assert "5-shot: Dif-MAML is +2.00 points above non-cooperative" in err
    assert "1-shot" not in err
    assert (tmp_path / "f.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("diffusion", "central", "alone", "status"),
    [(0.90, 0.91, 0.86, 0), (0.90, 0.925, 0.80, 1), (0.90, 0.90, 0.875, 1)],
)
def test_check_holds_only_within_tolerance_and_above_margin(
    tmp_path, diffusion, central, alone, status
) -> None:
    files = runs(tmp_path, diffusion, central, alone)
    assert fig2b.main([*files, "--out", str(tmp_path / "f.png"), "--check"]) == status


def test_a_missing_baseline_fails_the_check_and_a_missing_final_is_one_line(
    tmp_path, capsys
) -> None:
    files = runs(tmp_path, 0.9, 0.9, 0.8)[:2]
    assert fig2b.main([*files, "--out", str(tmp_path / "f.png"), "--check"]) == 1
    assert "5-way 1-shot: no Non-cooperative run to compare" in capsys.readouterr().err
    twin = write_fewshot_run(tmp_path / "again.h5", "atc", 0.9)
    assert fig2b.main([*files, str(twin)]) == 2
    assert "are both atc runs of omniglot 5-way 1-shot" in capsys.readouterr().err
    with h5py.File(files[0], "a") as file:
        del file["final/test_accuracy_ci95"]
    assert fig2b.main(files) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing dataset /final/test_accuracy_ci95" in err
