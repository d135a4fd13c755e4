"""End to end: the wall time of the paper's full Fig. 1b reproduction.

    python benchmarks/bench_fig1b.py [--out-dir runs/bench_fig1b] [--ranks 1] [--set KEY=VALUE]

Runs jobs/sine_diffusion.toml (40 agents, 10000 iterations, validation every 200) for Dif-MAML,
centralized and non-cooperative one after another, as `make figure` does, each under
`mpiexec -n RANKS` when RANKS > 1, then draws the figure; prints each run's wall time (process
start to exit, so imports and file writing count) and the total.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import command_line, dmeta_run, machine, print_table

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("atc", "centralized", "noncooperative")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="runs/bench_fig1b")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    args = parser.parse_args(argv)
    print(f"# bench_fig1b: {machine()}")
    print(command_line(__file__, argv))
    out = Path(args.out_dir)
    job = ROOT / "jobs" / "sine_diffusion.toml"
    rows, total = [], 0.0
    for strategy in STRATEGIES:
        start = time.perf_counter()
        settings = [f"strategy={strategy}", *args.set]
        dmeta_run("bench_fig1b", job, out / f"{strategy}.h5", settings, args.ranks)
        seconds = time.perf_counter() - start
        total += seconds
        rows.append([strategy, str(args.ranks), f"{seconds:.1f}"])
    figure = [sys.executable, str(ROOT / "analysis" / "fig1b.py")]
    figure += [str(out / f"{s}.h5") for s in STRATEGIES] + ["--last", "5"]
    figure += ["--out", str(out / "fig1b.png")]
    start = time.perf_counter()
    subprocess.run(figure, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    total += seconds
    rows.append(["figure (analysis/fig1b.py)", "-", f"{seconds:.1f}"])
    rows.append(["total", "-", f"{total:.1f}"])
    print_table(["run", "ranks", "wall seconds"], rows)
    print(f"# target: under 900 s; {'met' if total < 900 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
