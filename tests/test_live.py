"""Reading a run while it runs (SWMR), `dmeta status`, and the pandas frames of `load_run`."""

from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SMALL, read_datasets

from dmeta import swmr
from dmeta.exchange import AgentLayout, LocalExchange
from dmeta.output import RowSchema, open_writer
from dmeta.runfile import RunFileError, load_run, read_status, status_lines

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "sine_quick.toml"
SETTINGS = [*SMALL, "iterations=150", "log_every=5", "output.flush_every=1"]
TIMINGS = ("time/wall", "time/compute", "time/comm", "time/log")
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
needs_pandas = pytest.mark.skipif(
    importlib.util.find_spec("pandas") is None,
    reason="pandas is not installed (pip install -e '.[test]' or 'dmeta[analysis]')",
)


def python(*args: str) -> subprocess.CompletedProcess:
    """This interpreter on `args`, PYTHONPATH inherited, output captured."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def run_command(out: Path) -> list[str]:
    settings = [item for setting in SETTINGS for item in ("--set", setting)]
    return [sys.executable, "-m", "dmeta.cli", "run", str(JOB), *settings, "--out", str(out)]


def wait_for_rows(partial: Path, rows: int, process: subprocess.Popen) -> None:
    """Poll the running file (SWMR) until it holds `rows` rows."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if partial.exists():
            try:
                with swmr.open_for_reading(partial) as file:
                    if file["time/iteration"].shape[0] >= rows:
                        return
            except (OSError, KeyError):
                pass  # not created yet, or still outside SWMR mode (the header)
        time.sleep(0.2)
    raise AssertionError(f"the run did not write {rows} rows: {process.poll()}")


def read_while_paused(out: Path, partial: Path) -> None:
    """What a user reads while the run is going (it is paused): h5py, status, an analysis."""
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(partial, "r")  # without swmr=True, HDF5 refuses a file being written
    with h5py.File(partial, "r", swmr=True) as file:
        assert not file.attrs["complete"] and file["metrics/val_loss"].shape[0] >= 3
    status = python("-m", "dmeta.cli", "status", str(out))
    assert status.returncode == 0, status.stderr
    assert "state     running" in status.stdout and "progress  iteration" in status.stdout
    assert " / 150 " in status.stdout and "it/s, about" in status.stdout
    figure = partial.with_name("live.png")
    fig1b = python(
        str(ROOT / "analysis" / "fig1b.py"), str(partial), "--allow-partial", "--out", str(figure)
    )
    assert fig1b.returncode == 0 and figure.exists(), fig1b.stderr


def test_a_running_file_is_read_and_the_finished_file_equals_an_unread_run(tmp_path) -> None:
    reference = tmp_path / "reference.h5"
    unread = subprocess.run(run_command(reference), capture_output=True, text=True, timeout=300)
    assert unread.returncode == 0, unread.stderr
    out = tmp_path / "live.h5"
    partial = out.with_name("live.h5.partial")
    process = subprocess.Popen(run_command(out), stderr=subprocess.PIPE, text=True)
    try:
        wait_for_rows(partial, 3, process)
        process.send_signal(signal.SIGSTOP)  # the run stays open mid-way while we read
        try:
            read_while_paused(out, partial)
        finally:
            process.send_signal(signal.SIGCONT)
        # A reader that stays open sees new rows, and does not stop the run from finishing.
        with h5py.File(partial, "r", swmr=True) as held:
            rows = held["time/iteration"].shape[0]
            while process.poll() is None and held["time/iteration"].shape[0] == rows:
                time.sleep(0.1)
                held["time/iteration"].refresh()
            _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert not partial.exists()
    live, never = read_datasets(out), read_datasets(reference)
    assert live.keys() == never.keys()
    for name in set(live) - set(TIMINGS):
        np.testing.assert_array_equal(live[name], never[name], err_msg=name)
    with h5py.File(out, "r") as file:
        assert file.attrs["complete"] and swmr.superblock(out) == (3, 0)
        assert ISO_UTC.match(file.attrs["started_at"]) and ISO_UTC.match(file.attrs["finished_at"])
        assert f"run {JOB}" in file.attrs["command_line"] and file.attrs["world_size"] == 1
    status = python("-m", "dmeta.cli", "status", str(out))
    assert "state     complete, finished" in status.stdout and "/ 150 (100%)" in status.stdout


