"""dmeta against the official Dif-MAML code at that code's own setting, side by side in one run.

    python benchmarks/official.py [--tensorflow PYTHON --checkout DIR] [--iterations 300]
                                  [--repeats 3] [--threads 1] [--no-compile] [--set KEY=VALUE]

The official code is the paper's TensorFlow implementation (DIR: a clone of
github.com/mertkayaalp/Diffusion-Multi-Agent-Meta-Learning), its sine regression run by
benchmarks/peer_official.py in PYTHON, a Python with tensorflow-cpu, tf_keras, networkx and
matplotlib. dmeta runs `dmeta run jobs/sine_diffusion.toml` at that setting: 6 agents on the
script's graph (jobs/graphs/dif_maml_regression.txt, averaging weights), one task of 10 support
and 10 query shots per agent and iteration, the 1-40-40-1 ReLU network, float64, ATC with Adam;
eager, and compiled (`runtime.compile=true`). dmeta's time per iteration is rank 0's
/time/compute + /time/comm over iterations 2..N from its run file (the first iteration, with
any compilation, has its own row and is left out): the whole round, task draws included. The
official loop gets its tasks drawn beforehand. The runs are interleaved, `--repeats` times; the
table shows min / median / max ms per agent-task (an iteration's time over 6 agents x 1 task) and
dmeta's speed-up by medians. Without --tensorflow only dmeta's rows are timed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import h5py
from common import command_line, dmeta_run, machine, print_speedups

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "sine_diffusion.toml"
GRAPH = ROOT / "jobs" / "graphs" / "dif_maml_regression.txt"
WORKER = Path(__file__).with_name("peer_official.py")
AGENTS, TASKS = 6, 1


def dmeta_seconds(compiled: bool, args: argparse.Namespace, out: Path) -> float:
    """Seconds per iteration of one dmeta run at the official setting (iterations 2..N)."""
    settings = [
        f"agents={AGENTS}",
        "graph.topology=edge_list",
        f"graph.edge_list_path={GRAPH}",
        "graph.rule=averaging",
        f"learner.tasks_per_agent={TASKS}",
        "task.support_shots=10",
        "task.query_shots=10",
        "runtime.dtype=float64",
        "runtime.device=cpu",
        f"runtime.threads={args.threads}",
        f"runtime.compile={str(compiled).lower()}",
        f"iterations={args.iterations}",
        f"log_every={args.iterations}",
        "log_every_iteration_until=1",
        "validation.tasks=2",
        "validation.stationarity_tasks=2",
        *args.set,
    ]
    dmeta_run("official", JOB, out, settings)
    with h5py.File(out) as run:
        spent = float(run["time/compute"][-1] + run["time/comm"][-1])
    out.unlink()
    return spent / (args.iterations - 1)


def official_seconds(args: argparse.Namespace) -> float:
    """Seconds per iteration of the official code's training loop (peer_official.py)."""
    few = max(2, args.iterations // 10)
    command = [
        args.tensorflow, str(WORKER), str(args.checkout),
        "--iterations", str(few), str(few + args.iterations), "--threads", str(args.threads),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"official.py: {' '.join(command)} failed:\n{result.stderr.strip()}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["seconds_per_iteration"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensorflow", metavar="PYTHON", help="a Python with TensorFlow")
    parser.add_argument("--checkout", type=Path, metavar="DIR", help="the official code")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="threads of each")
    parser.add_argument("--no-compile", action="store_true", help="skip dmeta's compiled row")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="dmeta config overrides"
    )
    args = parser.parse_args(argv)
    if (args.tensorflow is None) != (args.checkout is None):
        raise SystemExit("official.py: give --tensorflow and --checkout together")
    if args.checkout and not (args.checkout / "Regression" / "train_sine_model.py").is_file():
        raise SystemExit(f"official.py: {args.checkout} holds no Regression/train_sine_model.py")
    print(f"# official: {machine()}")
    print(command_line(__file__, argv))
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run.h5"
        timers: dict[str, Callable[[], float]] = {}
        if args.tensorflow:
            timers["official code (TensorFlow, eager)"] = lambda: official_seconds(args)
        timers["dmeta eager"] = lambda: dmeta_seconds(False, args, out)
        if not args.no_compile:
            timers["dmeta compiled"] = lambda: dmeta_seconds(True, args, out)
        for _ in range(args.repeats):
            for name, timer in timers.items():
                samples.setdefault(name, []).append(timer())
    print_speedups(samples, 1e3 / (AGENTS * TASKS), digits=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
