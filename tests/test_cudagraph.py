"""Whole rounds as device work (runtime.cuda_graph): the same rounds as `round`, driven by a
counter tensor, on the CPU; captured once and replayed where CUDA is present."""

from __future__ import annotations

import dataclasses

import h5py
import pytest
import torch
from conftest import LEAF_SIZES, federated_config, small_config, write_leaf

from dmeta import rng
from dmeta.cudagraph import WARMUP_ROUNDS, GraphedRounds
from dmeta.engine import Engine, execute
from dmeta.errors import DmetaError
from dmeta.exchange import LocalExchange
from dmeta.runner import plan_run
from dmeta.tasks import SineTask

STRATEGIES = ["atc", "cta", "centralized", "noncooperative"]
# FedMeta and FedAvg on one rank: the server's rounds (sine tasks unless "leaf": federated data).
FEDERATED = {
    "fedmeta": ("strategy=fedmeta",),
    # Enough sampled clients that an isin not told both sides are unique would sort with a
    # unique() that syncs with the host (torch's switch: 10 K^0.145 = 17 at K = 40).
    "fedmeta-many": ("strategy=fedmeta", "agents=40", "federated.clients_per_round=30"),
    "metasgd": ("strategy=fedmeta", "learner.name=metasgd"),
    "fedavg": ("strategy=fedavg", "federated.local_epochs=2", "federated.client_lr=0.05"),
    "fedmeta-leaf": ("leaf", "strategy=fedmeta"),
    "fedavg-leaf": ("leaf", "strategy=fedavg", "federated.server_optimizer=adam"),
    # Mini-batches of 7 over clients of 8 to 15 examples: a device round takes the largest
    # client's 3 batches, where rounds 1 and 2 sample none larger than 14 (2 batches: the
    # device round's third is padding alone).
    "fedavg-leaf-batches": ("leaf", "strategy=fedavg", "federated.batch_size=7"),
}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _engine(tmp_path, device: str, *overrides: str) -> Engine:
    config = small_config("runtime.dtype=float64", f"runtime.device={device}", *overrides)
    exchange = LocalExchange(config.agents, torch.device(device))
    return Engine(plan_run(config, 1, 0, 0, 1), exchange, tmp_path / f"{device}.h5")


def _state(engine: Engine) -> dict[str, torch.Tensor]:
    return {name: rows.cpu() for name, rows in engine.algorithm.state_rows().items()}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_device_rounds_are_the_rounds_in_place(tmp_path, strategy, optimizer) -> None:
    """Rounds 1-4 through `device_round` with t as a tensor: the losses, norms, models and
    optimizer state of `round`, and the state stays in the same tensors (a replay's memory)."""
    overrides = (f"strategy={strategy}", f"optimizer.name={optimizer}")
    eager, graphable = (
        _engine(tmp_path / "a", "cpu", *overrides),
        _engine(tmp_path, "cpu", *overrides),
    )
    step = graphable.algorithm.device_round()
    memory = {name: rows.data_ptr() for name, rows in graphable.algorithm.state_rows().items()}
    for t in range(1, 5):
        expected, report = eager.algorithm.round(t), step(torch.tensor(t))
        torch.testing.assert_close(report.loss_sum, expected.loss_sum, rtol=1e-13, atol=0)
        torch.testing.assert_close(report.gradient_norm, expected.gradient_norm, rtol=1e-12, atol=0)
        assert report.steps == expected.steps
        assert not report.comm_bytes.any()
    # The ring's mix is an index and a segment sum here, a sparse product in `round`.
    torch.testing.assert_close(_state(graphable), _state(eager), rtol=1e-12, atol=1e-14)
    after = {name: rows.data_ptr() for name, rows in graphable.algorithm.state_rows().items()}
    assert after == memory


def _federated_engine(tmp_path, device: str, overrides: tuple[str, ...]) -> Engine:
    tmp_path.mkdir(exist_ok=True)
    rest = [o for o in overrides if o != "leaf"]
    common = ("runtime.dtype=float64", f"runtime.device={device}", "runtime.cuda_graph=false")
    if "leaf" in overrides:
        leaf = write_leaf(tmp_path / "leaf.json", LEAF_SIZES)
        config = federated_config(leaf, *common, *rest)
    else:
        config = small_config("federated.clients_per_round=3", *common, *rest)
    exchange = LocalExchange(config.agents, torch.device(device))
    return Engine(plan_run(config, 1, 0, 0, 1), exchange, tmp_path / f"{device}.h5")


def _server_state(engine: Engine) -> dict[str, torch.Tensor]:
    algorithm = engine.algorithm
    shared = algorithm.state_shared()
    return {name: value.cpu() for name, value in (shared | algorithm.state_rows()).items()}


