"""Read dmeta run files (HDF5) for post-hoc analysis.

Needs only h5py and numpy: no torch, no mpi4py, no dmeta import, so the analysis scripts run
on a laptop. Every problem with an input file raises `RunFileError` with one line that names
the file and the problem.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

# The per-agent [T, K] metrics a run file holds under /metrics.
METRICS = ("train_loss", "val_loss", "disagreement")


class RunFileError(Exception):
    """A run file that cannot be used; the message is one line naming the file."""


@dataclass
class FinalResult:
    """A final evaluation /final/<name> [K] with its 95% interval and the network's mean."""

    values: np.ndarray  # [K], one per agent
    ci95: np.ndarray  # [K], half-widths of the per-agent 95% confidence intervals
    network_mean: float  # mean over agents and tasks
    network_ci95: float  # half-width over tasks of the agent-averaged score


@dataclass
class Run:
    """One run file, loaded eagerly: config, strategy, logged iterations and metrics."""

    path: str
    config: dict[str, Any]
    strategy: str
    complete: bool
    iteration: np.ndarray  # [T] logged iteration indices
    wall: np.ndarray  # [T] wall-clock seconds
    metrics: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [T, K]
    series: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. centroid/... -> [T]
    lambda2: float | None = None  # mixing rate of the combination matrix (see `_topology`)
    doubly_stochastic: bool | None = None  # whether A is (Assumption 6); None: not recorded
    finals: dict[str, FinalResult] = field(default_factory=dict)  # e.g. test_accuracy

    @property
    def step_size(self) -> float:
        """mu, the outer step size (optimizer.lr)."""
        optimizer = self.config.get("optimizer", {})
        value = optimizer.get("lr", float("nan")) if isinstance(optimizer, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunFileError(f"{self.path}: config optimizer.lr = {value!r} is not a number")
        return float(value)

    @property
    def optimizer(self) -> str:
        """The outer optimizer's name (the theorems assume sgd)."""
        return str(self.config.get("optimizer", {}).get("name", ""))

    @property
    def agents(self) -> int:
        """K, the number of agents."""
        return next(iter(self.metrics.values())).shape[1] if self.metrics else 0

    def metric(self, name: str) -> np.ndarray:
        """The [T, K] array of a metric loaded by `open_run`."""
        if name not in self.metrics:
            raise RunFileError(f"{self.path}: metric {name!r} was not loaded")
        return self.metrics[name]


def expand_paths(args: list[str]) -> list[str]:
    """Expand shell-style globs (sorted matches); a pattern that matches nothing is an error.

    Plain paths are kept as given (a missing one is reported by `open_run`); duplicates are
    dropped, first occurrence kept.
    """
    paths: list[str] = []
    for arg in args:
        if glob.has_magic(arg):
            matches = sorted(glob.glob(arg))
            if not matches:
                raise RunFileError(f"{arg}: no file matches this pattern")
            paths.extend(matches)
        else:
            paths.append(arg)
    return list(dict.fromkeys(paths))


def _read_dataset(file: h5py.File, path: str, name: str) -> np.ndarray:
    """The whole dataset `name`, or RunFileError naming it."""
    item = file.get(name)
    if item is None:
        raise RunFileError(f"{path}: missing dataset /{name}")
    if not isinstance(item, h5py.Dataset):
        raise RunFileError(f"{path}: /{name} is not a dataset")
    if item.dtype.kind not in "biuf":
        raise RunFileError(f"{path}: /{name} holds {item.dtype} values, not numbers")
    return item[()]


def _number(path: str, where: str, value: Any) -> float:
    """An attribute that must be a number, as float, or RunFileError naming it."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(())[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise RunFileError(f"{path}: {where} = {value!r} is not a number")
    return float(value)


def _attribute_text(value: Any) -> str:
    """An HDF5 string attribute as str (h5py may return bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _final(file: h5py.File, path: str, name: str) -> FinalResult:
    """/final/<name>, /final/<name>_ci95 and the network attributes, or RunFileError."""
    values = _read_dataset(file, path, f"final/{name}")
    ci95 = _read_dataset(file, path, f"final/{name}_ci95")
    attributes = file[f"final/{name}"].attrs
    if values.ndim != 1 or values.shape != ci95.shape:
        raise RunFileError(f"{path}: /final/{name} and its _ci95 are not two [K] arrays")
    if "network_mean" not in attributes or "network_ci95" not in attributes:
        raise RunFileError(f"{path}: /final/{name} lacks its network_mean/network_ci95")
    return FinalResult(
        np.asarray(values, dtype=float),
        np.asarray(ci95, dtype=float),
        _number(path, f"/final/{name} attribute network_mean", attributes["network_mean"]),
        _number(path, f"/final/{name} attribute network_ci95", attributes["network_ci95"]),
    )


def _topology(file: h5py.File, path: str) -> tuple[float | None, bool | None]:
    """(lambda2, doubly_stochastic) of the run's combination matrix, from attributes only.

    New files: attributes of the /topology group (lambda2, lambda2_method, doubly_stochastic,
    num_agents; the matrix itself is the sparse /topology/edges and /topology/weights). Old
    files: the lambda2 attribute of the dense /topology/A dataset, which is not read. None
    for what neither records.
    """
    group = file.get("topology")
    if not isinstance(group, h5py.Group):
        return None, None
    attributes = group.attrs
    if "lambda2" not in attributes:
        dense = group.get("A")
        attributes = dense.attrs if isinstance(dense, h5py.Dataset) else {}
    lambda2 = (
        _number(path, "/topology attribute lambda2", attributes["lambda2"])
        if "lambda2" in attributes
        else None
    )
    stochastic = attributes.get("doubly_stochastic")
    return lambda2, None if stochastic is None else bool(stochastic)


def _metric_path(name: str) -> str:
    """The dataset of a per-agent metric: /metrics/<name>, or the full path of a name with a
    slash (another [T, K] series, e.g. pushsum/consensus_error)."""
    return name if "/" in name else f"metrics/{name}"


def _load(
    file: h5py.File,
    path: str,
    metrics: tuple[str, ...],
    series: tuple[str, ...],
    allow_partial: bool,
    finals: tuple[str, ...] = (),
) -> Run:
    """Build a `Run` from an open file (see `open_run`)."""
    complete = bool(file.attrs.get("complete", False))
    if not complete and not allow_partial:
        raise RunFileError(f"{path}: run is not complete (attribute complete is not True)")
    if "config" not in file.attrs:
        raise RunFileError(f"{path}: missing root attribute 'config'")
    try:
        config = json.loads(_attribute_text(file.attrs["config"]))
    except json.JSONDecodeError as error:
        raise RunFileError(f"{path}: root attribute 'config' is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise RunFileError(f"{path}: root attribute 'config' is not a JSON object")
    optimizer = config.get("optimizer", {})
    if not isinstance(optimizer, dict):
        raise RunFileError(f"{path}: config optimizer is not a table")
    if "lr" in optimizer:
        _number(path, "config optimizer.lr", optimizer["lr"])
    strategy = _attribute_text(file.attrs.get("strategy", config.get("strategy", "")))
    if not strategy:
        raise RunFileError(f"{path}: no strategy (root attribute or config)")

    iteration = np.asarray(_read_dataset(file, path, "time/iteration"))
    wall = np.asarray(_read_dataset(file, path, "time/wall"), dtype=float)
    arrays = {name: _read_dataset(file, path, _metric_path(name)) for name in metrics}
    for name, array in arrays.items():
        if array.ndim != 2:
            raise RunFileError(f"{path}: /{_metric_path(name)} has shape {array.shape}, not [T, K]")
    columns = {name: _read_dataset(file, path, name) for name in series}
    for name, array in columns.items():
        if array.ndim != 1:
            raise RunFileError(f"{path}: /{name} has shape {array.shape}, not [T]")
    lambda2, doubly_stochastic = _topology(file, path)

    # A killed run may stop between resizing one dataset and the next: cut to the common rows.
    every = [iteration, wall, *arrays.values(), *columns.values()]
    rows = min(len(a) for a in every)
    lengths = {len(a) for a in every}
    if len(lengths) > 1 and complete:
        raise RunFileError(f"{path}: datasets disagree on the number of rows ({sorted(lengths)})")
    if rows == 0:
        raise RunFileError(f"{path}: no logged rows")
    for name, array in [("time/wall", wall)] + [
        *((_metric_path(name), a) for name, a in arrays.items()),
        *columns.items(),
    ]:
        # Training loss and gradient norm are NaN at iteration 0 by definition.
        first = 1 if name in ("metrics/train_loss", "metrics/grad_norm") else 0
        if rows > first and not np.isfinite(np.asarray(array[first:rows], dtype=float)).any():
            raise RunFileError(f"{path}: /{name} holds no finite value (a diverged run?)")
    if finals and not complete:
        raise RunFileError(f"{path}: run is not complete, so it has no final evaluation")
    return Run(
        path=path,
        config=config,
        strategy=strategy,
        complete=complete,
        iteration=iteration[:rows],
        wall=wall[:rows],
        metrics={name: np.asarray(a[:rows], dtype=float) for name, a in arrays.items()},
        series={name: np.asarray(a[:rows], dtype=float) for name, a in columns.items()},
        lambda2=lambda2,
        doubly_stochastic=doubly_stochastic,
        finals={name: _final(file, path, name) for name in finals},
    )


def open_hdf5(path: str) -> h5py.File:
    """Open an HDF5 file to read without a file lock, in SWMR mode while a run writes it: its
    superblock (version 2 or later) has the SWMR-writer status flag 0x04. Not otherwise: SWMR
    readers retry a damaged file's bad checksums for hours. Raises OSError."""
    with open(path, "rb") as raw:
        head = raw.read(12)
    signed = len(head) == 12 and head[:8] == b"\x89HDF\r\n\x1a\n"
    writing = signed and head[8] >= 2 and bool(head[11] & 0x04)
    return h5py.File(path, "r", swmr=writing, locking=False)


def open_run(
    path: str | os.PathLike[str],
    *,
    metrics: tuple[str, ...] = METRICS,
    series: tuple[str, ...] = (),
    allow_partial: bool = False,
    finals: tuple[str, ...] = (),
) -> Run:
    """Load a run file: config, strategy, /time, the requested /metrics datasets ([T, K]; a
    name with a slash is the full path of another [T, K] series, e.g. pushsum/consensus_error),
    row-wise `series` given by full path (e.g. "centroid/disagreement", [T]) and final
    evaluations by name (e.g. "test_accuracy": /final/test_accuracy and its _ci95).

    A run whose root attribute `complete` is not True (a `.partial` file) is refused unless
    `allow_partial`; it is then cut to the rows that every loaded dataset holds. A run still
    writing its file is read in HDF5's SWMR mode: the rows flushed so far.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise RunFileError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise RunFileError(f"{path}: not a regular file")
    try:
        with open_hdf5(path) as file:
            return _load(file, path, metrics, series, allow_partial, finals)
    except OSError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "already open for write" in reason:
            raise RunFileError(
                f"{path}: a run is setting it up or writing its final datasets (or was killed "
                "then): try again in a moment"
            ) from None
        raise RunFileError(f"{path}: not an HDF5 file or corrupt ({reason})") from None


def load_runs(
    patterns: list[str],
    *,
    metrics: tuple[str, ...] = METRICS,
    series: tuple[str, ...] = (),
    allow_partial: bool = False,
    finals: tuple[str, ...] = (),
) -> list[Run]:
    """`open_run` on every file the paths and globs name, in order."""
    return [
        open_run(path, metrics=metrics, series=series, allow_partial=allow_partial, finals=finals)
        for path in expand_paths(patterns)
    ]


def table_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    """A plain-text table: left-aligned columns as wide as their widest cell, a rule under the
    header."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


def figure_path(requested: str | None, runs: list[Run], name: str) -> str:
    """The figure file: the one requested, else `name` next to the first run."""
    return requested or os.path.join(os.path.dirname(runs[0].path) or ".", name)
