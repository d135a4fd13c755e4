"""Tests of the analysis scripts on synthetic run files (h5py only: no torch, no MPI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ANALYSIS = ROOT / "analysis"
sys.path.insert(0, str(ANALYSIS))

import fig1b  # noqa: E402
from runfile import RunFileError, expand_paths, open_run  # noqa: E402

K = 4
ITERATIONS = np.array([0, 100, 200])


def write_run(
    path: Path,
    strategy: str,
    final: float,
    *,
    complete: bool = True,
    omit: tuple[str, ...] = (),
    dense_topology: bool = False,
) -> Path:
    """A run file with the dmeta layout whose last val_loss row has mean `final`; its complete
    graph is the sparse /topology group (edges, weights, attributes), or with `dense_topology`
    the old layout: a dense /topology/A with a lambda2 attribute.

    Rows are 10, 5 and the last row `final + [-1.5, -0.5, 0.5, 1.5]` (so its agent mean is
    `final`); the row before the last has mean 5.
    """
    t = len(ITERATIONS)
    val = np.full((t, K), 10.0)
    val[-2] = 5.0
    val[-1] = final + np.array([-1.5, -0.5, 0.5, 1.5])
    train = val.copy()
    train[0] = np.nan
    config = {"strategy": strategy, "agents": K, "iterations": 200, "seed": 0, "graph": {}}
    datasets = {
        "time/iteration": ITERATIONS,
        "time/wall": np.linspace(0.0, 2.0, t),
        "metrics/train_loss": train,
        "metrics/val_loss": val,
        "metrics/disagreement": np.zeros((t, K)),
        "params/initial": np.zeros((K, 3)),
        "params/final": np.ones((K, 3)),
    }
    with h5py.File(path, "w") as file:
        file.attrs.update(
            {
                "config": json.dumps(config),
                "dmeta_version": "0.1.0",
                "world_size": 1,
                "seed": 0,
                "strategy": strategy,
                "complete": complete,
            }
        )
        for name, data in datasets.items():
            if name not in omit:
                file.create_dataset(name, data=data)
        if dense_topology:
            file["topology/A"] = np.full((K, K), 1.0 / K)
            file["topology/A"].attrs["lambda2"] = 0.0
        elif "topology" not in omit:
            edges = np.array([(j, k) for j in range(K) for k in range(K)], dtype=np.int64)
            file["topology/edges"] = edges
            file["topology/weights"] = np.full(len(edges), 1.0 / K)
            file["topology"].attrs.update(
                {"lambda2": 0.0, "lambda2_method": "dense", "doubly_stochastic": True}
            )
            file["topology"].attrs["num_agents"] = K
    return path


@pytest.fixture
def three_runs(tmp_path: Path) -> list[Path]:
    """ATC (final 3), centralized (final 2) and non-cooperative (final 5) runs."""
    return [
        write_run(tmp_path / "atc.h5", "atc", 3.0),
        write_run(tmp_path / "centralized.h5", "centralized", 2.0),
        write_run(tmp_path / "noncoop.h5", "noncooperative", 5.0),
    ]


def table_rows(stdout: str) -> dict[str, list[str]]:
    """Table rows keyed by file name: [final loss, ratio]."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("ratio ="):
            continue
        cells = line.split()
        for index, cell in enumerate(cells):
            if cell.endswith(".h5"):
                rows[Path(cell).name] = cells[index + 1 :]
    return rows


