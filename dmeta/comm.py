"""Communication: where agents live, and the backends that combine their models.

Three combination backends share one call signature, `combiner(states) -> combined`, on the
[local agents, M] block of a rank:
- `MatrixCombiner`: in-process, all K agents in one tensor (the `local` backend);
- `NeighborCombiner`: MPI neighbourhood collectives on a distributed graph communicator;
- `AllreduceCombiner`: the centralized baseline, one all-reduce of the model sum.
`Collectives` gives the runner the few reductions it needs for metrics and output, for one
process (`SerialCollectives`) or an MPI communicator (`MPICollectives`). This module never
touches MPI.COMM_WORLD: communicators are handed in by the entry point.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from dmeta.combine import Combination
from dmeta.errors import DmetaError


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

    def owner(self, agent: int) -> int:
        """The rank hosting `agent`."""
        return int(np.searchsorted(self.offsets, agent, side="right") - 1)


class Collectives(Protocol):
    """The reductions the runner needs, over all agents of the run."""

    rank: int
    size: int
    num_local: int

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def gather_rows(self, rows: np.ndarray) -> np.ndarray | None: ...

    def allgather_object(self, value: Any) -> list[Any]: ...


class SerialCollectives:
    """One process holding every agent."""

    rank = 0
    size = 1

    def __init__(self, num_agents: int) -> None:
        self.num_local = num_agents

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_rows(self, rows: np.ndarray) -> np.ndarray | None:
        return rows

    def allgather_object(self, value: Any) -> list[Any]:
        return [value]


def _host(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous host array for MPI: a view for CPU tensors, a copy for device tensors."""
    return tensor.detach().contiguous().cpu().numpy()


class MPICollectives:
    """The same reductions over an MPI communicator whose ranks host contiguous agent blocks."""

    def __init__(self, comm: Any, layout: AgentLayout) -> None:
        self.comm = comm
        self.layout = layout
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.num_local = int(layout.counts[self.rank])

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        from mpi4py import MPI

        buffer = _host(tensor).copy()
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        return torch.from_numpy(buffer).to(tensor.device)

    def gather_rows(self, rows: np.ndarray) -> np.ndarray | None:
        """Concatenate each rank's rows (one per local agent) on rank 0, in agent order."""
        rows = np.ascontiguousarray(rows)
        row_shape = rows.shape[1:]
        row_size = int(np.prod(row_shape, dtype=np.int64))
        gathered = None
        if self.rank == 0:
            gathered = np.empty((self.layout.num_agents, *row_shape), dtype=rows.dtype)
        counts = self.layout.counts * row_size
        offsets = self.layout.offsets * row_size
        self.comm.Gatherv(rows, [gathered, (counts, offsets)] if self.rank == 0 else None, root=0)
        return gathered

    def allgather_object(self, value: Any) -> list[Any]:
        return self.comm.allgather(value)


class MatrixCombiner:
    """In-process diffusion: every agent in one tensor, w = A^T phi (eq. 6b)."""

    def __init__(self, matrix: np.ndarray, dtype: torch.dtype, device: torch.device) -> None:
        self.combination = Combination(torch.as_tensor(matrix, dtype=dtype, device=device))

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        return self.combination(states)

    def bytes_per_agent(self, model_bytes: int) -> float:
        """Bytes sent to other ranks per agent and combination: none, all agents are here."""
        return 0.0


class AllreduceCombiner:
    """Centralized baseline: every agent takes the network average (A = (1/K) 1 1^T)."""

    def __init__(self, collectives: Collectives, num_agents: int) -> None:
        self.collectives = collectives
        self.num_agents = num_agents

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        # All ranks synchronise here: one all-reduce of the local model sums.
        average = self.collectives.allreduce_sum(states.sum(dim=0)) / self.num_agents
        return average.expand_as(states).clone()

    def bytes_per_agent(self, model_bytes: int) -> float:
        """A bandwidth-optimal all-reduce sends 2 (P - 1) / P model sums per rank, shared here
        evenly by the rank's agents."""
        size = self.collectives.size
        num_local = self.collectives.num_local
        return 2 * (size - 1) / size * model_bytes / num_local


class NeighborCombiner:
    """Diffusion over MPI: one neighbourhood all-gather of rank blocks, then eq. (6b) locally.

    The rank graph has an edge r -> s when an agent of r has positive weight at an agent of s.
    Every rank sends its whole block to each out-neighbour rank with one
    `Neighbor_allgatherv`, then forms w_k = sum_l a[l, k] phi_l from its own and the received
    blocks.
    """

    def __init__(
        self,
        comm: Any,
        matrix: np.ndarray,
        layout: AgentLayout,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layout = layout
        rank = comm.Get_rank()
        mine = layout.agents(rank)
        support = matrix > 0
        listened = np.flatnonzero(support[:, mine].any(axis=1))
        heard_by = np.flatnonzero(support[mine, :].any(axis=0))
        self.sources = sorted({layout.owner(int(a)) for a in listened} - {rank})
        destinations = sorted({layout.owner(int(a)) for a in heard_by} - {rank})
        # reorder=False keeps rank numbers, so blocks arrive in the order of `self.sources`.
        self.graph_comm = comm.Create_dist_graph_adjacent(self.sources, destinations, reorder=False)
        source_agents = np.concatenate([mine] + [layout.agents(r) for r in self.sources])
        self.combination = Combination(
            torch.as_tensor(matrix[np.ix_(source_agents, mine)], dtype=dtype, device=device)
        )
        self.num_local = len(mine)
        self.num_destinations = len(destinations)
        self._buffer: np.ndarray | None = None

    def _receive_buffer(self, states: np.ndarray) -> np.ndarray:
        rows = self.num_local + sum(int(self.layout.counts[r]) for r in self.sources)
        shape = (rows, states.shape[1])
        if (
            self._buffer is None
            or self._buffer.shape != shape
            or self._buffer.dtype != states.dtype
        ):
            self._buffer = np.empty(shape, dtype=states.dtype)
        return self._buffer

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        host = _host(states)
        buffer = self._receive_buffer(host)
        buffer[: self.num_local] = host
        row = host.shape[1]
        counts = [int(self.layout.counts[r]) * row for r in self.sources]
        offsets = [sum(counts[:i]) for i in range(len(counts))]
        # Ranks synchronise with their graph neighbours here.
        self.graph_comm.Neighbor_allgatherv(host, [buffer[self.num_local :], (counts, offsets)])
        gathered = torch.from_numpy(buffer).to(states.device)
        return self.combination(gathered)

    def bytes_per_agent(self, model_bytes: int) -> float:
        """Each agent's row of the rank block goes once to every neighbour rank."""
        return float(model_bytes * self.num_destinations)
