"""analysis/l2c.py on synthetic run files: weight on the own task, bytes along active edges,
test accuracy over nodes and weight against shared classes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))

import l2c  # noqa: E402

# Four nodes, two tasks: nodes 0 and 1 hold classes (0, 1), nodes 2 and 3 classes (2, 3).
CLASSES = np.array([[0, 1], [0, 1], [2, 3], [3, 2]])
EDGES = np.array([(j, i) for i in range(4) for j in range(4)])  # complete graph, by (i, j)
MATES = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=bool)


def matrix_row(matrix: np.ndarray) -> np.ndarray:
    """The /mixing/weights row of W[i, j] in EDGES' order."""
    return matrix[EDGES[:, 1], EDGES[:, 0]]


def write_run(path: Path, strategy: str, weights: list[np.ndarray], **config) -> Path:
    """A run file with rows at rounds 0, 1, 2, ... holding the weight matrices `weights`, a
    model row of 10 float32 values, and test accuracies 0.5 + 0.1 node + 0.01 round."""
    rows = len(weights)
    settings = {"strategy": strategy, "agents": 4, "iterations": rows - 1, **config}
    settings.setdefault("l2c", {"prune_count": 0, "prune_round": 10})
    with h5py.File(path, "w") as file:
        file.attrs["config"] = json.dumps(settings)
        file["time/iteration"] = np.arange(rows)
        file["metrics/test_accuracy"] = 0.5 + 0.1 * np.arange(4) + 0.01 * np.arange(rows)[:, None]
        file["tasks/node_classes"] = CLASSES
        file["topology/edges"] = EDGES
        file["mixing/weights"] = np.stack([matrix_row(m) for m in weights])
        file["params/final"] = np.zeros((4, 10), dtype=np.float32)
    return path


UNIFORM = np.full((4, 4), 0.25)
LEARNED = np.where(MATES, 0.4, 0.1)  # 0.4 on itself and its mate, 0.1 on each other node
PRUNED = np.where(MATES, 0.5, 0.0)  # the other task's nodes dropped


def test_weight_on_the_own_task_and_mates_on_top(tmp_path) -> None:
    run = l2c.read_run(str(write_run(tmp_path / "r.h5", "l2c", [UNIFORM, LEARNED])))
    lines = l2c.weights_table(run)
    assert lines[3].split() == ["0", "0.500", "0.500", "0/4", "0.250"]  # ties are not "on top"
    assert lines[4].split() == ["1", "0.800", "0.800", "4/4", "0.400"]
    swapped = LEARNED.copy()
    swapped[0, 1], swapped[0, 2] = 0.1, 0.4  # node 0 now prefers node 2 to its mate
    assert l2c.mates_on_top(swapped, MATES).tolist() == [False, True, True, True]


def test_bytes_count_model_rows_along_the_kept_edges(tmp_path) -> None:
    """Two rounds: 12 crossing edges in round 1, then the 4 that dropping two in-neighbours a
    node after round T0 = 1 keeps; meta-L2C sends twice, D-PSGD every edge, local nothing."""
    weights = [UNIFORM, PRUNED, PRUNED]
    pruning = {"l2c": {"prune_count": 2, "prune_round": 1}}
    learned = l2c.read_run(str(write_run(tmp_path / "l.h5", "l2c", weights, **pruning)))
    assert l2c.bytes_per_node(learned) == pytest.approx((12 + 4) * 40 / 4)
    meta = l2c.read_run(str(write_run(tmp_path / "m.h5", "meta_l2c", weights, **pruning)))
    assert l2c.bytes_per_node(meta) == pytest.approx(2 * (12 + 4) * 40 / 4)
    unpruned = l2c.read_run(str(write_run(tmp_path / "u.h5", "l2c", weights)))
    assert l2c.bytes_per_node(unpruned) == pytest.approx(2 * 12 * 40 / 4)
    fixed = l2c.read_run(str(write_run(tmp_path / "d.h5", "atc", weights)))
    assert l2c.bytes_per_node(fixed) == pytest.approx(2 * 12 * 40 / 4)
    alone = l2c.read_run(str(write_run(tmp_path / "n.h5", "noncooperative", weights)))
    assert l2c.bytes_per_node(alone) == 0


def test_compare_gives_mean_spread_and_worst_tenth(tmp_path) -> None:
    run = l2c.read_run(str(write_run(tmp_path / "r.h5", "l2c", [UNIFORM, LEARNED])))
    final = 0.5 + 0.1 * np.arange(4) + 0.01
    cells = l2c.compare_table([run])[2].split()
    assert cells[:2] == ["L2C", "1"]
    assert [float(c) for c in cells[2:6]] == pytest.approx(
        [final.mean(), final.std(), final.min(), final.min()], abs=1e-4
    )
    assert l2c.worst_share(np.arange(20.0)) == 0.5  # the mean of the lowest two of 20


def test_weight_against_shared_classes(tmp_path) -> None:
    path = write_run(
        tmp_path / "r.h5",
        "l2c",
        [UNIFORM, LEARNED, PRUNED],
        l2c={"prune_count": 2, "prune_round": 2},
    )
    run = l2c.read_run(str(path))
    used, levels = l2c.shared_rows(run, None)
    assert used == 1  # the last row before pruning
    assert levels == [(0, 8, pytest.approx(0.1), pytest.approx(0.0)), (2, 4, 0.4, 0.0)]


def test_a_file_without_weights_is_one_error_line(tmp_path, capsys) -> None:
    path = tmp_path / "bare.h5"
    with h5py.File(path, "w") as file:
        file.attrs["config"] = json.dumps({"strategy": "atc", "agents": 4, "iterations": 1})
        file["time/iteration"] = np.arange(2)
        file["params/final"] = np.zeros((4, 10), dtype=np.float32)
    assert l2c.main(["weights", str(path)]) == 2
    assert "holds no /tasks/node_classes" in capsys.readouterr().err


def test_encoder_steps_against_uniform_weights(tmp_path, capsys) -> None:
    """Per row: the encoder's norm, the logged step terms, and w_ij x in-degree (4): 1 on
    every edge when uniform; 1.6 on the mates and 0.4 elsewhere (std 0.6) when learned."""
    path = write_run(tmp_path / "m.h5", "meta_l2c", [UNIFORM, LEARNED])
    with h5py.File(path, "a") as file:
        file["l2c/encoder"] = np.array([[3.0, 4.0], [0.6, 0.8]])
        file["l2c/gradient_norm"] = np.array([np.nan, 2e-3])
        file["l2c/decay_norm"] = np.array([np.nan, 5e-2])
        file["l2c/gradient_share"] = np.array([np.nan, 0.0125])
    lines = l2c.encoder_table(l2c.read_run(str(path)))
    assert lines[3].split() == ["0", "5", "nan", "nan", "nan", "0.0000", "1.000"]
    assert lines[4].split() == ["1", "1", "0.002", "0.05", "0.0125", "0.6000", "1.600"]
    plain = write_run(tmp_path / "l.h5", "l2c", [UNIFORM, LEARNED])
    assert l2c.main(["encoder", str(plain)]) == 2
    assert "a strategy = 'meta_l2c' run has them" in capsys.readouterr().err
