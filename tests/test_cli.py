"""The `dmeta` command end to end: layouts give the same numbers, bad input one clear line."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, read_datasets, run_local, small_config

from dmeta.checkpoint import checkpoint_path

BIN = Path(sys.executable).parent
JOB = Path(__file__).parent.parent / "jobs" / "sine_quick.toml"


def dmeta(*args: str, ranks: int = 0, timeout: int = 120) -> subprocess.CompletedProcess:
    """`dmeta ARGS`, under `mpiexec -n ranks` when ranks > 0."""
    command = [str(BIN / "dmeta"), *args]
    if ranks:
        command = [str(BIN / "mpiexec"), "-n", str(ranks), *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def overrides(*extra: str) -> list[str]:
    return [item for pair in ([("--set", o) for o in [*SMALL, *extra]]) for item in pair]


@pytest.mark.parametrize("ranks", [1, 3])
def test_mpiexec_layouts_reproduce_the_in_process_run(tmp_path, ranks) -> None:
    # 2 and 4 ranks are covered by tests/test_mpi.py under mpiexec.
    out = tmp_path / "mpi.h5"
    result = dmeta("run", str(JOB), *overrides(), "--out", str(out), "--quiet", ranks=ranks)
    assert result.returncode == 0, result.stderr
    local = run_local(small_config(), tmp_path / "local.h5")
    parallel = read_datasets(out)
    assert parallel["metrics/val_loss"].shape == local["metrics/val_loss"].shape
    for name in ("metrics/val_loss", "metrics/train_loss", "params/final"):
        scale = np.nanmax(np.abs(local[name]))
        np.testing.assert_allclose(parallel[name], local[name], rtol=1e-6, atol=1e-6 * scale)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dmeta: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


BAD_INPUTS = [
    (["--set", "agentz=3"], ["unknown config key 'agentz'"]),
    (
        ["--set", "graph.topology=edge_list", "--set", "graph.edge_list_path=/no/such/edges.txt"],
        ["/no/such/edges.txt"],
    ),
    (
        ["--set", "graph.rule=matrix", "--set", "graph.matrix_path=/no/such/matrix.txt"],
        ["/no/such/matrix.txt"],
    ),
]


@pytest.mark.parametrize("ranks", [0, 2])
@pytest.mark.parametrize(("args", "fragments"), BAD_INPUTS)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, ranks, args, fragments) -> None:
    out = tmp_path / "never.h5"
    result = dmeta("run", str(JOB), *args, "--out", str(out), ranks=ranks)
    assert_one_error_line(result, *fragments)
    assert not out.exists() and not Path(str(out) + ".partial").exists()


@pytest.mark.parametrize("ranks", [0, 2])
def test_disconnected_graph_is_refused(tmp_path, ranks) -> None:
    edges = tmp_path / "edges.txt"
    edges.write_text("0 1\n2 3\n")
    result = dmeta(
        "run",
        str(JOB),
        "--set",
        "agents=4",
        "--set",
        "graph.topology=edge_list",
        "--set",
        f"graph.edge_list_path={edges}",
        "--out",
        str(tmp_path / "x.h5"),
        ranks=ranks,
    )
    assert_one_error_line(result, "connected")


@pytest.mark.parametrize("ranks", [0, 2])
def test_non_stochastic_matrix_is_refused(tmp_path, ranks) -> None:
    matrix = tmp_path / "a.txt"
    np.savetxt(matrix, np.array([[0.5, 0.5], [0.4, 0.5]]))
    result = dmeta(
        "run",
        str(JOB),
        "--set",
        "agents=2",
        "--set",
        "graph.rule=matrix",
        "--set",
        f"graph.matrix_path={matrix}",
        "--out",
        str(tmp_path / "x.h5"),
        ranks=ranks,
    )
    assert_one_error_line(result, "column")


def test_more_ranks_than_agents_is_refused(tmp_path) -> None:
    result = dmeta(
        "run",
        str(JOB),
        "--set",
        "agents=2",
        "--set",
        "graph.topology=ring",
        "--out",
        str(tmp_path / "x.h5"),
        ranks=3,
    )
    assert_one_error_line(result, "3 ranks but only 2 agents")


def test_local_backend_under_several_ranks_is_refused(tmp_path) -> None:
    result = dmeta(
        "run", str(JOB), "--set", "runtime.backend=local", "--out", str(tmp_path / "x.h5"), ranks=2
    )
    assert_one_error_line(result, "runtime.backend = 'local'")


def test_graph_command_reports_the_matrix(tmp_path) -> None:
    picture = tmp_path / "graph.png"
    result = dmeta("graph", str(JOB), "--set", "graph.rule=metropolis", "--plot", str(picture))
    assert result.returncode == 0, result.stderr
    assert "lambda" in result.stdout.lower() and "doubly" in result.stdout.lower()
    assert picture.stat().st_size > 0


def write_sweep(folder: Path, vary: str) -> Path:
    """A sweep over a small job file written next to it."""
    job = folder / "small.toml"
    job.write_text("\n".join(line.replace("=", " = ", 1) for line in SMALL if "." not in line))
    sweep = folder / "sweep.toml"
    sweep.write_text(f'base = "small.toml"\n[vary]\n{vary}\n')
    return sweep


def test_sweep_runs_each_variation_into_its_own_file(tmp_path) -> None:
    # Unquoted, optimizer.lr is a nested table in TOML: the same key.
    sweep = write_sweep(tmp_path, "optimizer.lr = [0.001, 0.002]\niterations = [4, 8]")
    graph = ["--set", "graph.topology=ring", "--set", "model.hidden=[8]"]
    result = dmeta("sweep", str(sweep), *graph, "--parallel", "2", "--out-dir", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    first = tmp_path / "o" / "lr=0.001_iterations=4.h5"
    second = tmp_path / "o" / "lr=0.002_iterations=8.h5"
    assert f"-> {first}" in result.stdout and f"-> {second}" in result.stdout
    assert read_datasets(first)["time/iteration"][-1] == 4
    assert read_datasets(second)["time/iteration"][-1] == 8


def test_sigterm_to_a_sweep_stops_its_runs_with_checkpoints(tmp_path) -> None:
    """SIGTERM to `dmeta sweep` reaches the running members, which write their checkpoints;
    the third member never starts, each member's output is in its log, one error line says
    what happened, and the same sweep run again continues them."""
    sweep = write_sweep(tmp_path, "seed = [1, 2, 3]")
    out = tmp_path / "o"
    command = [str(BIN / "dmeta"), "sweep", str(sweep), "--set", "iterations=100000"]
    command += ["--set", "model.hidden=[8]", "--parallel", "2", "--out-dir", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = [out / f"seed={seed}.h5.partial" for seed in (1, 2)]
    deadline = time.monotonic() + 90
    # A member's run file appears once it is planned, its signal handlers set.
    while not all(path.exists() for path in partial):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=90)
    assert process.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("dmeta: error:")]
    assert len(errors) == 1 and "stopped by a signal: 3 of 3 runs" in errors[0], stderr
    assert "Traceback" not in stderr
    for seed in (1, 2):
        assert checkpoint_path(out / f"seed={seed}.h5").exists()
        assert "written; run the same command again" in (out / f"seed={seed}.h5.log").read_text()
    assert not (out / "seed=3.h5.log").exists()
    status = dmeta("sweep", str(sweep), "--out-dir", str(out), "--status")
    assert status.stdout.count("resumable") == 2 and "missing" in status.stdout


@pytest.mark.parametrize(
    ("vary", "fragment"),
    [
        ('"optimizer.lr" = [0.001, 0.002]\niterations = [4]', "all of one length"),
        ('"optimizer.lrr" = [0.001]', "unknown config key 'optimizer.lrr'"),
        ('"optimizer.lr" = [-1.0]', "optimizer.lr = -1.0 must be positive"),
    ],
)
def test_a_bad_sweep_fails_before_any_run(tmp_path, vary, fragment) -> None:
    sweep = write_sweep(tmp_path, vary)
    result = dmeta("sweep", str(sweep), "--out-dir", str(tmp_path / "o"))
    assert_one_error_line(result, fragment)
    assert not (tmp_path / "o").exists()


def test_a_sweep_combines_vary_grid_and_repeats(tmp_path) -> None:
    from dmeta.sweep import load_sweep

    (tmp_path / "small.toml").write_text("agents = 7\nseed = 5\n")
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        'base = "small.toml"\nrepeat = 2\n'
        '[vary]\n"optimizer.lr" = [0.1, 0.2]\niterations = [3, 4]\n'
        '[grid]\n"learner.name" = ["maml", "fomaml"]\n'
    )
    _, runs = load_sweep(sweep, tmp_path / "o", [])
    assert len(runs) == 2 * 2 * 2
    names = [run.out.name for run in runs]
    assert names[:2] == [
        "lr=0.1_iterations=3_name=maml_seed=5.h5",
        "lr=0.1_iterations=3_name=maml_seed=6.h5",
    ]
    assert len(set(names)) == 8
    assert {(r.config.optimizer.lr, r.config.iterations) for r in runs} == {(0.1, 3), (0.2, 4)}
    assert {r.config.learner.name for r in runs} == {"maml", "fomaml"}
    assert {r.config.seed for r in runs} == {5, 6}
