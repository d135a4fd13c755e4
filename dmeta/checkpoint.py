"""Checkpoints: all a run needs to continue exactly where it stopped, on any number of ranks.

A checkpoint is one HDF5 file next to the run file, `<run file>.ckpt`. It holds the state the
run's algorithm declares: every agent's rows (launch model, optimizer moments and step count,
whatever the algorithm names; one row per agent, whatever rank held it) under `agents/`, the
state shared by all agents under `shared/`, what the metrics window has accumulated since the
last logged row, the iteration counter and the number of rows the run file holds. Random
numbers need nothing more: they are a function of (seed, agent, iteration), so the iteration
counter is every agent's generator state. Ranks send their rows to rank 0 one rank at a time
(it never holds every agent's rows), which writes `<checkpoint>.tmp` and renames it over the
old checkpoint, so a checkpoint on disk is always whole. On resume every rank reads only its
own agents' rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dmeta import swmr
from dmeta.config import Config, numbers_only
from dmeta.errors import DmetaError, OutputError
from dmeta.exchange import Exchange, RowWriter
from dmeta.output import abandon_file, partial_path, write_failure

FORMAT = 2


def checkpoint_path(run_path: Path) -> Path:
    """Where the checkpoint of the run file `run_path` lives."""
    run_path = Path(run_path)
    return run_path.with_name(run_path.name + ".ckpt")


@dataclass
class Snapshot:
    """A rank's share of a checkpoint: its agents' rows and the run's counters."""

    iteration: int
    rows: int
    agent_rows: dict[str, np.ndarray] = field(default_factory=dict)  # [local agents, ...]
    shared: dict[str, np.ndarray] = field(default_factory=dict)  # the same on every rank
    window_rows: dict[str, np.ndarray] = field(default_factory=dict)  # [local agents]
    window_steps: int = 0


