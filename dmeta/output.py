"""The HDF5 run file: one row per logged step, per-agent metrics, topology and parameters.

Two writers make the same file behind one interface (`open_writer`):
- `SerialWriter` (the default): every rank buffers its agents' values; at each flush one gather
  brings the buffered rows to rank 0, which writes them with serial h5py (the PyPI wheel);
- `ParallelWriter`: every rank opens the file with `driver='mpio'`, makes each structural change
  (creating, resizing) together with the others, and writes its own agents' columns with a
  collective write; it needs h5py built against MPI (`h5py.get_config().mpi`).
Rows are buffered and flushed every `output.flush_every` logged rows, and the file is flushed
to disk after each flush, so a killed run leaves a readable file holding every row up to the
last flush, every series of the same length. The file is written as `<path>.partial` and
renamed to `<path>` only when the run completes, so a file under the final name is always a
whole run; a file already under that name (`dmeta run --overwrite`) is replaced only then.

The serial writer's file can be read while the run goes on (`dmeta.swmr`): once the header
datasets are written (`live`), it is in HDF5's SWMR mode, where rows are appended and flushed
but no object is created; the final datasets are written after closing it and reopening it
out of SWMR mode. The parallel writer's file (MPI-IO, which has no SWMR mode) can be read only
once the run has stopped.

A write that fails (a full disk, a quota) raises `OutputError` naming the file and its folder.
HDF5 cannot close a file after a failed write (it crashes), so the file is left open and
abandoned as it is: the `.partial` keeps whatever its last successful flush wrote.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np

from dmeta import swmr
from dmeta.errors import DmetaError, OutputError
from dmeta.exchange import AgentLayout, Exchange

# Root attributes that keep the first launch's value when a run is resumed.
KEPT_ON_RESUME = ("started_at",)

# Every row-wise dataset: path -> (one value per agent?, units, meaning). Row r of each holds
# the values at iteration /time/iteration[r], which is their dimension scale.
SERIES = {
    "time/wall": (False, "s", "wall-clock seconds since the first iteration started"),
    "time/compute": (
        False,
        "s",
        "seconds rank 0 spent iterating outside the combination step since the previous row",
    ),
    "time/log": (
        False,
        "s",
        "seconds rank 0 spent evaluating this row's metrics (validation, centroid, stationarity)",
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
        "||w_k - w_c||^2, w_c = sum_k p_k w_k the network centroid (p the Perron vector of A; "
        "1/K when A is doubly stochastic; /topology attribute `centroid` says which)",
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
        "<g_a, g_b>, g_a and g_b the meta-gradients (eq. 4) at the centroid w_c averaged (with "
        "the centroid's weights p_k) over "
        "two disjoint halves of the fixed stationarity tasks of every agent: an unbiased "
        "estimate of ||grad J(w_c)||^2 (Theorem 2), negative when the true value lies below "
        "the sampling noise",
    ),
    "centroid/stationarity_noise": (
        False,
        "squared parameter units",
        "||g_a - g_b||^2 / 4: the sampling variance of the task-averaged meta-gradient, i.e. "
        "how far below it centroid/stationarity cannot resolve",
    ),
    "centroid/disagreement": (
        False,
        "squared parameter units",
        "(1/K) sum_k ||w_k - w_c||^2 (Theorem 1)",
    ),
    "comm/bytes": (
        True,
        "bytes",
        "bytes of model data sent to other ranks for this agent's combination steps since the "
        "previous row: its row of the rank block once per neighbour rank (neighbour backend), "
        "its share of a bandwidth-optimal all-reduce, 2 (P - 1) / P x model bytes per rank "
        "(centralized), 0 within one process",
    ),
}


def _create_layout(
    file: h5py.File, num_agents: int, attributes: dict[str, Any], schema: RowSchema
) -> None:
    """The root attributes and every empty row-wise dataset, with /time/iteration as scale."""
    for key, value in attributes.items():
        file.attrs[key] = value
    file.attrs["complete"] = False
    iteration = file.create_dataset(
        "time/iteration", (0,), maxshape=(None,), dtype="i8", chunks=(256,)
    )
    iteration.attrs["units"] = "iterations"
    iteration.attrs["description"] = "iteration index i of each logged row"
    iteration.make_scale("iteration")
    for name, (per_agent, unit, meaning) in schema.series.items():
        columns = schema.columns(name, num_agents)
        shape = (0, columns) if per_agent else (0,)
        chunk_rows = max(1, min(256, 65536 // max(1, columns)))
        dataset = file.create_dataset(
            name,
            shape,
            maxshape=(None, *shape[1:]),
            dtype="f8",
            chunks=(chunk_rows, max(1, columns)) if per_agent else (256,),
        )
        dataset.attrs["units"] = unit
        dataset.attrs["description"] = meaning
        dataset.dims[0].attach_scale(iteration)
        dataset.dims[0].label = "iteration"
        if per_agent:
            dataset.dims[1].label = per_agent.label if isinstance(per_agent, Columns) else "agent"


def partial_path(path: Path) -> Path:
    """Where the run file `path` lives until the run completes."""
    return path.with_name(path.name + ".partial")


def utc_now() -> str:
    """The current time in ISO 8601, UTC, to the second (e.g. 2026-11-27T09:30:00Z)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _recover(partial: Path) -> None:
    """Clear the "being written" mark of a killed writer's file (`swmr.recover`), or say why
    it cannot be cleared in one line."""
    try:
        swmr.recover(partial)
    except OSError as error:
        raise DmetaError(f"cannot reopen {partial} to resume: {error}") from None


