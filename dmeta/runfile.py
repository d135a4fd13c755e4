"""Reading a run file, complete or still being written: `dmeta status` and pandas frames.

Imports only h5py and numpy (pandas inside `load_run`, an optional extra): no torch, no mpi4py,
so `dmeta status` answers at once. A file a run is writing is opened in HDF5's SWMR mode
(`dmeta.swmr`): a running serial-writer run shows the rows flushed so far. The analysis
scripts have their own reader (analysis/runfile.py), which needs no dmeta at all.

    from dmeta.runfile import load_run
    run = load_run("runs/sine_quick.h5")
    run.agents    # one row per (iteration, agent): iteration, agent, metrics/val_loss, ...
    run.scalars   # one row per iteration: iteration, time/wall, centroid/val_loss, ...
    run.config    # the resolved config, a dict
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from dmeta import swmr
from dmeta.errors import DmetaError

if TYPE_CHECKING:
    import pandas


class RunFileError(DmetaError):
    """A run file that cannot be read; the message is one line naming the file."""


def resolve(path: str | os.PathLike[str]) -> Path:
    """The file to read for `path`: itself, or its `.partial` while the run is unfinished."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if path.is_file():
        return path
    if path.exists():
        raise RunFileError(f"{path}: not a regular file")
    if partial.is_file():
        return partial
    raise RunFileError(f"{path}: no such file (nor {partial.name})")


@contextlib.contextmanager
def reading(path: Path) -> Iterator[h5py.File]:
    """The run file `path` open to read (`swmr.open_for_reading`), or RunFileError why not."""
    try:
        file = swmr.open_for_reading(path)
    except OSError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if swmr.being_written(error):
            raise RunFileError(
                f"{path}: a run is setting it up or writing its final datasets (or was killed "
                "then): try again in a moment"
            ) from None
        raise RunFileError(f"{path}: not an HDF5 file or corrupt ({reason})") from None
    with file:
        yield file


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (str, number, list)."""
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return _text(value) if isinstance(value, bytes) else value


def _config(file: h5py.File, path: Path) -> dict[str, Any]:
    """The resolved config stored in the root attribute `config`."""
    try:
        config = json.loads(_text(file.attrs["config"]))
    except KeyError:
        raise RunFileError(f"{path}: missing root attribute 'config'") from None
    except json.JSONDecodeError as error:
        raise RunFileError(f"{path}: root attribute 'config' is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise RunFileError(f"{path}: root attribute 'config' is not a JSON object")
    return config


def row_series(file: h5py.File) -> dict[str, h5py.Dataset]:
    """Every row-wise dataset (dimension 0 labelled iteration) by path, /time/iteration
    excluded: [T] scalar series and [T, K] per-agent ones."""
    found: dict[str, h5py.Dataset] = {}

    def visit(name: str, item: Any) -> None:
        if (
            isinstance(item, h5py.Dataset)
            and item.ndim in (1, 2)
            and name != "time/iteration"
            and item.dims[0].label == "iteration"
        ):
            found[name] = item

    file.visititems(visit)
    return found


def _rows(file: h5py.File, path: Path, series: dict[str, h5py.Dataset]) -> int:
    """The rows every series holds (a running file may be mid-flush: fewer in some)."""
    iteration = file.get("time/iteration")
    if not isinstance(iteration, h5py.Dataset):
        raise RunFileError(f"{path}: missing dataset /time/iteration")
    return min([iteration.shape[0], *(dataset.shape[0] for dataset in series.values())])


@dataclass
class RunStatus:
    """Where a run stands, from its file (and its checkpoint, if any)."""

    path: Path
    state: str  # complete, running, stopped (a checkpoint to resume from) or failed
    config: dict[str, Any]
    attributes: dict[str, Any]  # root attributes other than config
    iteration: np.ndarray  # [T] logged iterations
    wall: np.ndarray  # [T] seconds since the start of the launch that logged the row
    last: dict[str, float] = field(default_factory=dict)  # the last row's network numbers
    has_topology: bool = False  # whether the strategy combines over a graph
    checkpoint_iteration: int | None = None
    modified: float = 0.0  # when the file was last written (seconds since the epoch)

    def segments(self) -> list[slice]:
        """The rows of each launch (a resumed run restarts its wall clock)."""
        starts = [0, *(int(r) for r in self.attributes.get("resumed_at_row", []))]
        bounds = sorted({s for s in starts if s < len(self.iteration)} | {len(self.iteration)})
        # A file with no row yet has one empty launch.
        return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)] or [slice(0, 0)]

    def seconds(self) -> float:
        """Wall-clock seconds of every launch so far, up to its last row."""
        return float(sum(self.wall[rows][-1] for rows in self.segments()))

    def flush_interval(self) -> float | None:
        """Seconds between two writes of rows in the latest launch (None before two rows)."""
        rows = self.segments()[-1]
        wall = self.wall[rows]
        if len(wall) < 2:
            return None
        flush_every = int(self.config.get("output", {}).get("flush_every", 1))
        return float(wall[-1] - wall[0]) / (len(wall) - 1) * flush_every

    def rate(self) -> float | None:
        """Iterations per second over the latest launch's rows (None with fewer than two)."""
        rows = self.segments()[-1]
        iterations, wall = self.iteration[rows], self.wall[rows]
        if len(iterations) < 2 or wall[-1] <= wall[0]:
            return None
        return float((iterations[-1] - iterations[0]) / (wall[-1] - wall[0]))


