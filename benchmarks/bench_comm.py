"""Communication: time per combination step, bytes sent, and the share of an iteration.

    python benchmarks/bench_comm.py [--ranks 2 4 8] [--sizes 1761 100000 1000000]
                                    [--agents-per-rank 2] [--repeats 20]

For each number of ranks P the script starts `mpiexec -n P` on itself. With K = P x
agents-per-rank agents in blocks over the ranks, it times the combination step of the MPI
neighbour backend (ring, 2-D grid and exponential graphs, Metropolis weights) and of the
all-reduce backend on models of each size (float32 rows; 1761 is the sine network). A step's
time is the slowest rank's mean over `repeats` calls. Bytes per agent are what dmeta sends to
other ranks per combination (each agent's row once to every other rank where an agent listens
to it), next to the agent's degree x model size, and its neighbours on other ranks x model
size (what sending one copy per cross-rank edge would cost). The last table runs the 40-agent
sine experiment under each backend and reports the share of an iteration's time spent in the
combination step (/time/comm).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, machine, print_table

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = ("ring", "grid", "exponential")


def child(sizes: list[int], agents_per_rank: int, repeats: int, iterations: int) -> None:
    """Under mpiexec: measure, and print one JSON line of rows on rank 0."""
    import h5py
    import numpy as np
    import torch
    from mpi4py import MPI

    from dmeta import topology
    from dmeta.algorithms.diffusion import matrix_edges
    from dmeta.config import GraphConfig, load_config
    from dmeta.engine import execute
    from dmeta.exchange import AgentLayout, MPIExchange
    from dmeta.runner import plan_run

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)
    agents = size * agents_per_rank
    layout = AgentLayout(agents, size)
    exchange = MPIExchange(comm, layout)
    rows = []
    for name in (*TOPOLOGIES, "allreduce"):
        graph_name = "complete" if name == "allreduce" else name
        graph = topology.build_graph(GraphConfig(topology=graph_name), agents)
        matrix = topology.combination_matrix(graph, "metropolis")
        degree = float(np.mean([d for _, d in graph.degree()]))
        owner = layout.owners(np.arange(agents))
        elsewhere = float(np.mean([(owner[list(graph[k])] != owner[k]).sum() for k in graph]))
        sources, destinations, weights = matrix_edges(matrix)
        route = exchange.route(sources, destinations)

        def combiner(states: torch.Tensor, name: str = name, route=route, weights=weights):
            if name == "allreduce":
                return exchange.allreduce_sum(states.sum(dim=0)) / agents
            return exchange.mix(states, route, route.weights(weights, states))

        for parameters in sizes:
            states = torch.randn(len(layout.agents(rank)), parameters)
            combiner(states)  # warm-up: buffers, connections
            comm.Barrier()
            start = time.perf_counter()
            for _ in range(repeats):
                combiner(states)
            seconds = comm.allreduce((time.perf_counter() - start) / repeats, op=MPI.MAX)
            model_bytes = 4 * parameters
            if name == "allreduce":  # bandwidth-optimal: 2 (P - 1) / P model sums per rank
                sent = 2 * (size - 1) / size * model_bytes * size / agents
            else:  # each row once to every other rank where an agent listens to it
                sent = comm.allreduce(route.sends_per_agent.sum()) * model_bytes / agents
            rows.append(
                {
                    "ranks": size,
                    "backend": name,
                    "agents": agents,
                    "parameters": parameters,
                    "ms": 1e3 * seconds,
                    "sent_bytes": sent,
                    "degree_bytes": degree * model_bytes,
                    "minimum_bytes": elsewhere * model_bytes,
                }
            )
    shares = []
    folder = comm.bcast(tempfile.mkdtemp() if rank == 0 else None)
    for name in (*TOPOLOGIES, "allreduce"):
        overrides = [f"iterations={iterations}", f"log_every={iterations}", "runtime.threads=1"]
        overrides += ["strategy=centralized"] if name == "allreduce" else [f"graph.topology={name}"]
        config = load_config(ROOT / "jobs" / "sine_diffusion.toml", overrides)
        path = Path(folder) / f"{name}.h5"
        execute(plan_run(config, size, rank, rank, size), comm, path, show_progress=False)
        if rank == 0:
            with h5py.File(path) as run:
                compute, spent = float(run["time/compute"][-1]), float(run["time/comm"][-1])
            shares.append(
                {
                    "ranks": size,
                    "backend": name,
                    "ms": 1e3 * (compute + spent) / iterations,
                    "share": spent / (compute + spent),
                }
            )
    if rank == 0:
        print(json.dumps({"rows": rows, "shares": shares}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1761, 100_000, 1_000_000])
    parser.add_argument("--agents-per-rank", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--iterations", type=int, default=100, help="iterations of the sine run of the last table"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.sizes, args.agents_per_rank, args.repeats, args.iterations)
        return 0
    print(f"# bench_comm: {machine()}")
    print(command_line(__file__, argv))
    cores = len(os.sched_getaffinity(0))
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    rows, shares = [], []
    for ranks in args.ranks:
        command = [mpiexec, "-n", str(ranks), sys.executable, __file__, "--child"]
        command += ["--sizes", *map(str, args.sizes)]
        command += ["--agents-per-rank", str(args.agents_per_rank), "--repeats", str(args.repeats)]
        command += ["--iterations", str(args.iterations)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode:
            print(result.stderr, file=sys.stderr)
            return 1
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        rows += measured["rows"]
        shares += measured["shares"]
    if max(args.ranks) > cores:
        print(f"# note: {max(args.ranks)} ranks on {cores} cores share cores (oversubscribed)")
    print_table(
        [
            "ranks",
            "backend",
            "agents",
            "parameters",
            "ms / combine",
            "bytes sent / agent",
            "degree x model",
            "other-rank neighbours x model",
        ],
        [
            [
                str(r["ranks"]),
                r["backend"],
                str(r["agents"]),
                str(r["parameters"]),
                f"{r['ms']:.3f}",
                f"{r['sent_bytes']:.0f}",
                f"{r['degree_bytes']:.0f}",
                f"{r['minimum_bytes']:.0f}",
            ]
            for r in rows
        ],
    )
    print()
    print("# 40-agent sine experiment (jobs/sine_diffusion.toml), 100 iterations")
    print_table(
        ["ranks", "backend", "ms / iteration", "share in combine"],
        [
            [str(s["ranks"]), s["backend"], f"{s['ms']:.2f}", f"{100 * s['share']:.1f}%"]
            for s in shares
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
