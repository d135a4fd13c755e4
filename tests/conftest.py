"""Shared helpers: a small, fast config and an in-process run."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from dmeta.config import Config, load_config
from dmeta.runner import execute, plan_run

SMALL = [
    "agents=7",
    "iterations=12",
    "log_every=4",
    "graph.topology=ring",
    "validation.tasks=6",
    "learner.tasks_per_agent=3",
    "model.hidden=[16,16]",
    "runtime.threads=1",
]


# A small linear representation problem (seed 001), on top of SMALL.
LINEAR = [
    "problem=linear_representation",
    "linear.dim=6",
    "linear.rank=2",
    "optimizer.name=sgd",
    "optimizer.lr=0.05",
    "runtime.dtype=float64",
]


def small_config(*overrides: str) -> Config:
    """A 7-agent sine run of a dozen iterations."""
    return load_config(None, [*SMALL, *overrides])


def run_local(config: Config, path: Path) -> dict[str, np.ndarray]:
    """Run in-process (local backend) and return every dataset of the run file."""
    execute(plan_run(config, 1, 0, 0, 1), None, path, show_progress=False)
    return read_datasets(path)


def read_datasets(path: Path) -> dict[str, np.ndarray]:
    """All datasets of an HDF5 file by path."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


@pytest.fixture
def small() -> Config:
    return small_config()