@pytest.mark.parametrize("overrides", FEDERATED.values(), ids=FEDERATED.keys())
def test_federated_device_rounds_are_the_rounds_in_place(tmp_path, overrides) -> None:
    """FedMeta's and FedAvg's rounds 1-4 through `device_round` (t a tensor, the sample drawn
    on the device): the reports, server model, optimizer state, participations, clock and
    bytes of `round`, to the bit, and the server's state stays in the same tensors."""
    eager = _federated_engine(tmp_path / "a", "cpu", overrides)
    graphable = _federated_engine(tmp_path / "b", "cpu", overrides)
    step = graphable.algorithm.device_round()
    memory = {name: value.data_ptr() for name, value in _live_state(graphable).items()}
    for t in range(1, 5):
        expected, report = eager.algorithm.round(t), step(torch.tensor(t))
        for field in ("loss_sum", "gradient_norm", "comm_bytes"):
            assert torch.equal(getattr(report, field), getattr(expected, field)), field
        assert report.steps == expected.steps
    expected, state = _server_state(eager), _server_state(graphable)
    assert expected.keys() == state.keys()
    assert all(torch.equal(state[name], expected[name]) for name in expected)
    assert state["participations"].sum() == 4 * graphable.config.federated.clients_per_round
    assert {name: value.data_ptr() for name, value in _live_state(graphable).items()} == memory


def test_a_minibatch_fedavg_round_traces_whole(tmp_path) -> None:
    """FedAvg's mini-batch round traces as one program (torch.compile's fullgraph, as
    runtime.compile's `CompiledRounds`; the eager backend, which checks the trace without
    inductor's minutes): the epoch's fixed count of batches reads nothing back and builds no
    table inside the trace, and rounds 1-3 are `round`'s to the bit."""
    overrides = FEDERATED["fedavg-leaf-batches"]
    eager = _federated_engine(tmp_path / "a", "cpu", overrides)
    graphable = _federated_engine(tmp_path / "b", "cpu", overrides)
    traced = torch.compile(
        graphable.algorithm.device_round(), backend="eager", fullgraph=True, dynamic=False
    )
    counter = torch.zeros((), dtype=torch.int64)
    for t in range(1, 4):
        rng.set_counter(counter, t)
        expected, report = eager.algorithm.round(t), traced(counter)
        assert torch.equal(report.loss_sum, expected.loss_sum)
    expected, state = _server_state(eager), _server_state(graphable)
    assert all(torch.equal(state[name], expected[name]) for name in expected)


def _live_state(engine: Engine) -> dict[str, torch.Tensor]:
    """The tensors a replayed federated round reads and writes."""
    algorithm = engine.algorithm
    optimizer = {f"optimizer/{k}": v for k, v in algorithm.optimizer_state.items()}
    return {"server": algorithm.server, **optimizer, **algorithm.state_rows()}


@pytest.mark.parametrize("strategy", ["atc", "centralized"])
def test_diffusion_device_rounds_on_federated_data_are_the_rounds(tmp_path, strategy) -> None:
    """Federated data draws nothing (each client's split is fixed), so the diffusion family's
    rounds on it are device work too: rounds 1-3 through `device_round` are those of `round`."""
    overrides = ("leaf", f"strategy={strategy}", "graph.rule=metropolis")
    eager = _federated_engine(tmp_path / "a", "cpu", overrides)
    graphable = _federated_engine(tmp_path / "b", "cpu", overrides)
    step = graphable.algorithm.device_round()
    for t in range(1, 4):
        expected, report = eager.algorithm.round(t), step(torch.tensor(t))
        torch.testing.assert_close(report.loss_sum, expected.loss_sum, rtol=1e-13, atol=0)
    torch.testing.assert_close(_state(graphable), _state(eager), rtol=1e-12, atol=1e-14)


def test_federated_rounds_that_vary_have_no_device_round(tmp_path, monkeypatch) -> None:
    """PersA-FL's host schedule and a server on several ranks (an all-reduce) run plain
    rounds."""
    persafl = _federated_engine(
        tmp_path / "b", "cpu", ("strategy=persafl", "asynchrony.concurrency=3")
    )
    assert persafl.algorithm.device_round() is None
    fedmeta = _federated_engine(tmp_path / "c", "cpu", ("strategy=fedmeta",)).algorithm
    assert fedmeta.device_round() is not None
    monkeypatch.setattr(fedmeta.context.exchange, "size", 2)
    assert fedmeta.device_round() is None


def test_rounds_that_cannot_be_captured_say_so(tmp_path) -> None:
    """A graph that changes each round has no device round; cuda_graph = true off a GPU and on
    such a strategy are one-line errors."""
    engine = _engine(tmp_path, "cpu", "graph.schedule=one_peer_exponential", "agents=8")
    assert engine.algorithm.device_round() is None
    with pytest.raises(DmetaError, match="runtime.cuda_graph = true needs a CUDA device"):
        plan_run(small_config("runtime.device=cpu", "runtime.cuda_graph=true"), 1, 0, 0, 1)


