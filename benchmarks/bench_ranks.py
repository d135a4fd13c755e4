"""Ranks that help: the sine experiment's time per iteration on P ranks against one.

    python benchmarks/bench_ranks.py [--agents 40 640] [--ranks 1 2] [--iterations 100]
                                     [--repeats 3] [--topology erdos_renyi] [--set KEY=VALUE]

For each K, `dmeta run jobs/sine_diffusion.toml` with K agents under `mpiexec -n P` for every
P (P = 1 without mpiexec), one torch thread per rank, eager, the runs of all P interleaved and
repeated `--repeats` times so that a slow moment of the machine hits every P alike. Time per
iteration is rank 0's /time/compute + /time/comm over iterations 2..N (the ranks meet at every
combination, so rank 0's clock is the iteration's; logged rows excluded). The table shows min /
median / max, "combine": the median over the runs of the combination's part (/time/comm: the
exchange, the wait for the slower rank and the mix; 0 in rounds replayed from a CUDA graph), and
the speed-up of the medians over P = 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
from common import command_line, dmeta_run, machine, print_table

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "sine_diffusion.toml"


def seconds_per_iteration(
    agents: int, ranks: int, args: argparse.Namespace, out: Path
) -> tuple[float, float]:
    """One run: rank 0's seconds per iteration over iterations 2..N, and those of them in the
    combination."""
    settings = [
        f"agents={agents}",
        f"iterations={args.iterations}",
        f"log_every={args.iterations}",
        "log_every_iteration_until=1",  # iteration 1 (warm-up) gets its own row
        f"graph.topology={args.topology}",
        "runtime.threads=1",
        "runtime.compile=false",
        "validation.tasks=2",
        "validation.stationarity_tasks=2",
        *args.set,
    ]
    dmeta_run("bench_ranks", JOB, out, settings, ranks)
    with h5py.File(out) as run:
        comm = float(run["time/comm"][-1])
        spent = float(run["time/compute"][-1]) + comm
    out.unlink()
    return spent / (args.iterations - 1), comm / (args.iterations - 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[40, 640])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--topology", default="erdos_renyi", help="graph.topology")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    args = parser.parse_args(argv)
    print(f"# bench_ranks: {machine()}")
    print(command_line(__file__, argv))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for agents in args.agents:
            samples: dict[int, list[float]] = {ranks: [] for ranks in args.ranks}
            combination: dict[int, list[float]] = {ranks: [] for ranks in args.ranks}
            for _ in range(args.repeats):
                for ranks in args.ranks:
                    out = Path(folder) / f"{agents}_{ranks}.h5"
                    total, comm = seconds_per_iteration(agents, ranks, args, out)
                    samples[ranks].append(total)
                    combination[ranks].append(comm)
            one = float(np.median(samples[min(args.ranks)]))
            for ranks, values in samples.items():
                middle = float(np.median(values))
                rows.append(
                    [
                        str(agents),
                        str(ranks),
                        f"{1e3 * min(values):.2f}",
                        f"{1e3 * middle:.2f}",
                        f"{1e3 * max(values):.2f}",
                        f"{1e3 * float(np.median(combination[ranks])):.2f}",
                        f"{one / middle:.2f}x",
                    ]
                )
    header = [
        "agents",
        "ranks",
        "min ms/it",
        "median ms/it",
        "max ms/it",
        "combine ms/it",
        "speed-up",
    ]
    print_table(header, rows)
    print(f"# speed-up: the median over P = {min(args.ranks)} divided by the median over P")
    return 0


if __name__ == "__main__":
    sys.exit(main())
