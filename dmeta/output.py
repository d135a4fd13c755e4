"""The HDF5 run file: one row per logged step, per-agent metrics, topology and parameters.

Written by rank 0 with serial h5py. The file is created as `<path>.partial` and renamed to
`<path>` only when the run completes, so a file under the final name is always a whole run;
rows are flushed as they are written, so a killed run leaves a readable `.partial` file. A
file already under the final name is moved to `<path>.previous` when a new run starts.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dmeta.errors import DmetaError

# name -> (unit, meaning); every [T, K] metric is listed here.
AGENT_METRICS = {
    "train_loss": (
        "squared output units",
        "meta-training loss: query loss after adaptation, mean over the agent's tasks and over "
        "the iterations since the previous row (NaN at iteration 0)",
    ),
    "val_loss": (
        "squared output units",
        "validation loss: query MSE after adaptation on the fixed validation tasks",
    ),
    "disagreement": ("squared parameter units", "||w_k - w_c||^2, w_c the network centroid"),
}


def partial_path(path: Path) -> Path:
    """Where a run writes until it completes."""
    return path.with_name(path.name + ".partial")


class RunWriter:
    """Creates the run file and appends logged rows; `finish` makes it final."""

    def __init__(self, path: Path, num_agents: int, attributes: dict[str, Any]) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                # A failed rerun must not leave the old results under the name of the new run.
                os.replace(self.path, self.path.with_name(self.path.name + ".previous"))
            self.file = h5py.File(self.partial, "w")
        except OSError as error:
            raise DmetaError(f"cannot create output file {self.partial}: {error}") from None
        self.rows = 0
        for key, value in attributes.items():
            self.file.attrs[key] = value
        self.file.attrs["host"] = platform.node()
        self.file.attrs["complete"] = False
        time = self.file.create_group("time")
        iteration = time.create_dataset(
            "iteration", (0,), maxshape=(None,), dtype="i8", chunks=(256,)
        )
        iteration.attrs["description"] = "iteration index i of each logged row"
        iteration.make_scale("iteration")
        wall = time.create_dataset("wall", (0,), maxshape=(None,), dtype="f8", chunks=(256,))
        wall.attrs["units"] = "s"
        wall.attrs["description"] = "wall-clock seconds since the first iteration started"
        metrics = self.file.create_group("metrics")
        chunk_rows = max(1, min(256, 65536 // max(1, num_agents)))
        for name, (unit, meaning) in AGENT_METRICS.items():
            dataset = metrics.create_dataset(
                name,
                (0, num_agents),
                maxshape=(None, num_agents),
                dtype="f8",
                chunks=(chunk_rows, num_agents),
            )
            dataset.attrs["units"] = unit
            dataset.attrs["description"] = meaning
            dataset.dims[0].attach_scale(iteration)
            dataset.dims[0].label = "iteration"
            dataset.dims[1].label = "agent"

    def write_array(self, name: str, data: np.ndarray, **attributes: Any) -> None:
        """A whole dataset written once (topology, parameters)."""
        dataset = self.file.create_dataset(name, data=data)
        for key, value in attributes.items():
            dataset.attrs[key] = value

    def append(self, iteration: int, wall: float, metrics: dict[str, np.ndarray]) -> None:
        """One logged row: the iteration, the wall time and each metric's [K] values."""
        row = self.rows
        self.rows += 1
        for name, value in (("time/iteration", iteration), ("time/wall", wall)):
            dataset = self.file[name]
            dataset.resize((self.rows,))
            dataset[row] = value
        for name, values in metrics.items():
            dataset = self.file["metrics"][name]
            dataset.resize((self.rows, dataset.shape[1]))
            dataset[row] = values
        self.file.flush()

    def finish(self) -> None:
        """Mark the run complete and move the file to its final name."""
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.partial, self.path)

    def abandon(self) -> None:
        """Close after a failure; the `.partial` file stays for inspection, never as a result."""
        if self.file.id.valid:
            self.file.close()
