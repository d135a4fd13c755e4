"""analysis/fedmeta.py on synthetic run files: bytes to a target accuracy and the FedAvg ratio."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))

import fedmeta  # noqa: E402


def write_federated_run(
    path: Path,
    strategy: str,
    accuracy: list[float],
    row_bytes: float,
    test: tuple[float, ...] = (0.4, 0.6, 0.5),
    support_fraction: float = 0.2,
):
    """A run file with the datasets the analysis reads: rows every 10 rounds, `row_bytes`
    each way per row, test clients 3, 5, 8 with 2, 1, 1 query examples and accuracies `test`
    (the mean attribute 0.5 +- 0.1)."""
    config = {
        "strategy": strategy,
        "learner": {"name": "maml"},
        "federated": {"support_fraction": support_fraction, "finetune_at_test": False},
    }
    with h5py.File(path, "w") as file:
        file.attrs["config"] = json.dumps(config)
        rows = len(accuracy)
        file["time/iteration"] = np.arange(rows) * 10
        file["centroid/val_accuracy"] = np.array(accuracy)
        file["comm/bytes_up"] = np.full(rows, row_bytes)
        file["comm/bytes_down"] = np.full(rows, row_bytes)
        final = file.create_dataset("final/test_accuracy", data=np.array(test))
        final.attrs.update(network_mean=0.5, network_ci95=0.1)
        file["tasks/clients_test"] = np.array([3, 5, 8])
        file["tasks/examples_test"] = np.array([4, 3, 2])
        file["tasks/support_test"] = np.array([2, 2, 1])
    return path


def test_bytes_to_fedavgs_final_accuracy_and_the_ratio(tmp_path, capsys) -> None:
    fedavg = write_federated_run(tmp_path / "fedavg.h5", "fedavg", [0.1, 0.3, 0.5, 0.6], 100)
    meta = write_federated_run(tmp_path / "fedmeta.h5", "fedmeta", [0.2, 0.6, 0.7, 0.8], 100)
    runs = [fedmeta.read_run(str(fedavg)), fedmeta.read_run(str(meta))]
    assert fedmeta.default_target(fedmeta.reference_run(runs)) == 0.6
    # Cumulative bytes 200, 400, 600, 800: FedAvg reaches 0.6 in row 3, FedMeta in row 1.
    assert fedmeta.bytes_to_reach(runs[0], 0.6) == 800
    assert fedmeta.bytes_to_reach(runs[1], 0.6) == 400
    assert np.isnan(fedmeta.bytes_to_reach(runs[1], 0.9))
    assert fedmeta.round_to_reach(runs[0], 0.6) == 30 and fedmeta.round_to_reach(runs[1], 0.6) == 10
    out = tmp_path / "fedmeta.png"
    assert fedmeta.main([str(tmp_path / "*.h5"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FedMeta (maml), p = 0.2" in printed and "2.00" in printed and out.exists()


def test_the_test_accuracy_is_compared_with_fedavgs_client_by_client(tmp_path) -> None:
    paths = [
        write_federated_run(tmp_path / "a.h5", "fedavg", [0.5], 1, (0.4, 0.6, 0.5)),
        write_federated_run(tmp_path / "b.h5", "fedmeta", [0.5], 1, (0.5, 0.6, 0.8)),
    ]
    fedavg, meta = (fedmeta.read_run(str(path)) for path in paths)
    # Differences 0.1, 0, 0.3 over query weights 2/4, 1/4, 1/4.
    gain, half_width = fedmeta.paired_difference(meta, fedavg)
    assert gain == pytest.approx(0.125)
    deviations = np.array([-0.025, -0.125, 0.175])
    weights = np.array([0.5, 0.25, 0.25])
    expected = 1.96 * np.sqrt(1.5 * np.sum(weights**2 * deviations**2))
    assert half_width == pytest.approx(expected)
    assert fedmeta.paired_difference(fedavg, fedavg) == (0.0, 0.0)
    fedavg.test_clients = np.array([3, 5, 9])  # other test clients: no paired difference
    assert np.isnan(fedmeta.paired_difference(meta, fedavg)).all()


def test_a_run_that_is_not_federated_gives_one_line(tmp_path, capsys) -> None:
    with h5py.File(tmp_path / "atc.h5", "w") as file:
        file.attrs["config"] = json.dumps({"strategy": "atc"})
    assert fedmeta.main([str(tmp_path / "atc.h5")]) == 2
    assert "strategy 'atc' is not federated" in capsys.readouterr().err


def test_labels_tell_the_methods_and_fedavg_meta_fine_tuning_apart() -> None:
    federated = {"support_fraction": 0.2, "finetune_at_test": False}
    maml = {"strategy": "fedmeta", "learner": {"name": "maml"}, "federated": federated}
    assert fedmeta.label_of(maml) == "FedMeta (maml), p = 0.2"
    fedavg = {"strategy": "fedavg", "learner": {"name": "maml"}, "federated": federated}
    assert fedmeta.label_of(fedavg) == "FedAvg, p = 0.2"
    tuned = {
        "strategy": "fedavg",
        "learner": {"name": "maml", "inner_steps": 5, "inner_lr": 0.005},
        "federated": federated | {"finetune_at_test": True},
    }
    assert fedmeta.label_of(tuned) == "FedAvg(Meta) (fine-tune 5 x 0.005), p = 0.2"
    tuned["federated"]["finetune_lr"] = 0.01  # its own step, not the learner's
    assert fedmeta.label_of(tuned) == "FedAvg(Meta) (fine-tune 5 x 0.01), p = 0.2"
    batches = fedavg | {"federated": federated | {"batch_size": 10}}
    assert fedmeta.label_of(batches) == "FedAvg (mini-batches of 10), p = 0.2"


def test_fedadam_is_labelled_by_its_server(tmp_path) -> None:
    federated = {"support_fraction": 0.2, "server_optimizer": "adam", "server_lr": 0.01}
    fedadam = {"strategy": "fedavg", "learner": {"name": "maml"}, "federated": federated}
    assert fedmeta.label_of(fedadam) == "FedAvg (server adam 0.01), p = 0.2"
    for server, lr in (("average", 0.001), ("auto", 0.001), ("sgd", 1.0)):
        plain = fedadam | {"federated": federated | {"server_optimizer": server, "server_lr": lr}}
        assert fedmeta.label_of(plain) == "FedAvg, p = 0.2"


def test_the_reference_is_full_batch_fedavg_or_the_run_asked_for(tmp_path, capsys) -> None:
    tuned = write_federated_run(tmp_path / "a.h5", "fedavg", [0.1, 0.5], 100)
    batches = write_federated_run(tmp_path / "b.h5", "fedavg", [0.1, 0.7], 100)
    full = write_federated_run(tmp_path / "c.h5", "fedavg", [0.1, 0.6], 100)
    for path, key in ((tuned, "finetune_at_test"), (batches, "batch_size")):
        with h5py.File(path, "r+") as file:
            config = json.loads(file.attrs["config"])
            config["federated"][key] = 10 if key == "batch_size" else True
            file.attrs["config"] = json.dumps(config)
    runs = [fedmeta.read_run(str(path)) for path in (tuned, batches, full)]
    assert fedmeta.reference_run(runs).path == str(full)
    assert fedmeta.reference_run(runs[:2]).path == str(batches)
    assert fedmeta.main([str(tuned), str(full), "--reference", str(batches)]) == 0
    printed = capsys.readouterr().out
    assert "bytes to 0.7000" in printed  # the reference's final validation accuracy
    meta = write_federated_run(tmp_path / "m.h5", "fedmeta", [0.5], 1)
    assert fedmeta.main([str(full), "--reference", str(meta)]) == 2
    assert "is not a fedavg run" in capsys.readouterr().err
    # A pattern names the reference where it matches one file (a sweep's member).
    assert fedmeta.main([str(tuned), str(full), "--reference", str(tmp_path / "b*.h5")]) == 0
    assert "bytes to 0.7000" in capsys.readouterr().out
    assert fedmeta.main([str(full), "--reference", str(tmp_path / "[ab].h5")]) == 2
    assert "matches 2 files: name one run" in capsys.readouterr().err


def test_runs_of_several_support_fractions_in_table_2s_layout(tmp_path, capsys) -> None:
    """A column per support fraction; no paired difference between runs of two fractions
    (the same test clients, but other query sets)."""
    for p in (0.2, 0.5):
        for strategy in ("fedavg", "fedmeta"):
            write_federated_run(
                tmp_path / f"{strategy}{p}.h5", strategy, [0.1, 0.6], 100, support_fraction=p
            )
    runs = [fedmeta.read_run(str(path)) for path in sorted(tmp_path.glob("*.h5"))]
    by_name = {Path(run.path).stem: run for run in runs}
    assert by_name["fedmeta0.5"].method == "FedMeta (maml)"
    assert by_name["fedmeta0.5"].label == "FedMeta (maml), p = 0.5"
    same = fedmeta.paired_difference(by_name["fedmeta0.5"], by_name["fedavg0.5"])
    assert same == (0.0, 0.0)
    assert np.isnan(fedmeta.paired_difference(by_name["fedmeta0.5"], by_name["fedavg0.2"])[0])
    lines = fedmeta.support_table(runs[:3])  # fedavg 0.2 and 0.5, fedmeta 0.2
    assert lines[0].split() == ["test", "acc", "(95%)", "p", "=", "0.2", "p", "=", "0.5"]
    assert lines[2].split() == ["FedAvg", "0.5000", "+-", "0.1000", "0.5000", "+-", "0.1000"]
    assert lines[3].split() == ["FedMeta", "(maml)", "0.5000", "+-", "0.1000", "-"]
    assert fedmeta.main([str(tmp_path / "*.h5")]) == 0
    assert "p = 0.5" in capsys.readouterr().out.split("test acc (95%)")[-1]