def test_only_families_that_draw_by_counter_capture(tmp_path, monkeypatch) -> None:
    """A task family that does not declare `draws_by_counter` runs plain rounds (its `sample`
    may need an integer); with runtime.cuda_graph = true that is a one-line error."""
    config = small_config("runtime.dtype=float64", "runtime.device=cpu")
    plan = dataclasses.replace(plan_run(config, 1, 0, 0, 1), cuda_graph=True)
    assert Engine(plan, LocalExchange(7), tmp_path / "a.h5").graphed is not None
    monkeypatch.setattr(SineTask, "draws_by_counter", False)
    assert Engine(plan, LocalExchange(7), tmp_path / "b.h5").graphed is None
    config.runtime.cuda_graph = "true"
    with pytest.raises(DmetaError, match="problem 'sine' draws its tasks with host work"):
        Engine(dataclasses.replace(plan, config=config), LocalExchange(7), tmp_path / "c.h5")


def test_counter_tensor_gives_the_integer_draws() -> None:
    """A draw keyed by a 0-d tensor iteration equals the one keyed by the integer."""
    agents = torch.tensor([0, 3, 2**32 - 1])
    for iteration in (0, 7, 2**40 + 5):
        by_int = rng.uniform(9, agents, rng.STREAM_TASKS, iteration, (2, 5), dtype=torch.float64)
        by_tensor = rng.uniform(
            9, agents, rng.STREAM_TASKS, torch.tensor(iteration), (2, 5), dtype=torch.float64
        )
        assert torch.equal(by_int, by_tensor)


@CUDA
def test_cuda_counter_tensor_gives_the_integer_draws() -> None:
    agents = torch.tensor([0, 3, 2**32 - 1], device="cuda")
    for iteration in (0, 7, 2**40 + 5):
        expected = rng.blocks(9, agents.cpu(), rng.STREAM_TASKS, iteration, (4,))
        counter = torch.tensor(iteration, device="cuda")
        words = rng.blocks(9, agents, rng.STREAM_TASKS, counter, (4,))
        assert all(torch.equal(a, b.cpu()) for a, b in zip(expected, words, strict=True))


@CUDA
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_replayed_rounds_are_the_eager_rounds(tmp_path, strategy) -> None:
    """Six rounds of a captured graph (two warm-up rounds, the capture, replays) against the
    same rounds eagerly on the GPU: the counter moves the draws; models and state agree."""
    overrides = (f"strategy={strategy}", "runtime.cuda_graph=false")
    eager, graphed = (
        _engine(tmp_path / "a", "cuda", *overrides),
        _engine(tmp_path, "cuda", *overrides),
    )
    rounds = GraphedRounds(graphed.algorithm.device_round(), graphed.device, fallback=False)
    for t in range(1, 7):
        expected, report = eager.algorithm.round(t), rounds(t)
        torch.testing.assert_close(report.loss_sum, expected.loss_sum, rtol=1e-12, atol=0)
    assert rounds.graph is not None and rounds.eager_rounds == WARMUP_ROUNDS
    torch.testing.assert_close(_state(graphed), _state(eager), rtol=1e-11, atol=1e-13)


@CUDA
def test_a_cuda_run_replays_its_rounds(tmp_path) -> None:
    """runtime.cuda_graph = true: the run file says the rounds were replayed and its models
    are the CPU run's."""
    files = {}
    for device, graph in (("cpu", "false"), ("cuda", "true")):
        config = small_config(
            "runtime.dtype=float64", f"runtime.device={device}", f"runtime.cuda_graph={graph}"
        )
        files[device] = tmp_path / f"{device}.h5"
        execute(plan_run(config, 1, 0, 0, 1), None, files[device], show_progress=False)
    with h5py.File(files["cpu"]) as cpu, h5py.File(files["cuda"]) as cuda:
        assert cuda["time"].attrs["cuda_graph"] == "replayed"
        final = "params/final"
        torch.testing.assert_close(cuda[final][()], cpu[final][()], rtol=1e-10, atol=1e-12)


@CUDA
@pytest.mark.parametrize("overrides", FEDERATED.values(), ids=FEDERATED.keys())
def test_replayed_federated_rounds_are_the_eager_rounds(tmp_path, overrides) -> None:
    """Six FedMeta or FedAvg rounds of a captured graph against the same rounds eagerly on the
    GPU: the counter moves the client sample; the server's state agrees."""
    eager = _federated_engine(tmp_path / "a", "cuda", overrides)
    graphed = _federated_engine(tmp_path / "b", "cuda", overrides)
    rounds = GraphedRounds(graphed.algorithm.device_round(), graphed.device, fallback=False)
    for t in range(1, 7):
        expected, report = eager.algorithm.round(t), rounds(t)
        torch.testing.assert_close(report.loss_sum, expected.loss_sum, rtol=1e-12, atol=0)
    assert rounds.graph is not None and rounds.eager_rounds == WARMUP_ROUNDS
    expected, state = _server_state(eager), _server_state(graphed)
    for name in expected:
        torch.testing.assert_close(state[name], expected[name], rtol=1e-11, atol=1e-13)
