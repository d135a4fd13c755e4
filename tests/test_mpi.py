"""MPI backends against the in-process backend. Run under mpiexec with --with-mpi (make test)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_datasets, run_local, small_config

from dmeta.comm import (
    AgentLayout,
    AllreduceCombiner,
    MatrixCombiner,
    MPICollectives,
    NeighborCombiner,
)
from dmeta.runner import execute, plan_run

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _random_matrix(num_agents: int, seed: int) -> np.ndarray:
    state = np.random.default_rng(seed)
    support = (state.random((num_agents, num_agents)) < 0.3) | np.eye(num_agents, dtype=bool)
    matrix = state.random((num_agents, num_agents)) * support
    return matrix / matrix.sum(axis=0)


def test_world_has_the_requested_ranks(comm) -> None:
    # A launcher from another MPI would run each rank as its own size-1 job.
    assert comm.Get_size() >= 2


@pytest.mark.parametrize("num_agents", [7, 9])
def test_neighbor_combination_equals_local(comm, num_agents) -> None:
    matrix = _random_matrix(num_agents, seed=num_agents)
    states = torch.as_tensor(np.random.default_rng(1).standard_normal((num_agents, 13)))
    expected = MatrixCombiner(matrix, torch.float64, torch.device("cpu"))(states)
    layout = AgentLayout(num_agents, comm.Get_size())
    mine = layout.agents(comm.Get_rank())
    combiner = NeighborCombiner(comm, matrix, layout, torch.float64, torch.device("cpu"))
    for _ in range(2):  # the receive buffer is reused
        torch.testing.assert_close(
            combiner(states[mine].clone()), expected[mine], rtol=1e-14, atol=1e-14
        )


def test_allreduce_combination_equals_average(comm) -> None:
    num_agents = 9
    states = torch.as_tensor(np.random.default_rng(2).standard_normal((num_agents, 5)))
    layout = AgentLayout(num_agents, comm.Get_size())
    mine = layout.agents(comm.Get_rank())
    combined = AllreduceCombiner(MPICollectives(comm, layout), num_agents)(states[mine])
    torch.testing.assert_close(
        combined, states.mean(0).expand(len(mine), 5), rtol=1e-13, atol=1e-13
    )
    uniform = MatrixCombiner(
        np.full((num_agents, num_agents), 1 / num_agents), torch.float64, torch.device("cpu")
    )
    torch.testing.assert_close(combined, uniform(states)[mine], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("strategy", ["atc", "cta", "centralized", "noncooperative"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mpi_run_equals_local_run(comm, strategy, dtype) -> None:
    """Point 6 of the engine issue: 7 agents, which neither 2 nor 4 ranks divide."""
    config = small_config(
        f"strategy={strategy}",
        f"runtime.dtype={dtype}",
        "graph.topology=erdos_renyi",
        "graph.edge_probability=0.4",
        "graph.rule=metropolis",
    )
    rank, size = comm.Get_rank(), comm.Get_size()
    folder = comm.bcast(tempfile.mkdtemp() if rank == 0 else None)
    mpi_file = Path(folder) / "mpi.h5"
    execute(plan_run(config, size, rank, rank, size), comm, mpi_file, show_progress=False)
    comm.Barrier()
    problem = None
    if rank == 0:
        local = run_local(config, Path(folder) / "local.h5")
        parallel = read_datasets(mpi_file)
        # Relative to each array's scale: reductions over ranks round differently.
        tolerance = 1e-6 if dtype == "float32" else 1e-12
        names = (
            "metrics/train_loss",
            "metrics/val_loss",
            "metrics/grad_norm",
            "centroid/val_loss",
            "centroid/stationarity",
            "params/final",
            "params/initial",
            "topology/A",
        )
        try:
            for name in names:
                np.testing.assert_allclose(
                    parallel[name],
                    local[name],
                    rtol=tolerance,
                    err_msg=name,
                    atol=tolerance * np.nanmax(np.abs(local[name])),
                )
            np.testing.assert_allclose(
                parallel["metrics/disagreement"],
                local["metrics/disagreement"],
                rtol=1e-4 if dtype == "float32" else 1e-10,
                atol=1e-9,
            )
        except AssertionError as error:
            problem = str(error)
    # Every rank reports rank 0's verdict, so a failure cannot leave ranks in different tests.
    problem = comm.bcast(problem)
    assert problem is None, problem
