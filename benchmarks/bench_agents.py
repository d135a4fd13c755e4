"""Scaling with agents per rank: time per iteration per agent and peak memory per agent.

    python benchmarks/bench_agents.py [--agents 10 40 160 640 2560] [--iterations N]
                                      [--topology ring] [--device auto] [--set KEY=VALUE]

Each K runs in a fresh process (so peak memory is its own): the sine experiment of
jobs/sine_diffusion.toml (5 tasks of 10 shots per agent, second-order MAML, Dif-MAML ATC) with
K agents on one rank, in-process, on the given graph. Time per iteration is the run file's
/time/compute + /time/comm over iterations 5..N (logged rows excluded): the first four have
rows of their own, as they hold one-off work (a compilation; on a GPU the two eager rounds and
the capture of a CUDA graph, `runtime.cuda_graph`). Peak memory per agent is,
on the CPU, the growth of the process's peak resident set from just after torch and dmeta are
imported (so it counts the task, the model, the logged rows' evaluation and the iterations,
not the interpreter or torch itself) divided by K; on CUDA, torch's peak allocation divided by K.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import command_line, machine, print_table

JOB = Path(__file__).resolve().parents[1] / "jobs" / "sine_diffusion.toml"
# Iterations not timed: a compilation (the first), a CUDA graph's warm-up and capture (1-3).
WARMUP = 4


def single(
    agents: int, iterations: int, topology: str, device: str, extra: list[str]
) -> dict[str, float]:
    """Run K agents once in this process and measure it (the child's side)."""
    import h5py
    import torch

    from dmeta.config import load_config
    from dmeta.engine import execute
    from dmeta.runner import plan_run

    config = load_config(
        JOB,
        [
            f"agents={agents}",
            f"iterations={iterations}",
            f"log_every={iterations}",
            f"log_every_iteration_until={WARMUP}",  # one-off work: rows of its own
            f"graph.topology={topology}",
            f"runtime.device={device}",
            # The logged rows are not timed; keep their evaluation small.
            "validation.tasks=2",
            "validation.stationarity_tasks=2",
            "runtime.compile=false",
            *extra,
        ],
    )
    plan = plan_run(config, 1, 0, 0, 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if plan.device.type == "cuda":
        torch.cuda.init()  # the peak statistics of a device exist only once CUDA is up
        torch.cuda.reset_peak_memory_stats(plan.device)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.h5"
        execute(plan, None, path, show_progress=False)
        with h5py.File(path) as run:
            # The last row covers iterations WARMUP + 1..N.
            last = float(run["time/compute"][-1] + run["time/comm"][-1])
            seconds = last / (iterations - WARMUP)
    if plan.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(plan.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"seconds": seconds, "peak_bytes": float(peak), "device": str(plan.device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[10, 40, 160, 640, 2560])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--topology", default="ring", help="graph.topology (default ring)")
    parser.add_argument("--device", default="auto", help="runtime.device (default auto)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iterations <= WARMUP:
        parser.error(f"--iterations must exceed {WARMUP} (the first {WARMUP} are not timed)")
    if args.single:
        result = single(args.single, args.iterations, args.topology, args.device, args.set)
        print(json.dumps(result))
        return 0
    print(f"# bench_agents: {machine()}")
    print(command_line(__file__, argv))
    rows = []
    for agents in args.agents:
        command = [
            sys.executable,
            __file__,
            "--single",
            str(agents),
            "--iterations",
            str(args.iterations),
            "--topology",
            args.topology,
            "--device",
            args.device,
            *(item for override in args.set for item in ("--set", override)),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode:
            print(result.stderr, file=sys.stderr)
            return 1
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        per_agent = measured["seconds"] / agents
        rows.append(
            [
                str(agents),
                measured["device"],
                f"{1e3 * measured['seconds']:.2f}",
                f"{1e6 * per_agent:.1f}",
                f"{measured['peak_bytes'] / agents / 1024:.1f}",
            ]
        )
    print_table(
        ["agents", "device", "ms / iteration", "us / iteration / agent", "peak KiB / agent"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
