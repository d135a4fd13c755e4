"""The HDF5 run file: one row per logged step, per-agent metrics, topology and parameters.

Written by rank 0 with serial h5py. The file is created as `<path>.partial` and renamed to
`<path>` only when the run completes, so a file under the final name is always a whole run;
rows are flushed as they are written, so a killed run leaves a readable `.partial` file. A
file already under the final name is moved to `<path>.previous` when a new run starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dmeta.errors import DmetaError

# Every row-wise dataset: path -> (one value per agent?, units, meaning). Row r of each holds
# the values at iteration /time/iteration[r], which is their dimension scale.
SERIES = {
    "time/wall": (False, "s", "wall-clock seconds since the first iteration started"),
    "time/compute": (
        False,
        "s",
        "seconds rank 0 spent outside the combination step since the previous row",
    ),
    "time/comm": (
        False,
        "s",
        "seconds rank 0 spent in the combination step since the previous row",
    ),
    "metrics/train_loss": (
        True,
        "squared output units",
        "meta-training loss: query loss after adaptation, mean over the agent's tasks and over "
        "the iterations since the previous row (NaN at iteration 0)",
    ),
    "metrics/val_loss": (
        True,
        "squared output units",
        "validation loss: query MSE after adaptation on the fixed validation tasks",
    ),
    "metrics/disagreement": (
        True,
        "squared parameter units",
        "||w_k - w_c||^2, w_c the network centroid",
    ),
    "metrics/grad_norm": (
        True,
        "parameter units per iteration",
        "norm of the agent's stochastic meta-gradient (eq. 4) at the row's iteration "
        "(NaN at iteration 0)",
    ),
    "centroid/val_loss": (
        False,
        "squared output units",
        "validation loss of the centroid w_c after adaptation",
    ),
    "centroid/stationarity": (
        False,
        "squared parameter units",
        "||g(w_c)||^2, g the meta-gradient (eq. 4) at the centroid averaged over the fixed "
        "stationarity tasks of every agent: an estimate of ||grad J(w_c)||^2 (Theorem 2) "
        "biased upwards by the sampling variance over K x validation.stationarity_tasks tasks",
    ),
    "centroid/disagreement": (
        False,
        "squared parameter units",
        "(1/K) sum_k ||w_k - w_c||^2 (Theorem 1)",
    ),
}


class RunWriter:
    """Creates the run file and appends logged rows; `finish` makes it final."""

    def __init__(self, path: Path, num_agents: int, attributes: dict[str, Any]) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
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
        self.file.attrs["complete"] = False
        iteration = self.file.create_dataset(
            "time/iteration", (0,), maxshape=(None,), dtype="i8", chunks=(256,)
        )
        iteration.attrs["description"] = "iteration index i of each logged row"
        iteration.make_scale("iteration")
        chunk_rows = max(1, min(256, 65536 // max(1, num_agents)))
        for name, (per_agent, unit, meaning) in SERIES.items():
            shape = (0, num_agents) if per_agent else (0,)
            dataset = self.file.create_dataset(
                name,
                shape,
                maxshape=(None, *shape[1:]),
                dtype="f8",
                chunks=(chunk_rows, num_agents) if per_agent else (256,),
            )
            dataset.attrs["units"] = unit
            dataset.attrs["description"] = meaning
            dataset.dims[0].attach_scale(iteration)
            dataset.dims[0].label = "iteration"
            if per_agent:
                dataset.dims[1].label = "agent"

    def write_array(self, name: str, data: np.ndarray, **attributes: Any) -> None:
        """A whole dataset written once (topology, parameters)."""
        dataset = self.file.create_dataset(name, data=data)
        for key, value in attributes.items():
            dataset.attrs[key] = value

    def append(self, iteration: int, values: dict[str, float | np.ndarray]) -> None:
        """One logged row: the iteration and a value (or [K] values) for every series."""
        missing = SERIES.keys() - values.keys()
        if missing:
            raise ValueError(f"row of iteration {iteration} lacks {sorted(missing)}")
        row = self.rows
        self.rows += 1
        for name, value in (("time/iteration", iteration), *values.items()):
            dataset = self.file[name]
            dataset.resize(self.rows, axis=0)
            dataset[row] = value
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
