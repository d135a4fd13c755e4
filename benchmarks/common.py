"""Shared helpers of the benchmark scripts: the machine line and table printing."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

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
