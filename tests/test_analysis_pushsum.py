"""analysis/pushsum.py on synthetic run files: consensus error, asynchrony and budget tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analysis"))

import pushsum  # noqa: E402


def write_run(
    path: Path,
    *,
    wake: float = 1.0,
    delay: int = 1,
    loss: float = 0.0,
    budget: int = 1,
    seed: int = 0,
    strategy: str = "pushsum",
    val_loss: list[float] | None = None,
    error: list[float] | None = None,
    messages: list[float] | None = None,
    params: bool = True,
) -> Path:
    """A complete run file of 2 agents with the datasets the analysis reads."""
    rows = len(val_loss or error)
    config = {
        "strategy": strategy,
        "seed": seed,
        "asynchrony": {"wake_probability": wake, "max_delay": delay, "loss_probability": loss},
        "learner": {"inner_steps": budget},
        "optimizer": {"lr": 0.001},
    }
    with h5py.File(path, "w") as file:
        file.attrs["config"] = json.dumps(config)
        file.attrs["complete"] = True
        file["time/iteration"] = np.arange(rows) * 10
        file["time/wall"] = np.arange(rows, dtype=float)
        file["comm/messages"] = np.array(messages or [0.0] + [8.0] * (rows - 1))
        if val_loss is not None:
            file["metrics/val_loss"] = np.stack([val_loss, val_loss], axis=1)
        if error is not None:
            # The agents' errors differ by a factor 3: the table reads their max and mean.
            file["pushsum/consensus_error"] = np.stack([error, 3 * np.array(error)], axis=1)
        if params:
            file["params/initial"] = np.array([[1.0, 2.0], [3.0, 4.0]])  # mean (2, 3)
            file["params/final"] = np.array([[2.0, 3.0], [2.0, 3.0 + 1e-6]])
    return path


def test_consensus_rounds_to_the_threshold_and_the_distance_to_the_launch_average(
    tmp_path, capsys
) -> None:
    write_run(tmp_path / "sync.h5", error=[1.0, 1e-10, 1e-25, 1e-28])
    write_run(tmp_path / "async.h5", loss=0.3, delay=3, error=[1.0, 1e-5, 1e-12, 1e-22])
    out = tmp_path / "consensus.png"
    assert pushsum.main(["consensus", str(tmp_path / "*.h5"), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert out.exists() and lines[-1] == str(out)
    sync, asynchronous = lines[2].split("  "), lines[3].split("  ")
    assert lines[2].startswith("wake 1, delay <= 1, loss 0 ")  # the synchronous run first
    cells = [[c.strip() for c in line if c.strip()] for line in (sync, asynchronous)]
    # Round 20: 3e-25 < 1e-20 for both agents; the asynchronous run's 3e-22 at round 30.
    assert cells[0][2:] == ["20", "2.00e-28", f"{1e-6 / np.sqrt(13):.2e}", "24"]
    assert cells[1][2:4] == ["30", "2.00e-22"]


def test_asynchrony_target_is_the_worst_final_loss(tmp_path, capsys) -> None:
    write_run(tmp_path / "a.h5", val_loss=[4.0, 3.0, 2.0, 1.0], messages=[0, 100, 100, 100])
    write_run(tmp_path / "b.h5", wake=0.2, val_loss=[4.0, 3.5, 2.5, 2.0], messages=[0, 20, 20, 20])
    runs = pushsum.load_runs(
        [str(tmp_path / "*.h5")], metrics=("val_loss",), series=("comm/messages",)
    )
    assert pushsum.asynchrony_target(runs, last=1) == 2.0
    assert pushsum.asynchrony_target(runs, last=2) == 2.25
    assert pushsum.main(["asynchrony", str(tmp_path / "*.h5"), "--last", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == str(tmp_path / "pushsum_asynchrony.png")
    fast = [c for c in lines[2].split("  ") if c.strip()]
    slow = [c for c in lines[3].split("  ") if c.strip()]
    # wake 1 reaches 2.0 at round 20 after 200 messages; wake 0.2 at round 30 after 60.
    assert [c.strip() for c in fast[2:]] == ["1.0000", "300", "20", "200"]
    assert [c.strip() for c in slow[2:]] == ["2.0000", "60", "30", "60"]


def test_budget_means_over_seeds(tmp_path, capsys) -> None:
    write_run(tmp_path / "u0.h5", budget=0, val_loss=[4.0, 4.0])
    write_run(tmp_path / "u1a.h5", budget=1, val_loss=[4.0, 2.0])
    write_run(tmp_path / "u1b.h5", budget=1, seed=1, val_loss=[4.0, 1.0])
    write_run(tmp_path / "u2.h5", budget=2, val_loss=[4.0, 0.5])
    out = tmp_path / "budget.png"
    assert pushsum.main(["budget", str(tmp_path / "*.h5"), "--last", "1", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = [[c.strip() for c in line.split("  ") if c.strip()] for line in lines[2:-1]]
    assert [row[0] for row in table] == ["0", "1", "2"]
    assert table[1][2:] == ["2", "1.5000", "1.0000 - 2.0000"] and out.exists()


def test_bad_inputs_give_one_line(tmp_path, capsys) -> None:
    write_run(tmp_path / "atc.h5", strategy="atc", val_loss=[1.0, 0.5])
    assert pushsum.main(["budget", str(tmp_path / "atc.h5")]) == 2
    assert "strategy 'atc' is not pushsum" in capsys.readouterr().err
    write_run(tmp_path / "bare.h5", error=[1.0, 1e-3], params=False)
    assert pushsum.main(["consensus", str(tmp_path / "bare.h5")]) == 2
    assert "no /params/initial and /params/final" in capsys.readouterr().err
    write_run(tmp_path / "trained.h5", val_loss=[1.0, 0.5])
    assert pushsum.main(["consensus", str(tmp_path / "trained.h5")]) == 2
    assert "missing dataset /pushsum/consensus_error" in capsys.readouterr().err


def test_the_script_imports_neither_torch_mpi4py_nor_dmeta(tmp_path) -> None:
    run = write_run(tmp_path / "u1.h5", val_loss=[4.0, 2.0])
    out = tmp_path / "budget.png"
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['analysis/pushsum.py', 'budget', {str(run)!r}, '--out', {str(out)!r}]\n"
        "sys.path.insert(0, 'analysis')\n"
        "try:\n"
        "    runpy.run_path('analysis/pushsum.py', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "loaded = {'torch', 'mpi4py', 'dmeta'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file()
