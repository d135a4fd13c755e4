"""An exception on one rank in the middle of a run ends the whole MPI job, with no hang."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import SMALL

BIN = Path(sys.executable).parent
JOB = Path(__file__).parent.parent / "jobs" / "sine_quick.toml"

# Rank 1 fails while drawing the tasks of iteration 5; rank 0 is then waiting in a collective.
FAILING_RUN = """
import sys
from mpi4py import MPI
from dmeta import cli, tasks

original = tasks.SineTask.sample

def sample(self, agents, iteration, *args, **kwargs):
    if MPI.COMM_WORLD.Get_rank() == 1 and iteration == 5:
        raise RuntimeError("injected failure on rank 1 at iteration 5")
    return original(self, agents, iteration, *args, **kwargs)

tasks.SineTask.sample = sample
sys.exit(cli.main(sys.argv[1:]))
"""


def test_exception_on_one_rank_aborts_the_job(tmp_path) -> None:
    script = tmp_path / "failing_run.py"
    script.write_text(textwrap.dedent(FAILING_RUN))
    out = tmp_path / "run.h5"
    overrides = [item for o in SMALL for item in ("--set", o)]
    result = subprocess.run(
        [
            str(BIN / "mpiexec"),
            "-n",
            "2",
            sys.executable,
            str(script),
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
    assert "injected failure on rank 1 at iteration 5" in result.stderr
    assert not out.exists()
