"""analysis/persafl.py on synthetic run files: virtual time to a target and the ratio."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))

import persafl  # noqa: E402


def write_run(path: Path, strategy: str, time: list[float], loss: list[float]) -> Path:
    """A run file with the datasets the analysis reads."""
    with h5py.File(path, "w") as file:
        file.attrs["config"] = json.dumps({"strategy": strategy, "seed": 0})
        file["time/virtual"] = np.array(time)
        file["centroid/val_loss"] = np.array(loss)
    return path


def test_virtual_time_to_the_synchronous_final_loss(tmp_path, capsys) -> None:
    write_run(tmp_path / "fedmeta.h5", "fedmeta", [0, 10, 20, 30], [4.0, 3.0, 2.0, 1.0])
    write_run(tmp_path / "persafl.h5", "persafl", [0, 5, 10, 15], [4.0, 2.0, 1.0, 0.5])
    paths = [str(tmp_path / "fedmeta.h5"), str(tmp_path / "persafl.h5")]
    assert persafl.metric_name(paths) == "centroid/val_loss"
    runs = [persafl.read_run(path, "centroid/val_loss") for path in paths]
    assert persafl.default_target(runs, higher=False) == 1.0
    assert persafl.time_to_reach(runs[0], 1.0, higher=False) == 30
    assert persafl.time_to_reach(runs[1], 1.0, higher=False) == 10
    assert np.isnan(persafl.time_to_reach(runs[0], 0.1, higher=False))
    out = tmp_path / "persafl.png"
    assert persafl.main([str(tmp_path / "*.h5"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "persafl, seed 0" in printed and "3.00" in printed and out.exists()


def test_a_run_without_a_virtual_clock_gives_one_line(tmp_path, capsys) -> None:
    write_run(tmp_path / "atc.h5", "atc", [0.0], [1.0])
    assert persafl.main([str(tmp_path / "atc.h5")]) == 2
    assert "strategy 'atc' has no virtual clock" in capsys.readouterr().err