def test_a_killed_writer_leaves_a_file_that_swmr_reads_and_recover_reopens(tmp_path) -> None:
    path = tmp_path / "killed.h5"
    script = (
        "import os, sys, h5py\n"
        "f = h5py.File(sys.argv[1], 'w', libver=('v110', 'latest'))\n"
        "d = f.create_dataset('x', (0,), maxshape=(None,), chunks=(4,), dtype='f8')\n"
        "f.swmr_mode = True\n"
        "for i in range(50):\n"
        "    d.resize(i + 1, axis=0); d[i] = i; d.flush()\n"
        "os._exit(0)\n"  # no close: the superblock stays marked as being written
    )
    assert python("-c", script, str(path)).returncode == 0
    assert swmr.superblock(path)[1] != 0
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "a")
    with swmr.open_for_reading(path) as file:
        np.testing.assert_array_equal(file["x"][:], np.arange(50.0))
    swmr.recover(path)
    assert swmr.superblock(path) == (3, 0)
    with h5py.File(path, "a") as file:
        file["x"].resize(60, axis=0)
        file["x"][50:] = -1
    with h5py.File(path, "r") as file:
        np.testing.assert_array_equal(file["x"][:50], np.arange(50.0))


def test_lookup3_matches_bob_jenkins_test_vectors() -> None:
    assert swmr.lookup3(b"") == 0xDEADBEEF
    assert swmr.lookup3(b"Four score and seven years ago") == 0x17770551
    assert swmr.lookup3(b"Four score and seven years ago", 1) == 0xCD628161


def synthetic_run(
    path: Path, rows: int, agents: int = 3, finish: bool = True, live: bool = True
) -> None:
    """A run file from the serial writer whose values say where they belong."""
    schema = RowSchema()
    attributes = {"config": '{"agents": 3, "iterations": 40, "strategy": "atc"}', "seed": 1}
    writer = open_writer(
        "serial", path, None, LocalExchange(agents), AgentLayout(agents, 1),
        {**attributes, "strategy": "atc", "started_at": "2026-01-01T00:00:00Z"}, 2, schema,
    )  # fmt: skip
    if live:
        writer.live()
    for row in range(rows):
        scalars = {name: 100.0 * i + row for i, name in enumerate(schema.scalar)}
        per_agent = {
            name: 100.0 * i + row + np.arange(agents) / 10
            for i, name in enumerate(schema.per_agent)
        }
        writer.append(10 * row, scalars, per_agent)
    if finish:
        writer.write_agents("params/final", np.zeros((agents, 2)))
        writer.finish()
    else:
        writer.close()


@needs_pandas
def test_load_run_gives_tidy_frames_and_the_config(tmp_path) -> None:
    path = tmp_path / "run.h5"
    synthetic_run(path, rows=5)
    run = load_run(path)
    schema = RowSchema()
    assert run.complete and run.config["agents"] == 3 and run.attributes["seed"] == 1
    assert list(run.agents.columns) == ["iteration", "agent", *sorted(schema.per_agent)]
    assert list(run.scalars.columns) == ["iteration", *sorted(schema.scalar)]
    assert len(run.agents) == 5 * 3 and len(run.scalars) == 5
    row = run.agents[(run.agents.iteration == 30) & (run.agents.agent == 2)].iloc[0]
    assert row["metrics/val_loss"] == 100.0 * schema.per_agent.index("metrics/val_loss") + 3.2
    merged = run.agents.merge(run.scalars, on="iteration")
    assert len(merged) == 15 and "centroid/val_loss" in merged


