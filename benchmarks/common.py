"""Shared helpers of the benchmark scripts: the machine line and table printing."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def machine() -> str:
    """One line saying where and when the benchmark ran."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    today = datetime.date.today().isoformat()
    return f"{today}, {platform.node()}: {cpu}, {cores} cores, {gpu}, torch {torch.__version__}"


def command_line(script: str, argv: list[str] | None) -> str:
    """The "# command: ..." line that says how a table was made."""
    arguments = " ".join(sys.argv[1:] if argv is None else argv)
    return f"# command: python benchmarks/{Path(script).name} {arguments}".rstrip()


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A plain-text table, columns padded to their widest cell."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for index, row in enumerate([header, *rows]):
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def dmeta_run(script: str, job: Path, out: Path, settings: list[str], ranks: int = 1) -> None:
    """`dmeta run JOB --out OUT --quiet --set ...` of this Python's venv, under
    `mpiexec -n RANKS` when RANKS > 1; a failed run ends `script` with the command and its
    error output."""
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "dmeta"), "run", str(job), "--out", str(out), "--quiet"]
    for setting in settings:
        command += ["--set", setting]
    if ranks > 1:
        command = [str(bin_dir / "mpiexec"), "-n", str(ranks), *command]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{script}: {' '.join(command)} failed:\n{result.stderr.strip()}")


def print_speedups(samples: dict[str, list[float]], per_task: float, digits: int = 1) -> None:
    """The peers' table: min / median / max ms per agent-task of each implementation's
    interleaved timings (seconds times `per_task`), and the speed-up of "dmeta eager" and
    "dmeta compiled" (those present) over each, by medians."""
    medians = {name: float(np.median(values)) for name, values in samples.items()}
    ours = [name for name in ("dmeta eager", "dmeta compiled") if name in samples]
    rows = []
    for name, values in samples.items():
        low, mid, high = (per_task * v for v in (min(values), medians[name], max(values)))
        ratios = [
            f"{medians[name] / medians[o]:.{digits}f}x" if name not in ours else "-" for o in ours
        ]
        rows.append([name, f"{low:.4f}", f"{mid:.4f}", f"{high:.4f}", *ratios])
    print_table(
        ["implementation", "min ms/agent-task", "median", "max", *(f"{o} speed-up" for o in ours)],
        rows,
    )
