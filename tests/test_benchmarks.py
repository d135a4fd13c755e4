"""The benchmarks' reference loop computes dmeta's meta-gradients (not a timing test)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_sine  # noqa: E402


def test_the_reference_loop_gives_dmetas_meta_gradients() -> None:
    assert bench_sine.check_gradients(["runtime.threads=1", "runtime.device=cpu"]) < 1e-10
