"""MPI backends against the in-process backend. Run under mpiexec with --with-mpi (make test)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import (
    FEWSHOT,
    LEAF_SIZES,
    LINEAR,
    dense_matrix,
    federated_config,
    noniid_config,
    read_datasets,
    run_local,
    small_config,
    write_images,
    write_leaf,
    write_miniimagenet,
)

from dmeta.engine import execute
from dmeta.exchange import AgentLayout, LocalExchange, MPIExchange
from dmeta.runner import plan_run

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


def _mix(exchange, rows: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    sources, destinations = np.nonzero(matrix)
    route = exchange.route(sources, destinations)
    return exchange.mix(rows, route, route.weights(matrix[sources, destinations], rows))


@pytest.mark.parametrize("num_agents", [7, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neighbor_exchange_equals_local_bit_for_bit(comm, num_agents, dtype) -> None:
    matrix = _random_matrix(num_agents, seed=num_agents)
    states = torch.as_tensor(np.random.default_rng(1).standard_normal((num_agents, 13)))
    states = states.to(dtype)
    expected = _mix(LocalExchange(num_agents), states, matrix)
    layout = AgentLayout(num_agents, comm.Get_size())
    mine = layout.agents(comm.Get_rank())
    exchange = MPIExchange(comm, layout)
    for seed in range(2):  # a second edge set with another support rebuilds the communicator
        if seed:
            matrix = _random_matrix(num_agents, seed=100 + num_agents)
            expected = _mix(LocalExchange(num_agents), states, matrix)
        mixed = _mix(exchange, states[mine].clone(), matrix)
        # Incoming edges are summed in the same order on any layout: the same bits.
        torch.testing.assert_close(mixed, expected[mine], rtol=0, atol=0)
        sources, destinations = np.nonzero(matrix)
        route = exchange.route(sources, destinations)
        delivered = exchange.deliver(states[mine].clone(), route)
        torch.testing.assert_close(delivered, states[sources[route.edges]], rtol=0, atol=0)
    exchange.close()


def test_allreduce(comm) -> None:
    num_agents = 9
    states = torch.as_tensor(np.random.default_rng(2).standard_normal((num_agents, 5)))
    layout = AgentLayout(num_agents, comm.Get_size())
    mine = layout.agents(comm.Get_rank())
    exchange = MPIExchange(comm, layout)
    torch.testing.assert_close(
        exchange.allreduce_sum(states[mine].sum(0)), states.sum(0), rtol=1e-13, atol=1e-13
    )
    exchange.close()


def test_rows_reach_rank_zero_one_rank_at_a_time_even_when_a_write_fails(comm) -> None:
    """rows_to_root hands rank 0 each rank's rows in agent order; a write that raises does
    not leave the other ranks waiting: rank 0 takes every rank's rows, then raises."""
    num_agents = 9
    table = np.arange(num_agents * 3, dtype=np.float64).reshape(num_agents, 3)
    layout = AgentLayout(num_agents, comm.Get_size())
    exchange = MPIExchange(comm, layout)
    mine = table[layout.agents(comm.Get_rank())]
    received = np.full_like(table, np.nan)

    def write(first: int, rows: np.ndarray) -> None:
        received[first : first + len(rows)] = rows

    exchange.rows_to_root(mine, write)
    if comm.Get_rank() == 0:
        np.testing.assert_array_equal(received, table)
    blocks = []

    def failing(first: int, rows: np.ndarray) -> None:
        blocks.append(first)
        if first:
            raise OSError("disk full")

    if comm.Get_rank() == 0:
        with pytest.raises(OSError, match="disk full"):
            exchange.rows_to_root(mine, failing)
        assert blocks == [0, int(layout.offsets[1])]  # later writes skipped, rows received
    else:
        exchange.rows_to_root(mine, None)
    comm.Barrier()  # every rank got here: no send was left waiting
    exchange.close()


