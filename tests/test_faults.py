"""An exception or a killed process on one rank mid-run ends the whole MPI job, with no hang."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import SMALL

BIN = Path(sys.executable).parent
JOB = Path(__file__).parent.parent / "jobs" / "sine_quick.toml"

# Rank 1 fails while drawing the tasks of iteration 5; rank 0 is then waiting in a collective.
FAILING_RUN = """
import os
import signal
import sys
from mpi4py import MPI
from dmeta import cli, tasks

original = tasks.SineTask.sample
MODE = sys.argv.pop(1)

def sample(self, agents, iteration, *args, **kwargs):
    if MPI.COMM_WORLD.Get_rank() == 1 and iteration == 5:
        if MODE == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected failure on rank 1 at iteration 5")
    return original(self, agents, iteration, *args, **kwargs)

tasks.SineTask.sample = sample
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_a_failure_on_one_rank_ends_the_job_within_seconds(tmp_path, mode) -> None:
    script = tmp_path / "failing_run.py"
    script.write_text(textwrap.dedent(FAILING_RUN))
    out = tmp_path / "run.h5"
    overrides = [item for o in SMALL for item in ("--set", o)]
    began = time.monotonic()
    result = subprocess.run(
        [
            str(BIN / "mpiexec"),
            "-n",
            "2",
            sys.executable,
            str(script),
            mode,
            "run",
            str(JOB),
            *overrides,
            "--set",
            "iterations=50",
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert time.monotonic() - began < 60, "the job outlived its failed rank"
    if mode == "raise":
        assert "injected failure on rank 1 at iteration 5" in result.stderr
    assert not out.exists()
