"""Checkpoints: a run stopped by SIGTERM or killed by SIGKILL resumes to the very same file."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SMALL, read_datasets

BIN = Path(sys.executable).parent
JOB = Path(__file__).parent.parent / "jobs" / "sine_quick.toml"
# Long enough to interrupt, short enough for CI: about 3 s per run on one core.
SETTINGS = [*SMALL, "iterations=300", "log_every=10", "checkpoint.poll_every=2"]
# Timing depends on the machine, and bytes sent on the rank layout.
VARYING = ("time/wall", "time/compute", "time/comm", "time/log", "comm/bytes")


def command(out: Path, *extra: str, ranks: int = 0) -> list[str]:
    settings = [item for o in [*SETTINGS, *extra] for item in ("--set", o)]
    launch = [str(BIN / "mpiexec"), "-n", str(ranks)] if ranks else []
    return [*launch, str(BIN / "dmeta"), "run", str(JOB), *settings, "--out", str(out)]


def interrupt(cmd: list[str], rows: int, how: signal.Signals) -> subprocess.CompletedProcess:
    """Start `cmd`, send `how` once it has logged `rows` rows, and wait for it to end."""
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 120
    while sum(line.startswith("iteration") for line in lines) < rows:
        line = process.stderr.readline()
        if not line or time.monotonic() > deadline:
            break
        lines.append(line)
    process.send_signal(how)
    _, remaining = process.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, process.returncode, "", "".join(lines) + remaining)


def assert_same_run(resumed: Path, reference: Path, rtol: float = 0.0) -> None:
    """Every dataset equal (NaNs included), except timings and layout-dependent bytes."""
    a, b = read_datasets(resumed), read_datasets(reference)
    assert a.keys() == b.keys()
    for name in a:
        if name in VARYING:
            continue
        if rtol:
            scale = np.nanmax(np.abs(b[name])) if b[name].size else 1.0
            np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=rtol * scale, err_msg=name)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, in process order (local backend)."""
    out = tmp_path_factory.mktemp("reference") / "reference.h5"
    result = subprocess.run(command(out), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


def test_sigterm_checkpoints_and_the_same_command_resumes_exactly(tmp_path, reference) -> None:
    rows = int(np.random.default_rng().integers(2, 25))  # a random point of the run
    out = tmp_path / "run.h5"
    stopped = interrupt(command(out), rows, signal.SIGTERM)
    assert stopped.returncode == 75, (rows, stopped.stderr)
    assert "run the same command again to resume" in stopped.stderr
    assert not out.exists() and Path(f"{out}.ckpt").exists()
    resumed = subprocess.run(command(out), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert not Path(f"{out}.ckpt").exists(), "a finished run keeps no checkpoint"
    assert_same_run(out, reference)
    with h5py.File(out) as f:
        assert f.attrs["complete"] and len(f.attrs["resumed_at_row"]) == 1


def test_sigkill_resumes_from_the_periodic_checkpoint(tmp_path, reference) -> None:
    out = tmp_path / "run.h5"
    # Rows reach the file at every row, checkpoints every 40 iterations: the killed run has
    # rows past its last checkpoint, which the resumed run must replace, not duplicate.
    periodic = ("checkpoint.every_iterations=40", "output.flush_every=1")
    killed = interrupt(command(out, *periodic), 15, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    with h5py.File(f"{out}.ckpt") as f:
        checkpoint_rows = int(f.attrs["rows"])
    with h5py.File(f"{out}.partial", "r", swmr=True) as f:
        assert f["time/iteration"].shape[0] > checkpoint_rows
    resumed = subprocess.run(command(out, *periodic) + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference)


def test_a_run_stopped_on_2_ranks_resumes_on_3(tmp_path, reference) -> None:
    out = tmp_path / "run.h5"
    stopped = interrupt(command(out, "runtime.dtype=float64", ranks=2), 8, signal.SIGTERM)
    assert stopped.returncode == 75, stopped.stderr
    resumed = subprocess.run(
        command(out, "runtime.dtype=float64", ranks=3), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    local = tmp_path / "local.h5"
    result = subprocess.run(command(local, "runtime.dtype=float64"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Other layouts sum in another order: equal to float64 rounding.
    assert_same_run(out, local, rtol=1e-10)
    with h5py.File(out) as f:
        assert list(f.attrs["agent_counts_per_rank"]) == [3, 2, 2]


@pytest.fixture
def stopped_run(tmp_path) -> Path:
    out = tmp_path / "run.h5"
    stopped = interrupt(command(out), 3, signal.SIGTERM)
    assert stopped.returncode == 75, stopped.stderr
    return out


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dmeta: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_checkpoint_of_another_config_is_refused(stopped_run) -> None:
    result = subprocess.run(
        command(stopped_run, "optimizer.lr=0.002"), capture_output=True, text=True
    )
    assert "differs in optimizer.lr" in one_error_line(result)
    result = subprocess.run(command(stopped_run, "agents=9"), capture_output=True, text=True)
    assert "holds 7 agents but the config has 9" in one_error_line(result)
    # Where the run executes is free to change.
    allowed = subprocess.run(
        command(stopped_run, "runtime.threads=1", "output.flush_every=3"),
        capture_output=True,
        text=True,
    )
    assert allowed.returncode == 0, allowed.stderr


def test_a_corrupt_checkpoint_is_refused_and_restart_starts_over(stopped_run) -> None:
    checkpoint = Path(f"{stopped_run}.ckpt")
    checkpoint.write_bytes(b"not an HDF5 file")
    result = subprocess.run(command(stopped_run), capture_output=True, text=True)
    line = one_error_line(result)
    assert "is corrupt" in line and "--restart" in line
    restarted = subprocess.run(command(stopped_run) + ["--restart"], capture_output=True, text=True)
    assert restarted.returncode == 0, restarted.stderr
    assert not checkpoint.exists()


def test_resume_without_a_checkpoint_is_an_error(tmp_path) -> None:
    result = subprocess.run(
        command(tmp_path / "r.h5") + ["--resume"], capture_output=True, text=True
    )
    assert "there is no checkpoint" in one_error_line(result)


def test_in_process_stop_and_clock_checkpoints(tmp_path) -> None:
    from conftest import run_local, small_config

    from dmeta.engine import execute
    from dmeta.runner import plan_run

    config = small_config(
        "iterations=40", "checkpoint.poll_every=3", "checkpoint.every_minutes=1e-9"
    )
    plan = plan_run(config, 1, 0, 0, 1)
    out = tmp_path / "run.h5"
    # Stop when asked at the first poll that sees the request: iteration 6.
    asked = iter([False, True])
    stopped = execute(plan, None, out, show_progress=False, stop_requested=lambda: next(asked))
    assert stopped == 6
    with h5py.File(f"{out}.ckpt") as f:
        assert f.attrs["iteration"] == 6
    assert execute(plan, None, out, show_progress=False, resume=True) is None
    run_local(config, tmp_path / "reference.h5")
    assert_same_run(out, tmp_path / "reference.h5")
