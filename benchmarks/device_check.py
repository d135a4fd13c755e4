"""The device path gives the CPU's numbers: one sine run in float64, on the CPU and on a device.

    python benchmarks/device_check.py [--device cuda] [--ranks 2] [--set KEY=VALUE ...]

Runs `dmeta run jobs/sine_quick.toml` (shortened to 30 iterations, float64) three ways: in-process
on the CPU (the reference), in-process on DEVICE, and under `mpiexec -n RANKS` on DEVICE; then
prints, for each of the last two, the largest absolute difference from the reference over the
training and validation series, the centroid's series and the final launch models. Exits 1 when
a difference exceeds 1e-10 (float64 runs of the same draws agree to rounding).
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
JOB = ROOT / "jobs" / "sine_quick.toml"
COMPARED = (
    "metrics/train_loss",
    "metrics/val_loss",
    "centroid/val_loss",
    "centroid/disagreement",
    "params/final",
)
TOLERANCE = 1e-10


def run(device: str, ranks: int, out: Path, extra: list[str]) -> dict[str, np.ndarray]:
    """One run of the shortened job; its compared datasets."""
    settings = [
        "iterations=30",
        "log_every=10",
        "runtime.dtype=float64",
        f"runtime.device={device}",
    ]
    dmeta_run("device_check", JOB, out, [*settings, *extra], ranks)
    with h5py.File(out) as handle:
        return {name: handle[name][()] for name in COMPARED}


def difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b|; NaN in both (no training loss before the first round) counts as equal,
    NaN in one as infinitely far."""
    both = np.isnan(a) & np.isnan(b)
    gaps = np.abs(np.where(both, 0.0, a - b))
    return float(np.nan_to_num(gaps, nan=np.inf).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="runtime.device of the compared runs")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    args = parser.parse_args(argv)
    print(f"# device_check: {machine()}")
    print(command_line(__file__, argv))
    with tempfile.TemporaryDirectory() as folder:
        reference = run("cpu", 1, Path(folder) / "cpu.h5", args.set)
        rows, worst = [], 0.0
        for ranks in sorted({1, args.ranks}):
            data = run(args.device, ranks, Path(folder) / f"{ranks}.h5", args.set)
            differences = [difference(data[n], reference[n]) for n in COMPARED]
            worst = max(worst, *differences)
            rows.append([args.device, str(ranks), *(f"{d:.1e}" for d in differences)])
    print_table(["device", "ranks", *COMPARED], rows)
    verdict = "agree" if worst <= TOLERANCE else "DISAGREE"
    print(f"# largest difference from the CPU run: {worst:.1e} (float64): {verdict}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
