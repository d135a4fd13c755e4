"""The run file writer: round trip, buffering, and what a killed run leaves behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SMALL

from dmeta.exchange import AgentLayout, LocalExchange
from dmeta.output import SERIES, RowSchema, open_writer

PER_AGENT, SCALAR = RowSchema().per_agent, RowSchema().scalar

BIN = Path(sys.executable).parent
JOB = Path(__file__).parent.parent / "jobs" / "sine_quick.toml"


def synthetic_rows(num_rows: int, num_agents: int) -> list[tuple[int, dict, dict]]:
    """Rows whose every value says where it belongs: series, row and agent."""
    rows = []
    for row in range(num_rows):
        scalars = {name: 1000.0 * i + row for i, name in enumerate(SCALAR)}
        agents = {
            name: 1000.0 * i + row + np.arange(num_agents) / 100 for i, name in enumerate(PER_AGENT)
        }
        rows.append((10 * row, scalars, agents))
    return rows


def test_serial_writer_round_trips_rows_arrays_and_attributes(tmp_path) -> None:
    num_agents, num_rows = 5, 7
    path = tmp_path / "run.h5"
    writer = open_writer(
        "serial",
        path,
        None,
        LocalExchange(num_agents),
        AgentLayout(num_agents, 1),
        {"seed": 3},
        flush_every=3,
    )
    rows = synthetic_rows(num_rows, num_agents)
    for iteration, scalars, agents in rows:
        writer.append(iteration, scalars, agents)
    matrix = np.eye(num_agents)
    writer.write_global("topology/weights", matrix)
    writer.set_attributes("topology", lambda2=0.5)
    writer.write_agents("params/final", np.arange(num_agents * 2.0).reshape(num_agents, 2))
    assert not path.exists() and path.with_name("run.h5.partial").exists()
    writer.finish()
    assert not path.with_name("run.h5.partial").exists()
    with h5py.File(path) as f:
        assert f.attrs["complete"] and f.attrs["seed"] == 3
        np.testing.assert_array_equal(f["time/iteration"][:], [10 * r for r in range(num_rows)])
        for i, name in enumerate(SCALAR):
            np.testing.assert_array_equal(f[name][:], 1000.0 * i + np.arange(num_rows))
        for i, name in enumerate(PER_AGENT):
            expected = 1000.0 * i + np.arange(num_rows)[:, None] + np.arange(num_agents) / 100
            np.testing.assert_array_equal(f[name][:], expected)
        for name in SERIES:
            assert f[name].dims[0][0] == f["time/iteration"]
            assert f[name].attrs["units"] and f[name].attrs["description"]
        np.testing.assert_array_equal(f["topology/weights"][:], matrix)
        assert f["topology"].attrs["lambda2"] == 0.5
        assert f["params/final"].shape == (num_agents, 2)


def test_rows_stay_in_memory_until_a_flush(tmp_path) -> None:
    path = tmp_path / "run.h5"
    writer = open_writer(
        "serial", path, None, LocalExchange(2), AgentLayout(2, 1), {}, flush_every=4
    )
    for iteration, scalars, agents in synthetic_rows(6, 2):
        writer.append(iteration, scalars, agents)
    assert writer.rows == 4 and len(writer.buffer) == 2
    assert writer.file["metrics/val_loss"].shape == (4, 2)
    writer.finish()
    with h5py.File(path) as f:
        assert f["metrics/val_loss"].shape == (6, 2)


def test_a_row_missing_a_series_is_refused(tmp_path) -> None:
    writer = open_writer(
        "serial", tmp_path / "r.h5", None, LocalExchange(2), AgentLayout(2, 1), {}, 2
    )
    iteration, scalars, agents = synthetic_rows(1, 2)[0]
    del agents["metrics/val_loss"]
    with pytest.raises(ValueError, match="metrics/val_loss"):
        writer.append(iteration, scalars, agents)
    writer.abandon()


def test_a_run_killed_with_sigkill_leaves_a_readable_file_up_to_the_last_flush(tmp_path) -> None:
    out = tmp_path / "killed.h5"
    overrides = [item for o in SMALL for item in ("--set", o)]
    flush_every = 4
    process = subprocess.Popen(
        [
            str(BIN / "dmeta"),
            "run",
            str(JOB),
            *overrides,
            "--set",
            "iterations=100000",
            "--set",
            "runtime.compile=false",  # a long run, stopped early: not worth compiling
            "--set",
            "log_every=1",
            "--set",
            f"output.flush_every={flush_every}",
            "--out",
            str(out),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Progress lines come one per logged row; after 11 of them, two flushes are on disk.
        deadline = time.monotonic() + 120
        logged = 0
        while logged < 11 and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            logged += line.startswith("iteration")
        assert logged == 11, "the run did not log 11 rows"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    # A killed writer leaves the file marked as open for writing: SWMR readers still open it.
    with h5py.File(out.with_name("killed.h5.partial"), "r", swmr=True) as f:
        assert not f.attrs["complete"]
        lengths = {name: f[name].shape[0] for name in [*SERIES, "time/iteration"]}
        rows = lengths["time/iteration"]
        assert set(lengths.values()) == {rows}, lengths
        assert rows >= 8 and rows % flush_every == 0
        np.testing.assert_array_equal(f["time/iteration"][:], np.arange(rows))
        assert np.isfinite(f["metrics/val_loss"][:]).all()
