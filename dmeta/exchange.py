"""The exchange layer: rows sent along weighted directed edges, and reductions over agents.

One interface, `Exchange`, with two backends:
- `LocalExchange`: every agent in one process; a mix is an index and a segment sum;
- `MPIExchange`: agents in contiguous blocks over the ranks of a communicator (Dup'd here and
  freed by `close`); a mix sends, with one `Neighbor_alltoallv` on a distributed graph
  communicator, only the rows that lie on edges to other ranks, each once per receiving rank.

An edge set is given by global agent ids, `sources[e] -> destinations[e]`; `route` turns it
into this rank's view (which rows to send where, where each incoming edge reads its row), and
`mix(rows, route, weights)` computes, for every local agent k,

    out_k = sum over incoming edges e = (l -> k) of weights[e] * rows_l,

which is eq. (6b) with weights[e] = a[l, k]. `deliver(rows, route)` gives the rows themselves,
one per incoming edge [E_in, M] in the route's edge order, for algorithms that keep state per
edge (push-sum's running sums) instead of a weighted sum. The mix is a differentiable function
of the weights and the local rows (learned mixing weights need its gradient); rows received from
other ranks enter as constants. Incoming edges are summed in (destination, source) order on any
layout, so the mix of the same rows gives the same bits on any number of ranks (CPU).

This module knows nothing of algorithms; communicators are handed in by the entry point.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from dmeta.errors import DmetaError

# write(first agent id, rows [agents, ...]): where rank 0 puts one rank's rows (rows_to_root).
RowWriter = Callable[[int, np.ndarray], None]
# The tag of rows_to_root's messages (the run's communicator carries no other tagged message).
ROWS_TAG = 7
# Without gradients, `indexed_mix` takes the edges in slices of at most this many elements of
# [edges, M] (two such temporaries a slice, 256 MiB in float32): a dense graph of 10^4 agents
# (10^7 edges) would need tens of GB at once.
MIX_SLICE_ELEMENTS = 1 << 25
# On the CPU `segment_mix` multiplies MIX_COLUMNS columns at a time where the rows exceed
# MIX_TILE_BYTES and a destination has MIX_TILE_DEGREE incoming edges or more on average: the
# slice stays in the cache through the sparse product, and each output element sums its edges in
# the same order. On the 2-core machine (1761 columns, float32, one thread): 2560 agents with 32
# random in-neighbours 63 -> 33 ms, 640 with 64 10 -> 8.6 ms (the Erdos-Renyi p = 0.1 run's
# mix 12 -> 8.7 ms); slower below 32 neighbours (a ring: 8 -> 11 ms at 2560) or 2.5 MB of rows.
MIX_COLUMNS = 256
MIX_TILE_BYTES = 5 << 19  # 2.5 MiB
MIX_TILE_DEGREE = 32


class AgentLayout:
    """Agents 0..K-1 in contiguous blocks over ranks; block sizes differ by at most one."""

    def __init__(self, num_agents: int, size: int) -> None:
        if num_agents < size:
            raise DmetaError(
                f"{size} ranks but only {num_agents} agents: launch at most {num_agents} ranks "
                "or raise `agents`"
            )
        self.num_agents = num_agents
        self.size = size
        base, extra = divmod(num_agents, size)
        self.counts = np.array([base + (r < extra) for r in range(size)], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def agents(self, rank: int) -> np.ndarray:
        """Global ids of the agents hosted by `rank`."""
        return np.arange(self.offsets[rank], self.offsets[rank] + self.counts[rank])

    def owners(self, agents: np.ndarray) -> np.ndarray:
        """The rank hosting each agent of `agents` (global ids)."""
        return np.searchsorted(self.offsets, agents, side="right") - 1


@dataclass
class Route:
    """One rank's view of an edge set (see `Exchange.route`).

    `edges` indexes the global edge arrays: the incoming edges of this rank's agents, in
    (destination, source) order; `slots` says where each reads its row in [local rows;
    received rows]; `targets` is its local destination. `send_index` are the local rows sent,
    `send_counts[i]` of them to rank `destinations[i]` in turn, `receive_counts[i]` the rows
    received from rank `sources[i]`.
    `sends_per_agent` counts, per local agent, the other ranks its row goes to. `crow` are the
    CSR row pointers of `targets` (where each local destination's edges begin), built once.
    """

    edges: np.ndarray
    slots: torch.Tensor
    targets: torch.Tensor
    crow: torch.Tensor
    sources: list[int] = field(default_factory=list)
    destinations: list[int] = field(default_factory=list)
    send_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    send_counts: list[int] = field(default_factory=list)
    receive_counts: list[int] = field(default_factory=list)
    sends_per_agent: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _element_counts: dict[int, tuple[tuple[list[int], list[int]], ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def element_counts(self, width: int) -> tuple[tuple[list[int], list[int]], ...]:
        """MPI's (counts, displacements) of the rows sent and of those received, in elements
        of rows `width` wide: built once per width, not every exchange."""
        if width not in self._element_counts:
            sent = [rows * width for rows in self.send_counts]
            received = [rows * width for rows in self.receive_counts]
            self._element_counts[width] = (
                (sent, _displacements(sent)),
                (received, _displacements(received)),
            )
        return self._element_counts[width]

    def weights(self, weights: np.ndarray | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The weights of this rank's incoming edges, from global per-edge `weights`."""
        index = torch.as_tensor(self.edges, device=like.device)
        return torch.as_tensor(weights, device=like.device).to(like.dtype)[index]


class PendingMix:
    """A mix whose rows from other ranks may still be travelling: `wait` gives the result."""

    def __init__(self, finish: Callable[[], torch.Tensor]) -> None:
        self._finish = finish

    def wait(self) -> torch.Tensor:
        """[local agents, M]: the mix (eq. 6b), once the received rows are in."""
        return self._finish()


class Exchange(Protocol):
    """Rows along edges and reductions over all agents of a run, wherever they live."""

    rank: int
    size: int
    num_local: int
    layout: AgentLayout

    def route(self, sources: np.ndarray, destinations: np.ndarray) -> Route: ...

    def mix(self, rows: torch.Tensor, route: Route, weights: torch.Tensor) -> torch.Tensor: ...

    def start_mix(self, rows: torch.Tensor, route: Route, weights: torch.Tensor) -> PendingMix: ...

    def deliver(self, rows: torch.Tensor, route: Route) -> torch.Tensor: ...

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def rows_to_root(self, rows: np.ndarray, write: RowWriter | None) -> None: ...

    def allgather_object(self, value: Any) -> list[Any]: ...

    def close(self) -> None: ...


def _incoming(
    layout: AgentLayout, rank: int, sources: np.ndarray, destinations: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(edge ids into this rank in (destination, source) order, their sources, destinations)."""
    first, count = int(layout.offsets[rank]), int(layout.counts[rank])
    into = np.flatnonzero((destinations >= first) & (destinations < first + count))
    order = np.lexsort((sources[into], destinations[into]))
    edges = into[order]
    return edges, sources[edges], destinations[edges] - first


def _build_route(
    layout: AgentLayout, rank: int, sources: np.ndarray, destinations: np.ndarray, device
) -> Route:
    """The route of `rank`: what it receives, from whom, and what it sends to whom."""
    sources = np.asarray(sources, dtype=np.int64)
    destinations = np.asarray(destinations, dtype=np.int64)
    if sources.shape != destinations.shape:
        raise ValueError("sources and destinations must have the same length")
    first, count = int(layout.offsets[rank]), int(layout.counts[rank])
    edges, edge_sources, targets = _incoming(layout, rank, sources, destinations)
    local = (edge_sources >= first) & (edge_sources < first + count)
    # Remote rows arrive sorted by global id, hence grouped by owner rank in rank order.
    remote = np.unique(edge_sources[~local])
    slots = np.empty(len(edges), dtype=np.int64)
    slots[local] = edge_sources[local] - first
    slots[~local] = count + np.searchsorted(remote, edge_sources[~local])
    remote_owners = layout.owners(remote)
    source_ranks, receive_counts = np.unique(remote_owners, return_counts=True)

    outgoing = (sources >= first) & (sources < first + count)
    out_sources = sources[outgoing]
    out_owners = layout.owners(destinations[outgoing])
    leaving = out_owners != rank
    pairs = np.unique(np.stack([out_owners[leaving], out_sources[leaving]]), axis=1)
    # np.unique sorted the pairs by destination rank: the rows sent go out grouped by it.
    destination_ranks, send_counts = np.unique(pairs[0], return_counts=True)
    crow = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(np.bincount(targets, minlength=count), out=crow[1:])
    return Route(
        edges=edges,
        slots=torch.as_tensor(slots, device=device),
        targets=torch.as_tensor(targets, device=device),
        crow=torch.as_tensor(crow, device=device),
        sources=[int(r) for r in source_ranks],
        destinations=[int(s) for s in destination_ranks],
        send_index=torch.as_tensor(pairs[1] - first, device=device),
        send_counts=[int(c) for c in send_counts],
        receive_counts=[int(c) for c in receive_counts],
        sends_per_agent=np.bincount(pairs[1] - first, minlength=count).astype(np.float64),
    )


def segment_mix(
    rows: torch.Tensor,
    slots: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    count: int,
    crow: torch.Tensor,
) -> torch.Tensor:
    """out[k] = sum_e weights[e] rows[slots[e]] over the edges e with targets[e] = k (eq. 6b).

    `targets` is sorted (a route's edges are in destination order); `crow` are its CSR row
    pointers (`Route.crow`). Without gradients this is a sparse (CSR) product, E x M
    multiply-adds with no [E, M] temporary (`_csr_product`); with gradients (the weights or rows
    require them: learned mixing) `indexed_mix`, which autograd differentiates. Both sum each
    destination's edges in the route's order.
    """
    if torch.is_grad_enabled() and (weights.requires_grad or rows.requires_grad):
        return indexed_mix(rows, slots, targets, weights, count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        matrix = torch.sparse_csr_tensor(
            crow, slots, weights.to(rows.dtype), size=(count, rows.shape[0])
        )
    return _csr_product(matrix, rows, len(slots))


def _csr_product(matrix: torch.Tensor, rows: torch.Tensor, edges: int) -> torch.Tensor:
    """matrix @ rows; on the CPU, for many edges over large rows, MIX_COLUMNS columns at a time
    (each element sums its edges in the same order: the same bits)."""
    count, width = matrix.shape[0], rows.shape[1]
    large = rows.element_size() * rows.numel() > MIX_TILE_BYTES and width > MIX_COLUMNS
    if rows.device.type != "cpu" or not large or edges < MIX_TILE_DEGREE * count:
        return matrix @ rows
    out = rows.new_empty((count, width))
    for first in range(0, width, MIX_COLUMNS):
        columns = slice(first, first + MIX_COLUMNS)
        out[:, columns] = matrix @ rows[:, columns].contiguous()
    return out


def indexed_mix(
    rows: torch.Tensor,
    slots: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    count: int,
) -> torch.Tensor:
    """`segment_mix` as an index and a segment sum: what autograd differentiates (one [E, M]
    temporary), and what a CUDA graph captures (cuSPARSE's product may allocate in ways a
    capture does not allow; without gradients the edges go in slices of MIX_SLICE_ELEMENTS, in
    order: the same bits on the CPU). On a GPU the segment sum adds in no fixed order."""
    dtype = torch.promote_types(rows.dtype, weights.dtype)
    out = torch.zeros((count, rows.shape[1]), dtype=dtype, device=rows.device)
    if torch.is_grad_enabled() and (weights.requires_grad or rows.requires_grad):
        return out.index_add(0, targets, rows.index_select(0, slots) * weights[:, None])
    step = max(1, MIX_SLICE_ELEMENTS // max(1, rows.shape[1]))
    for first in range(0, len(slots), step):
        edges = slice(first, first + step)
        out.index_add_(0, targets[edges], rows.index_select(0, slots[edges]) * weights[edges, None])
    return out


class LocalExchange:
    """Every agent in one process: no communication."""

    rank = 0
    size = 1

    def __init__(self, num_agents: int, device: torch.device | None = None) -> None:
        self.layout = AgentLayout(num_agents, 1)
        self.num_local = num_agents
        self.device = device or torch.device("cpu")

    def route(self, sources: np.ndarray, destinations: np.ndarray) -> Route:
        return _build_route(self.layout, 0, sources, destinations, self.device)

    def mix(self, rows: torch.Tensor, route: Route, weights: torch.Tensor) -> torch.Tensor:
        return segment_mix(rows, route.slots, route.targets, weights, self.num_local, route.crow)

    def start_mix(self, rows: torch.Tensor, route: Route, weights: torch.Tensor) -> PendingMix:
        """The mix, computed when waited for (nothing travels in one process)."""
        return PendingMix(lambda: self.mix(rows, route, weights))

    def deliver(self, rows: torch.Tensor, route: Route) -> torch.Tensor:
        """The source row of every incoming edge: [E_in, M] in the route's edge order."""
        return rows.index_select(0, route.slots)

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def rows_to_root(self, rows: np.ndarray, write: RowWriter | None) -> None:
        write(0, rows)

    def allgather_object(self, value: Any) -> list[Any]:
        return [value]

    def close(self) -> None:
        """Nothing to free."""


def _host(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous host array for MPI: a view for CPU tensors, a copy for device tensors."""
    return tensor.detach().contiguous().cpu().numpy()


def mpi_cuda_aware() -> bool:
    """Whether the MPI library mpi4py loaded takes CUDA device buffers: Open MPI's and MPICH's
    `MPIX_Query_cuda_support` extension, looked up in the loaded library; False where the
    library has no such query. Call after MPI is initialised."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/libmpi" in line})
    except OSError:
        return False
    for path in paths:
        try:
            query = ctypes.CDLL(path).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        query.restype = ctypes.c_int
        return query() == 1
    return False


class MPIExchange:
    """Agents in contiguous blocks over the ranks of `comm` (Dup'd; `close` frees it)."""

    def __init__(self, comm: Any, layout: AgentLayout, device: torch.device | None = None) -> None:
        self.comm = comm.Dup()
        self.layout = layout
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.num_local = int(layout.counts[self.rank])
        self.device = device or torch.device("cpu")
        # GPU rows go to MPI as device buffers where the library takes them; else via the host.
        self.device_buffers = self.device.type == "cuda" and mpi_cuda_aware()
        self._graph_comm: Any = None
        self._support: tuple[list[int], list[int]] | None = None

    def route(self, sources: np.ndarray, destinations: np.ndarray) -> Route:
        """This rank's route; a collective call when the rank-level support changes.

        Every rank computes the support of every rank from the same global edges, so all
        decide together whether to rebuild the graph communicator, without communicating.
        """
        route = _build_route(self.layout, self.rank, sources, destinations, self.device)
        owners = np.stack([self.layout.owners(sources), self.layout.owners(destinations)])
        support = np.unique(owners[:, owners[0] != owners[1]], axis=1)
        key = (support[0].tolist(), support[1].tolist())
        if key != self._support:
            if self._graph_comm is not None:
                self._graph_comm.Free()
            # All ranks synchronise here: the distributed graph communicator is collective.
            # reorder=False keeps rank numbers, so blocks arrive in the order of route.sources.
            self._graph_comm = self.comm.Create_dist_graph_adjacent(
                route.sources, route.destinations, reorder=False
            )
            self._support = key
        return route

    def mix(self, rows: torch.Tensor, route: Route, weights: torch.Tensor) -> torch.Tensor:
        return self.start_mix(rows, route, weights).wait()

    def start_mix(self, rows: torch.Tensor, route: Route, weights: torch.Tensor) -> PendingMix:
        """Start sending the rows other ranks need (non-blocking); the mix waits for them."""
        table = self._start_table(rows, route)

        def finish() -> torch.Tensor:
            return segment_mix(
                table(), route.slots, route.targets, weights, self.num_local, route.crow
            )

        return PendingMix(finish)

    def deliver(self, rows: torch.Tensor, route: Route) -> torch.Tensor:
        """The source row of every incoming edge: [E_in, M] in the route's edge order."""
        return self._start_table(rows, route)().index_select(0, route.slots)

    def _start_table(self, rows: torch.Tensor, route: Route) -> Callable[[], torch.Tensor]:
        """Start one neighbourhood exchange; the returned call waits for it and gives the table
        [local rows; rows received from other ranks]."""
        send = rows.detach().index_select(0, route.send_index)
        count, width = rows.shape
        table = rows.new_empty((count + sum(route.receive_counts), width))
        # MPI writes the received rows into the table's tail, unless they must pass the host.
        host_copy = not self.device_buffers and table.device.type != "cpu"
        if self.device_buffers:
            received = table[count:]
            torch.cuda.current_stream(rows.device).synchronize()  # MPI reads what is queued
        else:
            send = _host(send)
            tail = (len(table) - count, width)
            received = np.empty(tail, send.dtype) if host_copy else table[count:].numpy()
        sent, arriving = route.element_counts(width)
        # Ranks synchronise with their graph neighbours when the request is waited for.
        request = self._graph_comm.Ineighbor_alltoallv([send, sent], [received, arriving])
        in_flight = (request, send)  # the send buffer must live until the request completes

        def wait() -> torch.Tensor:
            table[:count] = rows  # the local rows, while other ranks' rows may still travel
            in_flight[0].Wait()
            if host_copy:
                table[count:] = torch.from_numpy(received).to(table.device)
            return table

        return wait

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        from mpi4py import MPI

        buffer = _host(tensor).copy()
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        return torch.from_numpy(buffer).to(tensor.device)

    def rows_to_root(self, rows: np.ndarray, write: RowWriter | None) -> None:
        """Rank 0 calls `write(first agent id, rows)` with each rank's rows (one per local
        agent), rank by rank; the other ranks send theirs (`write` is unused there). Rank 0
        holds one rank's rows at a time, never every agent's: a checkpoint or the final models
        of 10^6 agents are never gathered whole. When a write raises, rank 0 still receives
        the remaining ranks' rows (their sends must not hang) and raises the first error once
        all are in."""
        rows = np.ascontiguousarray(rows)
        # All ranks synchronise here: every rank's rows pass through rank 0, in rank order.
        if self.rank != 0:
            self.comm.Send(rows, dest=0, tag=ROWS_TAG)
            return
        failure = None
        for source in range(self.size):
            block = rows
            if source:
                count = int(self.layout.counts[source])
                block = np.empty((count, *rows.shape[1:]), dtype=rows.dtype)
                self.comm.Recv(block, source=source, tag=ROWS_TAG)
            if failure is None:
                try:
                    write(int(self.layout.offsets[source]), block)
                except Exception as error:  # raised below, once every rank's rows are in
                    failure = error
        if failure is not None:
            raise failure

    def allgather_object(self, value: Any) -> list[Any]:
        return self.comm.allgather(value)

    def close(self) -> None:
        """Free the graph communicator and the duplicate of the run's communicator."""
        if self._graph_comm is not None:
            self._graph_comm.Free()
            self._graph_comm = None
        if self.comm is not None:
            self.comm.Free()
            self.comm = None


def _displacements(counts: list[int]) -> list[int]:
    return np.concatenate([[0], np.cumsum(counts[:-1])]).astype(int).tolist() if counts else []
