"""The benchmarks work: the reference loop computes dmeta's meta-gradients, and every script
runs its smallest setting (not timing tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_sine  # noqa: E402


def test_the_reference_loop_gives_dmetas_meta_gradients() -> None:
    assert bench_sine.check_gradients(["runtime.threads=1", "runtime.device=cpu"]) < 1e-10


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# The smallest setting of every benchmark script: a broken benchmark fails here, not in
# `make bench` (no timing is asserted).
SMOKE = {
    "bench_sine.py": ["--iterations", "3", "--reference-iterations", "1", "--no-compile"],
    "bench_agents.py": ["--agents", "4", "--iterations", "6", "--device", "cpu"],
    "bench_combine.py": ["--agents", "8"],
    "bench_comm.py": ["--ranks", "2", "--sizes", "100", "--repeats", "2", "--iterations", "2"],
    "bench_scale.py": ["--agents", "20", "40", "--iterations", "3"],
    "bench_ranks.py": ["--agents", "4", "--iterations", "3", "--repeats", "1"],
    "peers.py": ["--agents", "2", "--repeats", "1", "--no-compile"],
    "official.py": ["--iterations", "3", "--repeats", "1", "--no-compile"],
    "bench_fig1b.py": ["--set", "iterations=4", "--set", "log_every=1", "--set", "agents=4"],
}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_every_benchmark_runs_its_smallest_setting(script, tmp_path) -> None:
    extra = ["--out-dir", str(tmp_path)] if script == "bench_fig1b.py" else []
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *SMOKE[script], *extra],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCHMARKS,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "# command:" in result.stdout and "---" in result.stdout


def test_the_gpu_script_runs_every_step_on_the_cpu(tmp_path) -> None:
    """benchmarks/gpu.sh --quick on the CPU with this venv: every step runs and the file is
    written (its install step needs the wheels and a GPU machine: see BENCHMARKS.md)."""
    out = tmp_path / "gpu.txt"
    result = subprocess.run(
        [
            "bash", str(BENCHMARKS / "gpu.sh"), "--device", "cpu", "--python", sys.executable,
            "--no-install", "--quick", "--out", str(out),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert "step failed" not in text, text[-3000:]
    assert text.count("# command:") == 3 and "agree" in text