def fail(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run fig1b expecting exit 2; return its single stderr line."""
    assert fig1b.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fig1b: error: ")
    return lines[0]


def test_fig1b_plots_and_tabulates(three_runs, tmp_path, capsys):
    out = tmp_path / "figure.png"
    assert fig1b.main([*map(str, three_runs), "--out", str(out), "--log", "--title", "t"]) == 0
    stdout = capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stdout.strip().splitlines()[-1] == str(out)
    assert "final val loss (mean over agents, last row)" in stdout
    rows = table_rows(stdout)
    assert rows["atc.h5"] == ["3", "1.5"]
    assert rows["centralized.h5"] == ["2", "1"]
    assert rows["noncoop.h5"] == ["5", "2.5"]
    for label in ("Dif-MAML (ATC)", "Centralized", "Non-cooperative"):
        assert label in stdout


def test_fig1b_last_rows_and_default_out(three_runs, tmp_path, capsys):
    assert fig1b.main([str(tmp_path / "*.h5"), "--last", "2"]) == 0
    stdout = capsys.readouterr().out
    assert (tmp_path / "fig1b.png").is_file()
    assert "final val loss (mean over agents, last 2 rows)" in stdout
    rows = table_rows(stdout)
    assert rows["atc.h5"] == ["4", "1.143"]  # (5 + 3) / 2 against (5 + 2) / 2
    assert rows["centralized.h5"] == ["3.5", "1"]


def test_fig1b_without_centralized_has_no_ratio(three_runs, capsys):
    assert fig1b.main([str(three_runs[0]), str(three_runs[2])]) == 0
    stdout = capsys.readouterr().out
    assert "ratio" not in stdout
    assert table_rows(stdout)["atc.h5"] == ["3"]


def test_repeated_strategies_get_file_names(tmp_path, capsys):
    runs = [write_run(tmp_path / f"seed{i}.h5", "atc", 3.0) for i in range(2)]
    assert fig1b.main([str(run) for run in runs]) == 0
    assert "Dif-MAML (ATC) [seed0.h5]" in capsys.readouterr().out


def test_corrupt_file(tmp_path, capsys):
    bad = tmp_path / "x.h5"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    line = fail(capsys, [str(bad)])
    assert str(bad) in line
    assert "not an HDF5 file or corrupt" in line


def test_missing_file(tmp_path, capsys):
    assert "no such file" in fail(capsys, [str(tmp_path / "absent.h5")])


def test_missing_dataset_is_named(tmp_path, capsys):
    run = write_run(tmp_path / "r.h5", "atc", 3.0, omit=("metrics/val_loss",))
    line = fail(capsys, [str(run)])
    assert str(run) in line
    assert "missing dataset /metrics/val_loss" in line
    with pytest.raises(RunFileError, match="/time/iteration"):
        open_run(write_run(tmp_path / "s.h5", "atc", 3.0, omit=("time/iteration",)))


def test_partial_run_refused_unless_allowed(tmp_path, capsys):
    run = write_run(tmp_path / "r.h5.partial", "atc", 3.0, complete=False)
    line = fail(capsys, [str(run)])
    assert str(run) in line
    assert "not complete" in line
    assert open_run(run, allow_partial=True).complete is False
    assert fig1b.main([str(run), "--allow-partial"]) == 0


def test_glob_matching_nothing(tmp_path, capsys):
    pattern = str(tmp_path / "nothing*.h5")
    assert pattern in fail(capsys, [pattern])
    with pytest.raises(RunFileError, match="no file matches"):
        expand_paths([pattern])


def test_expand_paths_sorts_and_keeps_plain_paths(three_runs, tmp_path):
    names = [Path(p).name for p in expand_paths([str(tmp_path / "*.h5"), "plain.h5"])]
    assert names == ["atc.h5", "centralized.h5", "noncoop.h5", "plain.h5"]


def test_last_longer_than_run(three_runs, capsys):
    assert "only 3 rows" in fail(capsys, [str(three_runs[0]), "--last", "4"])


def test_script_runs_without_torch_mpi_or_dmeta(three_runs, tmp_path):
    """As `python analysis/fig1b.py` from the repo root, importing none of torch/mpi4py/dmeta."""
    out = tmp_path / "cli.png"
    argv = ["analysis/fig1b.py", *map(str, three_runs), "--out", str(out)]
    probe = (
        "import runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        "sys.path.insert(0, 'analysis')\n"
        "try:\n"
        "    runpy.run_path('analysis/fig1b.py', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "loaded = {'torch', 'mpi4py', 'dmeta'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    direct = subprocess.run(
        [sys.executable, "analysis/fig1b.py", str(three_runs[0]), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout.strip().splitlines()[-1] == str(out)


def test_lambda2_from_either_topology_layout(tmp_path):
    """New files: /topology attributes; old files: the dense /topology/A's; neither: None."""
    new = open_run(write_run(tmp_path / "new.h5", "atc", 3.0))
    assert new.lambda2 == 0.0 and new.doubly_stochastic is True
    old = open_run(write_run(tmp_path / "old.h5", "atc", 3.0, dense_topology=True))
    assert old.lambda2 == 0.0 and old.doubly_stochastic is None
    bare = open_run(write_run(tmp_path / "bare.h5", "atc", 3.0, omit=("topology",)))
    assert bare.lambda2 is None and bare.doubly_stochastic is None
    assert fig1b.main([str(tmp_path / "old.h5"), str(tmp_path / "new.h5")]) == 0