def _reopen(
    partial: Path,
    rows: int,
    attributes: dict[str, Any],
    schema: RowSchema,
    options: dict[str, Any],
) -> h5py.File:
    """Open an unfinished run file to continue it: every series cut to `rows` rows (rows a
    killed run wrote after its last checkpoint are written again), the attributes of this
    launch (hosts, layout, versions, command line) replacing the old ones except
    `KEPT_ON_RESUME`, and the resume recorded. `options` go to h5py.File (driver, libver)."""
    try:
        file = h5py.File(partial, "a", locking=False, **options)
    except OSError as error:
        raise DmetaError(f"cannot reopen {partial} to resume: {error}") from None
    for name in ["time/iteration", *schema.series]:
        if name not in file:
            file.close()
            raise DmetaError(f"{partial} has no /{name}: it was not written by this run's task")
        file[name].resize(rows, axis=0)
    # A run killed during its final writes resumes at its last checkpoint: those come again.
    for name in ("final", "params/final"):
        if name in file:
            del file[name]
    resumed = [int(r) for r in file.attrs.get("resumed_at_row", [])]
    for key, value in attributes.items():
        if key not in KEPT_ON_RESUME or key not in file.attrs:
            file.attrs[key] = value
    file.attrs["resumed_at_row"] = np.array([*resumed, rows], dtype=np.int64)
    return file


def _prepare_path(path: Path) -> None:
    """Make the folder of the run file. A file already under the final name stays there until
    the new run completes and replaces it (the command line refuses without --overwrite)."""
    partial = partial_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DmetaError(f"cannot create output file {partial}: {error}") from None


# HDF5 reports the failed writes of a file it cannot flush again while freeing each of its
# objects (h5py prints those tracebacks through sys.excepthook and sys.unraisablehook); they
# repeat the error that the failed write raises.
_hooks: dict[str, Any] = {}
_hdf5_broken = False  # a real HDF5 write failed here: HDF5 would crash when it shuts down


def _write_noise(error: BaseException | None) -> bool:
    return isinstance(error, (OSError, RuntimeError)) and "file write failed" in str(error)


def _quiet_unraisable(unraisable: Any) -> None:
    if not _write_noise(unraisable.exc_value):
        _hooks["unraisablehook"](unraisable)