def _differences(left: dict[str, Any], right: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = []
    for key in sorted(left.keys() | right.keys()):
        a, b = left.get(key), right.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return keys


def save_checkpoint(path: Path, snapshot: Snapshot, exchange: Exchange, config: Config) -> None:
    """Write the checkpoint (a collective call): every rank's rows stream to rank 0, one rank's
    at a time, into `<checkpoint>.tmp`, renamed over the old checkpoint once whole."""
    staging = _Staging(path) if exchange.rank == 0 else None
    # All ranks synchronise here: per-agent arrays pass to rank 0 in a fixed order; rank 0
    # receives them all even after a failed write, so that no rank waits for ever.
    for group, arrays in (("agents", snapshot.agent_rows), ("window", snapshot.window_rows)):
        for name in sorted(arrays):
            rows = np.ascontiguousarray(arrays[name])
            write = staging.rows(f"{group}/{name}", config.agents, rows) if staging else None
            exchange.rows_to_root(rows, write)
    if staging is not None:
        attributes = {
            "format": FORMAT,
            "config": config.to_json(),
            "iteration": snapshot.iteration,
            "rows": snapshot.rows,
            "num_agents": config.agents,
            "window_steps": snapshot.window_steps,
        }
        staging.commit(attributes, snapshot.shared)


class _Staging:
    """Rank 0's `<checkpoint>.tmp`. After a failed file operation the later ones are skipped,
    so that rank 0 goes on receiving every rank's rows; `commit` raises the failure."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temporary = path.with_name(path.name + ".tmp")
        self.file: h5py.File | None = None
        self.error: OSError | RuntimeError | None = None
        try:
            self.file = h5py.File(self.temporary, "w")
        except (OSError, RuntimeError) as error:
            self.error = error

    def rows(self, name: str, agents: int, rows: np.ndarray) -> RowWriter:
        """The writer of dataset `name` [agents, ...] (rows_to_root's `write`)."""
        dataset = None
        if self.error is None:
            try:
                dataset = self.file.create_dataset(name, (agents, *rows.shape[1:]), rows.dtype)
            except (OSError, RuntimeError) as error:
                self.error = error

        def write(first: int, block: np.ndarray) -> None:
            if self.error is None:
                try:
                    dataset[first : first + len(block)] = block
                except (OSError, RuntimeError) as error:
                    self.error = error

        return write

    def commit(self, attributes: dict[str, object], shared: dict[str, np.ndarray]) -> None:
        """The attributes and shared state, then the rename; OutputError on any failure."""
        if self.error is None:
            try:
                self.file.attrs.update(attributes)
                for name, value in shared.items():
                    self.file.create_dataset(f"shared/{name}", data=value)
                self.file.close()
                # The rename is the commit: a crash before it keeps the previous checkpoint.
                os.replace(self.temporary, self.path)
                return
            except (OSError, RuntimeError) as error:
                self.error = error
        abandon_file(self.file, self.error)  # closing a file whose write failed crashes HDF5
        self.temporary.unlink(missing_ok=True)
        kept = f"; the checkpoint {self.path} of before is kept" if self.path.exists() else ""
        raise OutputError(f"{write_failure(self.error, self.temporary)}{kept}") from None


def check_checkpoint(path: Path, config: Config) -> int:
    """The iteration of a usable checkpoint for `config`; DmetaError if it is not usable."""
    try:
        with h5py.File(path, "r") as file:
            attributes = dict(file.attrs)
            has_models = isinstance(file.get("agents"), h5py.Group)
    except OSError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DmetaError(
            f"checkpoint {path} is corrupt ({reason}); delete it or pass --restart"
        ) from None
    required = {"format", "config", "iteration", "rows", "num_agents", "window_steps"}
    if not required <= attributes.keys() or not has_models:
        raise DmetaError(f"checkpoint {path} is incomplete; delete it or pass --restart")
    if int(attributes["format"]) != FORMAT:
        raise DmetaError(
            f"checkpoint {path} has format {attributes['format']}, this dmeta reads {FORMAT}"
        )
    if int(attributes["num_agents"]) != config.agents:
        raise DmetaError(
            f"checkpoint {path} holds {attributes['num_agents']} agents but the config has "
            f"{config.agents}; resume with the checkpoint's config or pass --restart"
        )
    saved = numbers_only(str(attributes["config"]))
    differing = _differences(saved, numbers_only(config.to_json()))
    if differing:
        raise DmetaError(
            f"checkpoint {path} was written with another config (differs in "
            f"{', '.join(differing)}); resume with the same config or pass --restart"
        )
    iteration = int(attributes["iteration"])
    if not 0 < iteration < config.iterations:
        raise DmetaError(
            f"checkpoint {path} is at iteration {iteration}, outside the run's 1..."
            f"{config.iterations - 1}; delete it or pass --restart"
        )
    return iteration


def _datasets(file: h5py.File, group: str) -> dict[str, h5py.Dataset]:
    """The datasets under `group` by their path below it ("optimizer/exp_avg")."""
    found: dict[str, h5py.Dataset] = {}
    if group in file:
        file[group].visititems(
            lambda name, item: (
                found.__setitem__(name, item) if isinstance(item, h5py.Dataset) else None
            )
        )
    return found


def load_checkpoint(path: Path, agents: np.ndarray) -> Snapshot:
    """The rows of `agents` (global ids, contiguous) and the counters of a checked checkpoint."""
    rows = slice(int(agents[0]), int(agents[-1]) + 1)
    with h5py.File(path, "r") as file:
        return Snapshot(
            iteration=int(file.attrs["iteration"]),
            rows=int(file.attrs["rows"]),
            agent_rows={name: item[rows] for name, item in _datasets(file, "agents").items()},
            shared={name: item[()] for name, item in _datasets(file, "shared").items()},
            window_rows={name: item[rows] for name, item in _datasets(file, "window").items()},
            window_steps=int(file.attrs["window_steps"]),
        )


def decide_resume(run_path: Path, config: Config, mode: str) -> bool:
    """Whether to resume the run writing `run_path`: mode "auto" resumes when a checkpoint and
    the unfinished run file exist, "resume" insists on it, "restart" never resumes. Raises
    DmetaError when the checkpoint cannot continue this run."""
    checkpoint = checkpoint_path(run_path)
    if mode == "restart":
        return False
    if not checkpoint.exists():
        if mode == "resume":
            raise DmetaError(f"--resume: there is no checkpoint {checkpoint}")
        return False
    partial = partial_path(Path(run_path))
    if not partial.exists():
        raise DmetaError(
            f"checkpoint {checkpoint} exists but its run file {partial} does not; "
            "pass --restart to start over"
        )
    check_checkpoint(checkpoint, config)
    with h5py.File(checkpoint, "r") as file:
        rows = int(file.attrs["rows"])
    check_partial(partial, rows)
    return True


def _open_unfinished(partial: Path) -> h5py.File:
    """Open the unfinished run file of a stopped or killed run to read. One whose writer was
    killed outside SWMR mode (setting the file up or writing its final datasets) is marked as
    open for writing, which even SWMR readers refuse: it is recovered first (every rank may
    do so: the same bytes)."""
    try:
        return swmr.open_for_reading(partial)
    except OSError as error:
        if not swmr.being_written(error):
            raise
    swmr.recover(partial)
    return swmr.open_for_reading(partial)


def check_partial(partial: Path, rows: int) -> None:
    """DmetaError unless the unfinished run file `partial` is readable and holds the `rows`
    logged rows a checkpoint counts (checked on every rank before a resumed run starts)."""
    restart = "the checkpoint cannot continue without it; pass --restart to start over"
    try:
        with _open_unfinished(partial) as file:
            iteration = file.get("time/iteration")
            held = iteration.shape[0] if isinstance(iteration, h5py.Dataset) else -1
    except OSError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DmetaError(
            f"the unfinished run file {partial} is unreadable ({reason}); {restart}"
        ) from None
    if held < rows:
        found = "no /time/iteration" if held < 0 else f"{held} rows"
        raise DmetaError(
            f"the unfinished run file {partial} holds {found}, but the checkpoint counts {rows}; "
            f"{restart}"
        )