@needs_pandas
def test_load_run_reads_an_unfinished_run_by_its_final_name(tmp_path) -> None:
    path = tmp_path / "run.h5"
    synthetic_run(path, rows=4, finish=False)
    run = load_run(path)
    assert not run.complete and len(run.scalars) == 4


def test_load_run_without_pandas_says_how_to_install_it(tmp_path, monkeypatch) -> None:
    path = tmp_path / "run.h5"
    synthetic_run(path, rows=2)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'dmeta\[analysis\]'"):
        load_run(path)


def test_status_of_complete_stopped_and_failed_runs(tmp_path) -> None:
    path = tmp_path / "run.h5"
    synthetic_run(path, rows=5)
    lines = status_lines(read_status(path))
    assert lines[1].startswith("state     complete, finished 20")
    assert "iteration 40 / 40 (100%), 5 rows" in "\n".join(lines)
    unfinished = tmp_path / "stopped.h5"
    synthetic_run(unfinished, rows=3, finish=False)
    assert read_status(unfinished).state == "failed"
    with h5py.File(tmp_path / "stopped.h5.ckpt", "w") as checkpoint:
        checkpoint.attrs["iteration"] = 20
    status = read_status(unfinished)
    assert status.state == "stopped" and "stopped at iteration 20" in status_lines(status)[1]
    assert status.attributes["started_at"] == "2026-01-01T00:00:00Z"


def test_status_of_a_running_file_without_rows(tmp_path) -> None:
    path = tmp_path / "run.h5"
    synthetic_run(path, rows=0, finish=False, live=True)
    status = read_status(path)
    assert status.segments() == [slice(0, 0)] and status.flush_interval() is None
    lines = status_lines(status)
    assert lines[-1].startswith("progress  no rows written yet")


def test_status_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(RunFileError, match="no such file"):
        read_status(tmp_path / "missing.h5")
    (tmp_path / "bad.h5").write_text("not HDF5")
    with pytest.raises(RunFileError, match="not an HDF5 file or corrupt"):
        read_status(tmp_path / "bad.h5")
    result = python("-m", "dmeta.cli", "status", str(tmp_path / "missing.h5"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("dmeta: error: ")


def test_status_imports_neither_torch_nor_mpi(tmp_path) -> None:
    path = tmp_path / "run.h5"
    synthetic_run(path, rows=2)
    check = (
        "import sys\nfrom dmeta.cli import main\nassert main(['status', sys.argv[1]]) == 0\n"
        "assert not {'torch', 'mpi4py'} & set(sys.modules), sorted(sys.modules)\n"
    )
    result = python("-c", check, str(path))
    assert result.returncode == 0, result.stderr


def test_a_resumed_run_keeps_its_start_time(tmp_path) -> None:
    path = tmp_path / "run.h5"
    synthetic_run(path, rows=4, finish=False)
    writer = open_writer(
        "serial", path, None, LocalExchange(3), AgentLayout(3, 1),
        {"started_at": "2027-01-01T00:00:00Z", "command_line": "again"}, 2, resume_rows=4,
    )  # fmt: skip
    writer.close()
    with h5py.File(f"{path}.partial", "r") as file:
        assert file.attrs["started_at"] == "2026-01-01T00:00:00Z"
        assert file.attrs["command_line"] == "again"


def test_a_resumed_file_of_a_format_without_swmr_stays_out_of_swmr_mode(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    with monkeypatch.context() as patch:
        patch.setattr(swmr, "LIBVER", ("earliest", "latest"))  # as the parallel writer's files
        synthetic_run(path, rows=4, finish=False, live=False)
    writer = open_writer(
        "serial", path, None, LocalExchange(3), AgentLayout(3, 1), {}, 2, resume_rows=4
    )
    writer.live()
    assert not writer.file.swmr_mode
    writer.write_agents("params/final", np.zeros((3, 2)))
    writer.finish()
    with h5py.File(path, "r") as file:
        assert file.attrs["complete"] and swmr.superblock(path)[0] < 3