def _quiet_excepthook(kind: type, error: BaseException, trace: Any) -> None:
    if not _write_noise(error):
        _hooks["excepthook"](kind, error, trace)


def quiet_hdf5_write_noise() -> None:
    """Drop h5py's repeats of a failed write from the objects HDF5 frees afterwards."""
    if not _hooks:
        _hooks.update(unraisablehook=sys.unraisablehook, excepthook=sys.excepthook)
        sys.unraisablehook = _quiet_unraisable
        sys.excepthook = _quiet_excepthook


def hdf5_unusable() -> bool:
    """Whether HDF5 failed a write in this process: it would crash at exit, so end the process
    with os._exit once the error is reported."""
    return _hdf5_broken


def write_failure(error: BaseException, path: Path) -> OutputError:
    """The one-line error of a failed write of `path`: names the file, and the disk when full."""
    text = str(error)
    code = getattr(error, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or "errno = 28" in text or "No space" in text
    folder = Path(path).parent if str(Path(path).parent) else Path(".")
    if full:
        return OutputError(
            f"cannot write {path}: the disk holding {folder} is full (no space left on "
            "device); free space there or choose another --out"
        )
    reason = getattr(error, "strerror", None) or (text.splitlines()[0] if text else repr(error))
    return OutputError(f"cannot write {path} ({reason}); check the disk holding {folder}")


def abandon_file(file: h5py.File | None, error: BaseException) -> None:
    """Leave an HDF5 file whose write failed open for good: closing or freeing it would make
    HDF5 flush it again and crash. The process closes the descriptor when it ends."""
    global _hdf5_broken
    quiet_hdf5_write_noise()
    _hdf5_broken = _hdf5_broken or "write failed" in str(error) or isinstance(error, RuntimeError)
    if file is not None and file.id.valid:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(file.id))


@contextlib.contextmanager
def guarded_write(file: h5py.File | None, path: Path) -> Iterator[None]:
    """Turn a failed HDF5 or file-system write into `OutputError`, abandoning the file."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        abandon_file(file, error)
        raise write_failure(error, path) from None


@dataclass(frozen=True)
class Columns:
    """A per-agent series of `counts[k]` values for agent k (e.g. one per edge into k), stored
    as one [T, sum_k counts[k]] dataset whose columns run agent by agent. A rank appends its
    agents' values as [local agents, max counts], agent k's first counts[k] entries valid."""

    counts: np.ndarray  # [K] int
    label: str = "edge"

    @property
    def width(self) -> int:
        return int(self.counts.max(initial=0))

    def valid(self, agents: slice) -> np.ndarray:
        """[agents, width]: which entries of the agents' rows are stored."""
        return np.arange(self.width) < self.counts[agents, None]

    def span(self, agents: slice) -> slice:
        """The dataset columns of `agents` (contiguous agent ids)."""
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        return slice(int(starts[agents.start]), int(starts[agents.stop]))


class RowSchema:
    """The row-wise series of one run: the common `SERIES` and a task's or an algorithm's own
    (e.g. the linear representation task's distance to B*), split into per-agent and scalar
    ones. A per-agent series holds one value per agent, or `Columns` values."""

    def __init__(self, extra: dict[str, tuple[bool | Columns, str, str]] | None = None) -> None:
        self.series = {**SERIES, **(extra or {})}
        self.per_agent = [name for name, (per_agent, _, _) in self.series.items() if per_agent]
        self.scalar = [name for name, (per_agent, _, _) in self.series.items() if not per_agent]
        widths = [self.width(name) for name in self.per_agent]
        starts = np.concatenate([[0], np.cumsum(widths)]).astype(int)
        # Where each per-agent series lies in a buffered row [local agents, sum of widths].
        self.offsets = {
            name: slice(int(starts[j]), int(starts[j + 1])) for j, name in enumerate(self.per_agent)
        }

    def width(self, name: str) -> int:
        """Values a rank buffers per agent and row of the per-agent series `name`."""
        per_agent = self.series[name][0]
        return per_agent.width if isinstance(per_agent, Columns) else 1

    def columns(self, name: str, num_agents: int) -> int:
        """Columns of the per-agent series `name` in the file."""
        per_agent = self.series[name][0]
        return int(per_agent.counts.sum()) if isinstance(per_agent, Columns) else num_agents

    def stored(self, name: str, block: np.ndarray, agents: slice) -> np.ndarray:
        """[rows, columns of `agents`] of series `name` from a block [agents, rows, widths]."""
        part = block[:, :, self.offsets[name]]
        per_agent = self.series[name][0]
        if not isinstance(per_agent, Columns):
            return part[:, :, 0].T
        return np.moveaxis(part, 0, 1)[:, per_agent.valid(agents)]

    def span(self, name: str, agents: slice) -> slice:
        """The file columns of `agents` in the per-agent series `name`."""
        per_agent = self.series[name][0]
        return per_agent.span(agents) if isinstance(per_agent, Columns) else agents