# What `dmeta status` shows of the last row, label -> series (means over agents).
LAST_ROW = {
    "train": "metrics/train_loss",
    "val": "metrics/val_loss",
    "centroid val": "centroid/val_loss",
    "centroid acc": "centroid/val_accuracy",
    "disagreement": "centroid/disagreement",
    "wall": "time/wall",
}


def _last_row(file: h5py.File, rows: int) -> dict[str, float]:
    """The `LAST_ROW` numbers of the last row: per-agent series averaged over their finite
    values (NaN when none, as the training loss at iteration 0)."""
    last = {}
    for label, name in LAST_ROW.items():
        if name in file and rows:
            values = np.asarray(file[name][rows - 1], dtype=float)
            finite = values[np.isfinite(values)]
            last[label] = float(finite.mean()) if finite.size else float("nan")
    return last


def _checkpoint_iteration(run_file: Path) -> int | None:
    """The iteration of the checkpoint next to the run file, or None without a readable one."""
    final = run_file.with_name(run_file.name.removesuffix(".partial"))
    try:
        with h5py.File(final.with_name(final.name + ".ckpt"), "r") as file:
            return int(file.attrs["iteration"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def read_status(path: str | os.PathLike[str]) -> RunStatus:
    """The status of the run whose file is `path` (or its `.partial`)."""
    path = resolve(path)
    with reading(path) as file:
        config = _config(file, path)
        attributes = {k: _plain(v) for k, v in file.attrs.items() if k != "config"}
        if not isinstance(file.get("time/wall"), h5py.Dataset):
            raise RunFileError(f"{path}: missing dataset /time/wall")
        rows = _rows(file, path, {n: file[n] for n in LAST_ROW.values() if n in file})
        status = RunStatus(
            path=path,
            state="complete" if attributes.get("complete") else "failed",
            config=config,
            attributes=attributes,
            iteration=np.asarray(file["time/iteration"][:rows]),
            wall=np.asarray(file["time/wall"][:rows], dtype=float),
            last=_last_row(file, rows),
            # A server strategy records a star without edges: no graph to name.
            has_topology="topology" in file and file["topology"].attrs.get("kind") != "server",
        )
    status.modified = path.stat().st_mtime
    if status.state != "complete":
        status.checkpoint_iteration = _checkpoint_iteration(path)
        if swmr.superblock(path)[1]:
            status.state = "running"
        elif status.checkpoint_iteration is not None:
            status.state = "stopped"
    return status


def _duration(seconds: float) -> str:
    """A duration as people read it: 42 s, 3.5 min, 2.1 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _state_line(status: RunStatus, now: float) -> str:
    """What the run is doing, and what to do about it."""
    checkpoint = status.checkpoint_iteration
    saved = f"; checkpoint at iteration {checkpoint}" if checkpoint is not None else ""
    if status.state == "complete":
        return f"complete, finished {status.attributes.get('finished_at', '(time not recorded)')}"
    if status.state == "stopped":
        return f"stopped at iteration {checkpoint} with a checkpoint: the same command resumes it"
    if status.state == "failed":
        return "failed: not running, no checkpoint; `dmeta run --restart` starts it over"
    age, interval = max(0.0, now - status.modified), status.flush_interval()
    if age > max(60.0, 5 * (interval or 0.0)):
        expected = f", a write every {_duration(interval)} expected" if interval else ""
        return (
            f"not written for {_duration(age)}{expected}: its process was killed, or is stuck"
            + (f"; the same command resumes it from iteration {checkpoint}" if saved else "")
        )
    return f"running (file last written {_duration(age)} ago){saved}"


def status_lines(status: RunStatus, now: float | None = None) -> list[str]:
    """What `dmeta status` prints: the run, its state, progress, last row, time and ETA."""
    config, attributes = status.config, status.attributes
    total = int(config.get("iterations", 0))
    graph = config.get("graph", {}).get("topology") if status.has_topology else None
    learner = config.get("learner", {}).get("name", "?")
    lines = [
        f"run file  {status.path}",
        f"state     {_state_line(status, time.time() if now is None else now)}",
        f"run       {attributes.get('strategy', config.get('strategy', '?'))} on "
        f"{config.get('agents', '?')} agents"
        + (f" ({graph})" if graph else "")
        + f", problem {config.get('problem', '?')}, learner {learner}, seed "
        f"{config.get('seed', '?')}",
        f"launch    {attributes.get('world_size', '?')} rank(s), backend "
        f"{attributes.get('backend', '?')}, writer {attributes.get('writer', '?')}, started "
        f"{attributes.get('started_at', '(not recorded)')}",
    ]
    if "command_line" in attributes:
        lines.append(f"command   {attributes['command_line']}")
    if not len(status.iteration):
        flush_every = config.get("output", {}).get("flush_every", "?")
        return [
            *lines,
            f"progress  no rows written yet (rows reach the file {flush_every} at a time: "
            "output.flush_every)",
        ]
    done = int(status.iteration[-1])
    lines.append(
        f"progress  iteration {done} / {total} ({100 * done / max(total, 1):.0f}%), "
        f"{len(status.iteration)} rows"
    )
    numbers = {k: v for k, v in status.last.items() if k != "wall"}
    lines.append(
        "last row  "
        + "  ".join(
            f"{label} {value:.3e}" if label == "disagreement" else f"{label} {value:.4f}"
            for label, value in numbers.items()
        ).replace("nan", "-")
    )
    return [*lines, _time_line(status, total - done)]


def _time_line(status: RunStatus, left: int) -> str:
    """Wall time so far, the rate and, for an unfinished run, the time left at that rate."""
    rate = status.rate()
    so_far = "in all" if status.state == "complete" else "so far"
    text = f"time      {_duration(status.seconds())} {so_far}"
    if rate is None:
        return text + ", rate not known yet"
    text += f", {rate:.3g} it/s"
    if status.state == "complete" or left <= 0:
        return text
    return text + f", about {_duration(left / rate)} left at that rate"


@dataclass
class RunFrames:
    """A run file's row-wise series as pandas frames, with its config and attributes."""

    agents: pandas.DataFrame  # one row per (iteration, agent): iteration, agent, [T, K] series
    scalars: pandas.DataFrame  # one row per iteration: iteration, the [T] series
    config: dict[str, Any]  # the resolved config
    attributes: dict[str, Any]  # the other root attributes (strategy, started_at, ...)
    complete: bool  # False for a `.partial` file: the rows written so far


def _pandas() -> Any:
    """The pandas module, or a one-line ModuleNotFoundError saying how to install it."""
    try:
        import pandas
    except ImportError:
        raise ModuleNotFoundError(
            "load_run needs pandas, an optional extra: pip install 'dmeta[analysis]'",
            name="pandas",
        ) from None
    return pandas


def load_run(path: str | os.PathLike[str]) -> RunFrames:
    """The run file `path` (or its `.partial`, read while the run goes on) as tidy frames.

    `agents` has one row per logged iteration and agent, columns `iteration`, `agent` and one
    per per-agent series by its HDF5 path (`metrics/val_loss`, `comm/bytes`, ...); `scalars`
    one row per logged iteration, columns `iteration` and one per scalar series
    (`time/wall`, `centroid/val_loss`, ...). Join them with
    `run.agents.merge(run.scalars, on="iteration")`. /params, /topology, /tasks and /final are
    not rows, nor are the row-wise series of another width than one value per agent (L2C's
    /mixing/weights, one column per edge; meta-L2C's /l2c/encoder): read them with h5py.
    """
    pandas = _pandas()
    path = resolve(path)
    with reading(path) as file:
        config = _config(file, path)
        attributes = {k: _plain(v) for k, v in file.attrs.items() if k != "config"}
        series = row_series(file)
        rows = _rows(file, path, series)
        iteration = np.asarray(file["time/iteration"][:rows])
        arrays = {
            name: np.asarray(dataset[:rows])
            for name, dataset in series.items()
            if dataset.ndim == 1 or dataset.dims[1].label in ("agent", "")
        }
    agents = max((a.shape[1] for a in arrays.values() if a.ndim == 2), default=0)
    per_agent = {
        "iteration": np.repeat(iteration, agents),
        "agent": np.tile(np.arange(agents), rows),
        **{name: a.reshape(-1) for name, a in sorted(arrays.items()) if a.ndim == 2},
    }
    scalars = {
        "iteration": iteration,
        **{name: a for name, a in sorted(arrays.items()) if a.ndim == 1},
    }
    return RunFrames(
        agents=pandas.DataFrame(per_agent),
        scalars=pandas.DataFrame(scalars),
        config=config,
        attributes=attributes,
        complete=bool(attributes.get("complete", False)),
    )
