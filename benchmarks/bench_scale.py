"""Scale: planning, set-up, iteration time and peak memory from 10^3 to 10^5 agents on one rank.

    python benchmarks/bench_scale.py [--agents 1000 10000 100000] [--iterations 20]
                                     [--problem linrep] [--topology ring] [--device cpu]

Each K runs in a fresh process (so peak memory is its own), in-process on one rank:
- `linrep`: the linear-representation task in population mode (exact losses, no samples;
  dim 20, rank 3, fresh heads) with MAML and SGD, Dif-MAML ATC on the graph;
- `sine`: the sine experiment of jobs/sine_diffusion.toml (5 tasks of 10 shots per agent).
Columns: `plan s` is `plan_run` (graph, weights, their checks and lambda_2); `set-up s` is from
the start of planning until the run file is open (plan, task, model, launch models, the fixed
evaluation tasks, the file's header); `row s` is one logged row's evaluation (every agent adapts
to the 20 validation tasks, and the centroid's meta-gradients on 10 stationarity tasks per
agent: it grows with `validation.tasks`); `ms/it` is the mean of iterations 2..N; `peak MB`
the process's peak resident set, and `growth` its growth over the previous K divided by the
agents added (memory growing with K times the degree gives a flat column; K^2 memory would
grow K-fold); on a GPU, `GPU peak MB` is torch's peak allocation.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, machine, print_table

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = {
    "linrep": [
        "problem=linear_representation",
        "linear.mode=population",
        "optimizer.name=sgd",
        "optimizer.lr=0.05",
        "learner.tasks_per_agent=5",
        "validation.tasks=20",
        "validation.stationarity_tasks=10",
    ],
    "sine": ["validation.tasks=20", "validation.stationarity_tasks=10"],
}


def single(
    problem: str, agents: int, iterations: int, topology: str, device: str, extra: list[str]
) -> dict[str, float]:
    """Plan, set up and run K agents in this process (the child's side)."""
    started = time.perf_counter()
    import torch

    from dmeta.algorithms.base import synchronize
    from dmeta.config import load_config
    from dmeta.engine import Engine, Progress, build_exchange
    from dmeta.runner import plan_run

    config = load_config(
        ROOT / "jobs" / "sine_diffusion.toml",
        [
            *PROBLEMS[problem],
            f"agents={agents}",
            f"iterations={iterations}",
            f"log_every={iterations}",
            f"graph.topology={topology}",
            "graph.rule=metropolis",
            "runtime.threads=0",
            f"runtime.device={device}",
            *extra,
        ],
    )
    begin = time.perf_counter()
    plan = plan_run(config, 1, 0, 0, 1)
    planned = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        exchange = build_exchange(plan, None)
        engine = Engine(plan, exchange, Path(folder) / "scale.h5")
        engine.open(None, None)
        opened = time.perf_counter()
        engine.log_row(0, Progress(iterations, enabled=False))
        ready = time.perf_counter()
        engine.algorithm.round(1)
        synchronize(plan.device)
        second = time.perf_counter()
        for t in range(2, iterations + 1):
            engine.algorithm.round(t)
        synchronize(plan.device)  # host clocks must time the GPU's queued work too
        done = time.perf_counter()
        engine.writer.abandon()
    cuda = plan.device.type == "cuda"
    return {
        "import_s": begin - started,
        "plan_s": planned - begin,
        "setup_s": opened - begin,
        "row_s": ready - opened,
        "ms_per_iteration": 1e3 * (done - second) / (iterations - 1),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpu_peak_mb": torch.cuda.max_memory_allocated(plan.device) / 2**20 if cuda else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--problem", choices=sorted(PROBLEMS), default="linrep")
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--device", default="cpu", help="runtime.device (default cpu)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = single(
            args.problem, args.agents[0], args.iterations, args.topology, args.device, args.set
        )
        print(json.dumps(result))
        return 0
    print(f"# bench_scale: {machine()}")
    print(command_line(__file__, argv))
    rows, previous = [], None
    for agents in args.agents:
        command = [sys.executable, __file__, "--child", "--agents", str(agents)]
        command += ["--iterations", str(args.iterations), "--problem", args.problem]
        command += ["--topology", args.topology, "--device", args.device]
        command += [item for override in args.set for item in ("--set", override)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        growth = "-"
        if previous is not None:
            added = agents - previous[0]
            growth = f"{(result['peak_mb'] - previous[1]) / added * 1024:.2f} KB"
        previous = (agents, result["peak_mb"])
        rows.append(
            [
                str(agents),
                f"{result['plan_s']:.2f}",
                f"{result['setup_s']:.2f}",
                f"{result['row_s']:.2f}",
                f"{result['ms_per_iteration']:.1f}",
                f"{result['peak_mb']:.0f}",
                growth,
                f"{result['gpu_peak_mb']:.0f}" if args.device != "cpu" else "-",
            ]
        )
    header = ["agents", "plan s", "set-up s", "row s", "ms/it", "peak MB", "growth per added agent"]
    header.append("GPU peak MB")
    print_table(header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