class RowBuffer:
    """Logged rows held in memory until the next flush: rank 0's scalars, a rank's agents."""

    def __init__(self, num_local: int, schema: RowSchema) -> None:
        self.num_local = num_local
        self.schema = schema
        self.iterations: list[int] = []
        self.scalars: list[list[float]] = []
        self.agents: list[np.ndarray] = []

    def add(self, iteration: int, scalars: dict[str, float], agents: dict[str, Any]) -> None:
        schema = self.schema
        missing = (set(schema.scalar) - scalars.keys()) | (set(schema.per_agent) - agents.keys())
        if missing:
            raise ValueError(f"row of iteration {iteration} lacks {sorted(missing)}")
        self.iterations.append(iteration)
        self.scalars.append([float(scalars[name]) for name in schema.scalar])
        self.agents.append(
            np.concatenate(
                [
                    np.asarray(agents[name], dtype=np.float64).reshape(
                        self.num_local, schema.width(name)
                    )
                    for name in schema.per_agent
                ],
                axis=1,
            )
        )

    def __len__(self) -> int:
        return len(self.iterations)

    def agent_block(self) -> np.ndarray:
        """[local agents, rows, per-agent values]: agent-major, ready to gather by agent."""
        return np.ascontiguousarray(np.stack(self.agents, axis=1))

    def clear(self) -> None:
        self.iterations, self.scalars, self.agents = [], [], []


class RunWriter(Protocol):
    """What the runner calls on every rank; `open_writer` picks the implementation."""

    def append(self, iteration: int, scalars: dict[str, float], agents: dict[str, Any]) -> None:
        """One logged row: rank 0's scalar series and this rank's per-agent values [local]."""

    def write_global(self, name: str, data: np.ndarray, **attributes: Any) -> None:
        """A dataset that every rank knows whole, written once (e.g. the graph's edges)."""

    def write_agents(self, name: str, rows: np.ndarray, **attributes: Any) -> None:
        """A dataset with one row per agent, each rank passing its own agents' rows."""

    def set_attributes(self, name: str, **attributes: Any) -> None:
        """Attributes of the group or dataset `name` (e.g. /topology's lambda2; a missing name
        becomes a group), the same on every rank."""

    def live(self) -> None:
        """The header is written: let readers follow the rows from now on, if the file can."""

    def finish(self) -> None:
        """Write what is buffered, mark the run complete and give the file its final name."""

    def flush(self) -> None:
        """Write the buffered rows now (a collective call)."""

    def close(self) -> None:
        """Close the unfinished file after a flush, for a later resume (a collective call)."""

    def abandon(self) -> None:
        """Give up after a failure; the `.partial` file stays, never under the final name."""