def _run_here_and_locally(comm, config, *extra: str):
    """Run `config` on these ranks; rank 0 also runs it in-process. Returns rank 0's files."""
    rank, size = comm.Get_rank(), comm.Get_size()
    folder = Path(comm.bcast(tempfile.mkdtemp() if rank == 0 else None))
    execute(plan_run(config, size, rank, rank, size), comm, folder / "mpi.h5", show_progress=False)
    comm.Barrier()
    if rank != 0:
        return None, None
    return read_datasets(folder / "mpi.h5"), run_local(config, folder / "local.h5")


def _verdict(comm, check) -> None:
    """Rank 0 runs `check`; every rank reports its verdict, so no rank is left in a test."""
    problem = None
    if comm.Get_rank() == 0:
        try:
            check()
        except AssertionError as error:
            problem = str(error)
    problem = comm.bcast(problem)
    assert problem is None, problem


def _diffusion_config(*extra: str):
    return small_config(
        "graph.topology=erdos_renyi",
        "graph.edge_probability=0.4",
        "graph.rule=metropolis",
        *extra,
    )


@pytest.mark.parametrize("strategy", ["atc", "cta", "centralized", "noncooperative"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mpi_run_equals_local_run(comm, strategy, dtype) -> None:
    """Point 6 of the engine issue: 7 agents, which neither 2 nor 4 ranks divide."""
    config = _diffusion_config(f"strategy={strategy}", f"runtime.dtype={dtype}")
    parallel, local = _run_here_and_locally(comm, config)

    def check() -> None:
        # Relative to each array's scale: reductions over ranks round differently.
        tolerance = 1e-6 if dtype == "float32" else 1e-12
        names = (
            "metrics/train_loss",
            "metrics/val_loss",
            "metrics/grad_norm",
            "centroid/val_loss",
            "centroid/stationarity",
            "centroid/stationarity_noise",
            "params/final",
            "params/initial",
            "topology/edges",
            "topology/weights",
        )
        for name in names:
            np.testing.assert_allclose(
                parallel[name],
                local[name],
                rtol=tolerance,
                err_msg=name,
                atol=tolerance * np.nanmax(np.abs(local[name]), initial=0.0),
            )
        for name in ("metrics/disagreement", "centroid/disagreement"):
            np.testing.assert_allclose(
                parallel[name],
                local[name],
                rtol=1e-4 if dtype == "float32" else 1e-10,
                atol=1e-9,
                err_msg=name,
            )

    _verdict(comm, check)


def test_a_compiled_run_under_mpi_gives_the_eager_run(comm) -> None:
    """runtime.compile on ranks that exchange rows compiles each rank's local training (task
    draws, meta-gradients, Adam) and leaves the exchange and the mix eager: the in-process
    eager run, to rounding, and the run file says what was compiled."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if size != 2:
        pytest.skip("each rank compiles its own program (slow): two ranks test the layout")
    folder = Path(comm.bcast(tempfile.mkdtemp() if rank == 0 else None))
    config = _diffusion_config("runtime.dtype=float64", "runtime.compile=true")
    execute(plan_run(config, size, rank, rank, size), comm, folder / "mpi.h5", show_progress=False)
    comm.Barrier()

    def check() -> None:
        eager = run_local(_diffusion_config("runtime.dtype=float64"), folder / "eager.h5")
        compiled = read_datasets(folder / "mpi.h5")
        with h5py.File(folder / "mpi.h5") as run:
            assert run["time"].attrs["compiled_part"] == "training"
        for name in ("metrics/train_loss", "metrics/val_loss", "params/final"):
            np.testing.assert_allclose(compiled[name], eager[name], rtol=1e-9, atol=1e-12)

    _verdict(comm, check)


@pytest.mark.parametrize(
    "schedule",
    [
        "graph.schedule=one_peer_exponential",
        "graph.schedule=random_regular graph.degree=4",
        "graph.schedule=link_failures graph.failure_probability=0.3",
        "graph.topology=star graph.rule=averaging",
        "graph.directed=true graph.topology=exponential graph.rule=averaging",
    ],
)
def test_every_schedule_runs_the_same_under_mpi(comm, schedule) -> None:
    """Time-varying graphs are built by every rank from (seed, round); the route and the
    distributed graph communicator follow them. The star has a Perron centroid."""
    config = _diffusion_config("runtime.dtype=float64", "strategy=cta", *schedule.split())
    parallel, local_run = _run_here_and_locally(comm, config)

    def check() -> None:
        for name in ("metrics/val_loss", "centroid/disagreement", "params/final"):
            scale = np.nanmax(np.abs(local_run[name]))
            np.testing.assert_allclose(
                parallel[name], local_run[name], rtol=1e-12, atol=1e-12 * scale, err_msg=name
            )

    _verdict(comm, check)


@pytest.mark.parametrize(
    "learner",
    ["fomaml", "anil", "foanil", "metasgd", "reptile", "arm", "arm local_steps=2"],
)
def test_every_learner_runs_the_same_under_mpi(comm, learner) -> None:
    name, _, local = learner.partition(" ")
    extra = [f"learner.{local}"] if local else []
    config = _diffusion_config(f"learner.name={name}", "runtime.dtype=float64", *extra)
    parallel, local_run = _run_here_and_locally(comm, config)

    def check() -> None:
        for name in ("metrics/val_loss", "centroid/stationarity", "params/final"):
            scale = np.nanmax(np.abs(local_run[name]))
            np.testing.assert_allclose(
                parallel[name], local_run[name], rtol=1e-12, atol=1e-12 * scale, err_msg=name
            )

    _verdict(comm, check)


@pytest.mark.parametrize(
    "setting",
    [
        "strategy=fedmeta runtime.dtype=float32",
        "strategy=fedmeta",
        "strategy=fedmeta learner.name=metasgd",
        "strategy=fedavg federated.local_epochs=2 federated.server_optimizer=sgd",
        "strategy=fedmeta " + " ".join(LINEAR),
    ],
)
def test_federated_runs_are_the_same_under_mpi(comm, setting) -> None:
    """7 clients, 3 sampled per round: the sample, the clients' work and the server's one
    all-reduce per round give the in-process run's numbers, and every rank's server model is
    the same bits."""
    config = small_config(
        "federated.clients_per_round=3", "runtime.dtype=float64", *setting.split()
    )
    parallel, local_run = _run_here_and_locally(comm, config)
    tolerance = 1e-6 if "float32" in setting else 1e-12

    def check() -> None:
        for name in ("metrics/train_loss", "metrics/val_loss", "centroid/val_loss", "params/final"):
            scale = np.nanmax(np.abs(local_run[name]))
            np.testing.assert_allclose(
                parallel[name], local_run[name], rtol=tolerance, atol=tolerance * scale,
                err_msg=name,
            )  # fmt: skip
        for name in ("federated/participations", "comm/bytes_up", "comm/bytes_down"):
            np.testing.assert_array_equal(parallel[name], local_run[name], err_msg=name)
        final = parallel["params/final"]
        np.testing.assert_array_equal(final, np.broadcast_to(final[0], final.shape))

    _verdict(comm, check)


@pytest.mark.parametrize(
    "setting",
    [
        "strategy=fedmeta",
        "strategy=fedavg federated.finetune_at_test=true",
        # Mini-batches: each rank's clients take as many steps as its largest needs.
        "strategy=fedavg federated.batch_size=3 federated.local_epochs=2",
    ],
)
def test_federated_data_runs_are_the_same_under_mpi(comm, setting) -> None:
    """Clients of unequal sizes (a LEAF file): the example-weighted rounds, the validation
    clients and the per-client test scores equal the in-process run's."""
    folder = Path(comm.bcast(tempfile.mkdtemp() if comm.Get_rank() == 0 else None))
    if comm.Get_rank() == 0:
        write_leaf(folder / "leaf.json", LEAF_SIZES)
    comm.Barrier()
    config = federated_config(folder / "leaf.json", "iterations=6", *setting.split())
    parallel, local_run = _run_here_and_locally(comm, config)

    def check() -> None:
        for name in ("metrics/train_loss", "metrics/val_accuracy", "params/final"):
            scale = np.nanmax(np.abs(local_run[name]))
            np.testing.assert_allclose(
                parallel[name], local_run[name], rtol=1e-10, atol=1e-10 * scale, err_msg=name
            )  # the example-weighted sums are added in another order across ranks
        for name in ("final/test_accuracy", "final/test_loss"):
            np.testing.assert_allclose(parallel[name], local_run[name], rtol=1e-10, err_msg=name)

    _verdict(comm, check)


@pytest.mark.parametrize(
    "setting",
    [
        ("learner.name=metasgd", "linear.mode=samples"),
        ("learner.name=anil", "linear.mode=population", "linear.heads=fixed"),
    ],
)
def test_linear_representation_runs_the_same_under_mpi(comm, setting) -> None:
    config = _diffusion_config(*LINEAR, *setting)
    parallel, local_run = _run_here_and_locally(comm, config)

    def check() -> None:
        for name in ("metrics/rep_distance", "centroid/rep_distance", "params/final"):
            np.testing.assert_allclose(
                parallel[name], local_run[name], rtol=1e-10, atol=1e-12, err_msg=name
            )
        np.testing.assert_array_equal(parallel["tasks/B_star"], local_run["tasks/B_star"])

    _verdict(comm, check)


@pytest.mark.parametrize("strategy", ["atc", "centralized"])
def test_conv_net_few_shot_run_is_the_same_under_mpi(comm, strategy) -> None:
    """MAML's conv net with batch norm on (tiny, synthetic) MiniImagenet files: accuracies,
    the final meta-test and the combined parameters match the in-process run."""
    rank = comm.Get_rank()
    root = Path(comm.bcast(tempfile.mkdtemp() if rank == 0 else None)) / "mini"
    if rank == 0:
        write_miniimagenet(root, "pickle", classes=5, images=4, size=8)
    comm.Barrier()
    config = _diffusion_config(
        *FEWSHOT, f"fewshot.paths=[{root}]", f"strategy={strategy}", "runtime.dtype=float64"
    )
    parallel, local_run = _run_here_and_locally(comm, config)

    def check() -> None:
        names = (
            "metrics/val_accuracy",
            "metrics/val_loss",
            "centroid/val_accuracy",
            "final/test_accuracy",
            "final/test_accuracy_ci95",
            "params/final",
        )
        for name in names:
            np.testing.assert_allclose(
                parallel[name], local_run[name], rtol=1e-10, atol=1e-12, err_msg=name
            )

    _verdict(comm, check)


@pytest.mark.parametrize("strategy", ["atc", "centralized", "noncooperative"])
def test_comm_bytes_count_what_each_rank_sends(comm, strategy) -> None:
    config = _diffusion_config(f"strategy={strategy}", "runtime.dtype=float64")
    parallel, local = _run_here_and_locally(comm, config)
    size = comm.Get_size()

    def check() -> None:
        model_bytes = parallel["params/final"].shape[1] * 8
        layout = AgentLayout(config.agents, size)
        owner = layout.owners(np.arange(config.agents))
        if strategy == "atc":
            # Agent l's row goes once to each other rank where some agent listens to it.
            support = dense_matrix(parallel, config.agents) > 0
            destinations = [
                len(set(owner[np.flatnonzero(support[source])]) - {owner[source]})
                for source in range(config.agents)
            ]
            per_iteration = model_bytes * np.array(destinations)
        elif strategy == "centralized":
            per_iteration = 2 * (size - 1) / size * model_bytes / layout.counts[owner]
        else:
            per_iteration = np.zeros(config.agents)
        iterations = np.diff(parallel["time/iteration"], prepend=0)
        np.testing.assert_allclose(parallel["comm/bytes"], iterations[:, None] * per_iteration)
        np.testing.assert_array_equal(local["comm/bytes"], 0.0)

    _verdict(comm, check)


def test_parallel_writer_writes_the_serial_writers_file(comm) -> None:
    from dmeta.output import parallel_hdf5_available

    if not parallel_hdf5_available():
        pytest.skip("h5py is built without MPI (h5py.get_config().mpi is False): no mpio driver")
    rank, size = comm.Get_rank(), comm.Get_size()
    folder = Path(comm.bcast(tempfile.mkdtemp() if rank == 0 else None))
    for writer in ("serial", "parallel"):
        config = _diffusion_config(
            "runtime.dtype=float64", f"output.writer={writer}", "output.flush_every=2"
        )
        plan = plan_run(config, size, rank, rank, size)
        execute(plan, comm, folder / f"{writer}.h5", show_progress=False)
    comm.Barrier()

    def check() -> None:
        import h5py

        serial, parallel = (
            read_datasets(folder / "serial.h5"),
            read_datasets(folder / "parallel.h5"),
        )
        assert serial.keys() == parallel.keys()
        for name in serial:
            if not name.startswith("time/") or name == "time/iteration":
                np.testing.assert_array_equal(parallel[name], serial[name], err_msg=name)
        with h5py.File(folder / "serial.h5") as a, h5py.File(folder / "parallel.h5") as b:
            assert set(a.attrs) == set(b.attrs)
            assert b.attrs["complete"] and b.attrs["writer"] == "parallel"
            for name in serial:
                assert set(a[name].attrs.keys()) == set(b[name].attrs.keys()), name

    _verdict(comm, check)


@pytest.mark.parametrize(
    "setting",
    [
        "runtime.dtype=float32",
        "asynchrony.wake_probability=0.5 asynchrony.max_delay=3 asynchrony.loss_probability=0.3",
        "graph.topology=ring graph.directed=false asynchrony.max_delay=2 learner.local_steps=2",
    ],
)
def test_pushsum_runs_are_the_same_under_mpi(comm, setting) -> None:
    """PARS-Push on 7 agents: wake-ups, delays and losses are draws of (seed, agent or edge,
    round) and the per-edge buffers live with the receiver, so every layout runs the same
    asynchronous rounds; one neighbour exchange per round."""
    config = small_config(
        "strategy=pushsum", "graph.topology=exponential", "graph.directed=true",
        "runtime.dtype=float64", "model.hidden=[8]", *setting.split(),
    )  # fmt: skip
    parallel, local_run = _run_here_and_locally(comm, config)
    tolerance = 1e-6 if "float32" in setting else 1e-12

    def check() -> None:
        names = (
            "metrics/train_loss", "metrics/val_loss", "pushsum/weight", "params/final",
            "pushsum/consensus_error",
        )  # fmt: skip
        for name in names:
            scale = np.nanmax(np.abs(local_run[name]))
            np.testing.assert_allclose(
                parallel[name], local_run[name], rtol=tolerance, atol=tolerance * scale,
                err_msg=name,
            )  # fmt: skip
        np.testing.assert_array_equal(parallel["comm/messages"], local_run["comm/messages"])
        assert parallel["comm/bytes"].sum() > 0

    _verdict(comm, check)


def test_own_task_validation_is_the_same_under_mpi(comm) -> None:
    """validation.own_tasks: each rank scores its agents, and the centroid, on its agents' own
    tasks (drawn by agent id); the centroid's mean over all agents is the row's all-reduce."""
    config = small_config(
        "strategy=pushsum", "graph.topology=exponential", "graph.directed=true",
        "runtime.dtype=float64", "model.hidden=[8]", "validation.own_tasks=true",
        "asynchrony.wake_probability=0.5",
    )  # fmt: skip
    parallel, local_run = _run_here_and_locally(comm, config)

    def check() -> None:
        for name in ("metrics/val_loss", "centroid/val_loss"):
            np.testing.assert_allclose(
                parallel[name], local_run[name], rtol=1e-12, atol=0, err_msg=name
            )
        assert np.isfinite(parallel["centroid/val_loss"]).all()

    _verdict(comm, check)


def test_a_pushsum_checkpoint_with_messages_in_flight_resumes_on_these_ranks(comm) -> None:
    """Stopped in-process at iteration 6 with messages in flight, resumed on every rank: the
    per-edge state is stored by receiving agent and in-neighbour id, so any layout reads it."""
    rank, size = comm.Get_rank(), comm.Get_size()
    folder = Path(comm.bcast(tempfile.mkdtemp() if rank == 0 else None))
    config = small_config(
        "strategy=pushsum", "graph.topology=exponential", "graph.directed=true",
        "runtime.dtype=float64", "model.hidden=[8]", "iterations=20",
        "asynchrony.wake_probability=0.5", "asynchrony.max_delay=3",
        "asynchrony.loss_probability=0.3", "checkpoint.poll_every=3",
        "checkpoint.every_minutes=1e-9",
    )  # fmt: skip
    out = folder / "run.h5"
    if rank == 0:
        asked = iter([False, True])
        plan = plan_run(config, 1, 0, 0, 1)
        execute(plan, None, out, show_progress=False, stop_requested=lambda: next(asked))
        run_local(config, folder / "reference.h5")
    comm.Barrier()
    execute(plan_run(config, size, rank, rank, size), comm, out, show_progress=False, resume=True)
    comm.Barrier()

    def check() -> None:
        resumed, reference = read_datasets(out), read_datasets(folder / "reference.h5")
        assert resumed.keys() == reference.keys()
        for name in resumed:
            if name.startswith("time/") or name == "comm/bytes":
                continue
            scale = np.nanmax(np.abs(reference[name]), initial=0.0)
            np.testing.assert_allclose(
                resumed[name], reference[name], rtol=1e-12, atol=1e-12 * scale, err_msg=name
            )

    _verdict(comm, check)


def test_l2c_runs_are_the_same_under_mpi_and_pruning_cuts_the_bytes(comm) -> None:
    """L2C on 7 agents of an Erdos-Renyi graph, pruning after round 6 of 12: the updates cross
    ranks in one exchange per round, the alpha gradient needs no communication, and the
    pruned edges reach every rank through one allgather; the bytes sent drop after T0."""
    config = small_config(
        "strategy=l2c", "graph.topology=erdos_renyi", "graph.edge_probability=0.6",
        "runtime.dtype=float64", "model.hidden=[8]", "l2c.local_epochs=2", "l2c.prune_round=6",
        "l2c.prune_count=2", "log_every=2",
    )  # fmt: skip
    parallel, local_run = _run_here_and_locally(comm, config)

    def check() -> None:
        names = ("metrics/train_loss", "metrics/val_loss", "mixing/weights", "params/final")
        for name in names:
            scale = np.nanmax(np.abs(local_run[name]))
            np.testing.assert_allclose(
                parallel[name], local_run[name], rtol=1e-12, atol=1e-12 * scale, err_msg=name
            )
        np.testing.assert_array_equal(parallel["topology/edges"], local_run["topology/edges"])
        sent = parallel["comm/bytes"].sum(axis=1)  # rows at 0, 2, ..., 12: rounds 1-2, 3-4, ...
        assert sent[1] > 0 and sent[-1] < sent[1], sent
        assert (parallel["mixing/weights"][-1] == 0).sum() > 0

    _verdict(comm, check)


def test_meta_l2c_runs_are_the_same_under_mpi(comm) -> None:
    """meta-L2C on 7 agents of an Erdos-Renyi graph, pruning after round 6 of 12: each round's
    updates and changes cross ranks in one exchange, the encoder's gradients meet in one
    all-reduce and every rank steps the same shared encoder; the pruned edges reach every
    rank through one allgather."""
    config = small_config(
        "strategy=meta_l2c", "graph.topology=erdos_renyi", "graph.edge_probability=0.6",
        "runtime.dtype=float64", "model.hidden=[8]", "l2c.local_epochs=2", "l2c.prune_round=6",
        "l2c.prune_count=2", "log_every=2", "optimizer.name=sgd", "optimizer.lr=0.05",
    )  # fmt: skip
    parallel, local_run = _run_here_and_locally(comm, config)

    def check() -> None:
        names = (
            "metrics/train_loss", "metrics/val_loss", "mixing/weights", "params/final",
            "l2c/encoder", "l2c/gradient_norm", "l2c/decay_norm", "l2c/gradient_share",
        )  # fmt: skip
        for name in names:
            scale = np.nanmax(np.abs(local_run[name]))
            np.testing.assert_allclose(
                parallel[name], local_run[name], rtol=1e-12, atol=1e-12 * scale, err_msg=name
            )
        np.testing.assert_array_equal(parallel["topology/edges"], local_run["topology/edges"])
        sent = parallel["comm/bytes"].sum(axis=1)
        assert sent[1] > 0 and sent[-1] < sent[1], sent
        assert (parallel["mixing/weights"][-1] == 0).sum() > 0
        assert not np.allclose(parallel["l2c/encoder"][-1], parallel["l2c/encoder"][0])

    _verdict(comm, check)


def test_noniid_l2c_runs_are_the_same_under_mpi(comm) -> None:
    """L2C on the non-IID split of tiny images (4 nodes of two-class tasks): every rank deals
    the same shards and splits from the seed, and the epochs, the mixing weights and each
    node's test accuracy equal the in-process run's."""
    folder = Path(comm.bcast(tempfile.mkdtemp() if comm.Get_rank() == 0 else None))
    if comm.Get_rank() == 0:
        write_images(folder / "data")
    comm.Barrier()
    parallel, local_run = _run_here_and_locally(comm, noniid_config(folder / "data"))

    def check() -> None:
        names = ("metrics/train_loss", "metrics/test_accuracy", "mixing/weights", "params/final")
        for name in names:
            scale = np.nanmax(np.abs(local_run[name]))
            np.testing.assert_allclose(
                parallel[name], local_run[name], rtol=1e-12, atol=1e-12 * scale, err_msg=name
            )
        classes = "tasks/node_classes"
        np.testing.assert_array_equal(parallel[classes], local_run[classes])

    _verdict(comm, check)


@pytest.mark.parametrize(
    "setting",
    [
        "asynchrony.speed_distribution=pareto",
        "asynchrony.speed_distribution=lognormal learner.name=metasgd asynchrony.max_staleness=0",
    ],
)
def test_persafl_runs_are_the_same_under_mpi(comm, setting) -> None:
    """PersA-FL on 7 clients: every rank simulates the same asynchronous server; the clients
    of a rank whose updates a buffer takes compute at their downloaded versions, and one
    all-reduce per server step gives the in-process run's numbers."""
    config = small_config(
        "strategy=persafl", "runtime.dtype=float64", "model.hidden=[8]",
        "asynchrony.concurrency=4", "asynchrony.buffer_size=2", "asynchrony.max_staleness=2",
        *setting.split(),
    )  # fmt: skip
    parallel, local_run = _run_here_and_locally(comm, config)

    def check() -> None:
        for name in ("metrics/train_loss", "metrics/val_loss", "centroid/val_loss", "params/final"):
            scale = np.nanmax(np.abs(local_run[name]))
            np.testing.assert_allclose(
                parallel[name], local_run[name], rtol=1e-12, atol=1e-12 * scale, err_msg=name
            )
        exact = [name for name in local_run if name.startswith("federated/")]
        for name in [*exact, "time/virtual", "comm/bytes_up", "comm/bytes_down"]:
            np.testing.assert_array_equal(parallel[name], local_run[name], err_msg=name)
        final = parallel["params/final"]
        np.testing.assert_array_equal(final, np.broadcast_to(final[0], final.shape))

    _verdict(comm, check)