class _BufferedRows:
    """Appending: rows go to a `RowBuffer` and are written out every `flush_every` rows."""

    def __init__(self, num_local: int, flush_every: int, schema: RowSchema) -> None:
        self.schema = schema
        self.buffer = RowBuffer(num_local, schema)
        self.flush_every = flush_every
        self.rows = 0

    def append(self, iteration: int, scalars: dict[str, float], agents: dict[str, Any]) -> None:
        self.buffer.add(iteration, scalars, agents)
        if len(self.buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows (a collective call)."""
        if len(self.buffer):
            self._write_rows(self.rows)
            self.rows += len(self.buffer)
            self.buffer.clear()

    def _write_rows(self, start: int) -> None:
        raise NotImplementedError


def _extend(
    file: h5py.File,
    schema: RowSchema,
    start: int,
    iterations: list[int],
    scalars: np.ndarray | None,
) -> None:
    """Grow every series to `start + rows` rows; write the iterations and scalar series."""
    rows = len(iterations)
    for name in ["time/iteration", *schema.series]:
        file[name].resize(start + rows, axis=0)
    if scalars is not None:
        file["time/iteration"][start:] = iterations
        for column, name in enumerate(schema.scalar):
            file[name][start:] = scalars[:, column]


# The serial writer's chunk cache. Each rank's rows arrive as a column slice of every per-agent
# series, whose chunks span all K columns (8 MB at K = 10^6): a cache that holds the series'
# current chunks (HDF5's default is 1 MiB) writes them once per flush instead of once per rank
# (one series at K = 10^6, three flushes of 10 rows in 64 rank slices: 0.17 s, against 5.1 s
# with the default cache).
CHUNK_CACHE_BYTES = 128 * 2**20


def _serial_options() -> dict[str, Any]:
    """The serial writer's h5py.File options, read when a file opens (swmr.LIBVER may vary)."""
    return {"libver": swmr.LIBVER, "rdcc_nbytes": CHUNK_CACHE_BYTES}


class SerialWriter(_BufferedRows):
    """Rank 0 writes with serial h5py; the other ranks send it their agents' rows, one rank at
    a time (rank 0 never holds every agent's rows)."""

    def __init__(
        self,
        path: Path,
        exchange: Exchange,
        num_agents: int,
        num_local: int,
        attributes: dict[str, Any],
        flush_every: int,
        schema: RowSchema,
        resume_rows: int | None = None,
    ) -> None:
        super().__init__(num_local, flush_every, schema)
        self.path = Path(path)
        self.exchange = exchange
        self.num_agents = num_agents
        self.file: h5py.File | None = None
        self.partial = partial_path(self.path)
        self.swmr_format = True  # whether the file's format allows SWMR mode
        if exchange.rank != 0:
            self.rows = resume_rows or 0
            return
        if resume_rows is None:
            _prepare_path(self.path)
            quiet_hdf5_write_noise()
            try:
                self.file = h5py.File(self.partial, "w", **_serial_options())
            except OSError as error:
                raise DmetaError(f"cannot create output file {self.partial}: {error}") from None
            with self._guard():
                _create_layout(self.file, num_agents, attributes, schema)
        else:
            _recover(self.partial)
            # A run begun by the parallel writer has a format without SWMR: it stays so.
            self.swmr_format = swmr.superblock(self.partial)[0] >= 3
            self.file = _reopen(self.partial, resume_rows, attributes, schema, _serial_options())
            self.rows = resume_rows

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """A failed write: OutputError, and the file abandoned (never closed) from then on."""
        try:
            with guarded_write(self.file, self.partial):
                yield
        except OutputError:
            self.file = None
            raise

    def _write_rows(self, start: int) -> None:
        scalars = np.array(self.buffer.scalars)
        failure = self._attempt(
            lambda: _extend(self.file, self.schema, start, self.buffer.iterations, scalars)
        )

        def write(first: int, block: np.ndarray) -> None:
            if self.file is not None:
                agents = slice(first, first + len(block))
                with self._guard():
                    for name in self.schema.per_agent:
                        columns = self.schema.span(name, agents)
                        self.file[name][start:, columns] = self.schema.stored(name, block, agents)

        # All ranks synchronise here: every rank's buffered per-agent values pass to rank 0.
        self.exchange.rows_to_root(self.buffer.agent_block(), write)
        if failure is not None:
            raise failure
        if self.file is not None:
            with self._guard():
                self.file.flush()

    def _attempt(self, operation: Callable[[], object]) -> OutputError | None:
        """`operation` on rank 0's file under `_guard`, its OutputError returned, not raised:
        rank 0 must still take the other ranks' rows (rows_to_root) before it raises."""
        if self.file is None:
            return None
        try:
            with self._guard():
                operation()
        except OutputError as error:
            return error
        return None

    def live(self) -> None:
        """Switch the file to SWMR mode (readers open it with `swmr=True`), unless its format
        has none."""
        if self.file is not None and self.swmr_format:
            with self._guard():
                self.file.swmr_mode = True

    def _structural(self) -> h5py.File:
        """The file, out of SWMR mode (closed and reopened) so that objects can be created."""
        if self.file.swmr_mode:
            self.file.close()
            self.file = h5py.File(self.partial, "a", locking=False, **_serial_options())
        return self.file

    def write_global(self, name: str, data: np.ndarray, **attributes: Any) -> None:
        if self.file is not None:
            with self._guard():
                dataset = self._structural().create_dataset(name, data=data)
                dataset.attrs.update(attributes)

    def write_agents(self, name: str, rows: np.ndarray, **attributes: Any) -> None:
        rows = np.ascontiguousarray(rows)

        def create() -> None:
            shape = (self.num_agents, *rows.shape[1:])
            dataset = self._structural().create_dataset(name, shape, rows.dtype)
            dataset.attrs.update(attributes)

        failure = self._attempt(create)

        def write(first: int, block: np.ndarray) -> None:
            if self.file is not None:
                with self._guard():
                    self.file[name][first : first + len(block)] = block

        # All ranks synchronise here: every rank's rows pass to rank 0, one rank at a time.
        self.exchange.rows_to_root(rows, write)
        if failure is not None:
            raise failure

    def set_attributes(self, name: str, **attributes: Any) -> None:
        """Attributes of the group or dataset `name` (created as a group when missing)."""
        if self.file is not None:
            with self._guard():
                _node(self._structural(), name).attrs.update(attributes)

    def finish(self) -> None:
        self.flush()
        if self.file is not None:
            with self._guard():
                self._structural().attrs.update(complete=True, finished_at=utc_now())
                self.file.close()
            try:
                os.replace(self.partial, self.path)
            except OSError as error:
                raise write_failure(error, self.path) from None

    def close(self) -> None:
        self.flush()
        if self.file is not None:
            with self._guard():
                self.file.close()

    def abandon(self) -> None:
        if self.file is not None and self.file.id.valid:
            self.file.close()


class ParallelWriter(_BufferedRows):
    """Every rank writes its own agents' columns into one file opened with the MPI-IO driver."""

    def __init__(
        self,
        path: Path,
        comm: Any,
        layout: AgentLayout,
        attributes: dict[str, Any],
        flush_every: int,
        schema: RowSchema,
        resume_rows: int | None = None,
    ) -> None:
        rank = comm.Get_rank()
        super().__init__(int(layout.counts[rank]), flush_every, schema)
        self.path = Path(path)
        self.comm = comm
        self.rank = rank
        first = int(layout.offsets[rank])
        self.mine = slice(first, first + self.buffer.num_local)
        self.partial = partial_path(self.path)
        if resume_rows is not None:
            if rank == 0:
                _recover(self.partial)  # a run begun by the serial writer and killed
            # All ranks synchronise here: no rank opens the file before it is recovered.
            comm.Barrier()
            # Structural changes are collective: every rank makes the same calls in order.
            self.file = _reopen(
                self.partial, resume_rows, attributes, schema, {"driver": "mpio", "comm": comm}
            )
            self.rows = resume_rows
            return
        error = None
        if rank == 0:
            try:
                _prepare_path(self.path)
            except DmetaError as caught:
                error = str(caught)
        # All ranks synchronise here: the old file is out of the way before anyone opens.
        error = comm.bcast(error)
        if error:
            raise DmetaError(error)
        self.file = h5py.File(self.partial, "w", driver="mpio", comm=comm)
        _create_layout(self.file, layout.num_agents, attributes, schema)

    def _write_rows(self, start: int) -> None:
        scalars = np.array(self.buffer.scalars) if self.rank == 0 else None
        # All ranks synchronise here: resizing is collective; rank 0 writes the scalar series.
        _extend(self.file, self.schema, start, self.buffer.iterations, scalars)
        block = self.buffer.agent_block()
        for name in self.schema.per_agent:
            dataset = self.file[name]
            with dataset.collective:
                dataset[start:, self.schema.span(name, self.mine)] = self.schema.stored(
                    name, block, self.mine
                )
        self.file.flush()

    def write_global(self, name: str, data: np.ndarray, **attributes: Any) -> None:
        """A dataset known to every rank: created by all, its values written by rank 0."""
        dataset = self.file.create_dataset(name, shape=data.shape, dtype=data.dtype)
        dataset.attrs.update(attributes)
        if self.rank == 0:
            dataset[...] = data

    def write_agents(self, name: str, rows: np.ndarray, **attributes: Any) -> None:
        """One row per agent: created by all ranks, each rank writing its own rows."""
        shape = (self.comm.allreduce(len(rows)), *rows.shape[1:])
        dataset = self.file.create_dataset(name, shape=shape, dtype=rows.dtype)
        dataset.attrs.update(attributes)
        with dataset.collective:
            dataset[self.mine] = rows

    def set_attributes(self, name: str, **attributes: Any) -> None:
        """Attributes of the group or dataset `name`, set by every rank alike (collective)."""
        _node(self.file, name).attrs.update(attributes)

    def live(self) -> None:
        """Nothing: HDF5 has no SWMR mode with MPI-IO; the file is readable once closed."""

    def finish(self) -> None:
        self.flush()
        # All ranks synchronise here: attributes are written collectively, with equal values.
        self.file.attrs.update(complete=True, finished_at=self.comm.bcast(utc_now()))
        self.file.close()
        # All ranks synchronise here: every rank has closed before rank 0 renames.
        self.comm.Barrier()
        if self.rank == 0:
            os.replace(self.partial, self.path)

    def close(self) -> None:
        self.flush()
        self.file.close()

    def abandon(self) -> None:
        """Nothing: closing is collective, and the failing job is about to be aborted."""


def _node(file: h5py.File, name: str) -> h5py.Group | h5py.Dataset:
    """The object at `name`: an existing dataset or group, else a new group."""
    return file[name] if name in file else file.require_group(name)


def parallel_hdf5_available() -> bool:
    """Whether this h5py was built with MPI (needed by `ParallelWriter`)."""
    return bool(h5py.get_config().mpi)


def open_writer(
    kind: str,
    path: Path,
    comm: Any,
    exchange: Exchange,
    layout: AgentLayout,
    attributes: dict[str, Any],
    flush_every: int,
    schema: RowSchema | None = None,
    resume_rows: int | None = None,
) -> RunWriter:
    """The writer `kind` ("serial" or "parallel"); a collective call on every rank.

    `schema` names the row-wise series (default: the common `SERIES`). With `resume_rows`,
    reopen the unfinished `<path>.partial` and cut every series to that many rows (those a
    checkpoint counts) instead of creating the file.
    """
    schema = schema or RowSchema()
    if kind == "parallel":
        return ParallelWriter(path, comm, layout, attributes, flush_every, schema, resume_rows)
    num_local = int(layout.counts[exchange.rank])
    return SerialWriter(
        path,
        exchange,
        layout.num_agents,
        num_local,
        attributes,
        flush_every,
        schema,
        resume_rows,
    )
