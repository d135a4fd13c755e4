"""The in-process engine: reproducibility, strategy equivalences, run-file contents."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import dense_matrix, run_local, small_config

from dmeta import rng
from dmeta.config import Config, config_digest, config_from_json
from dmeta.engine import Engine
from dmeta.errors import DmetaError
from dmeta.exchange import LocalExchange
from dmeta.runner import plan_run


def test_local_run_is_reproducible(tmp_path) -> None:
    first = run_local(small_config(), tmp_path / "a.h5")
    second = run_local(small_config(), tmp_path / "b.h5")
    for name in ("metrics/val_loss", "metrics/train_loss", "params/final"):
        np.testing.assert_array_equal(first[name], second[name])
    other_seed = run_local(small_config("seed=1"), tmp_path / "c.h5")
    assert not np.allclose(first["params/final"], other_seed["params/final"])


def test_diffusion_with_uniform_matrix_equals_centralized(tmp_path) -> None:
    # Complete graph + averaging rule gives A = J/K exactly.
    uniform = run_local(
        small_config("graph.topology=complete", "runtime.dtype=float64", "optimizer.name=sgd"),
        tmp_path / "a.h5",
    )
    np.testing.assert_allclose(dense_matrix(uniform, 7), np.full((7, 7), 1 / 7))
    central = run_local(
        small_config("strategy=centralized", "runtime.dtype=float64", "optimizer.name=sgd"),
        tmp_path / "c.h5",
    )
    np.testing.assert_allclose(uniform["params/final"], central["params/final"], rtol=1e-12)
    np.testing.assert_allclose(uniform["metrics/val_loss"], central["metrics/val_loss"], rtol=1e-12)
    # After one combination every agent holds the same model.
    assert np.all(central["metrics/disagreement"][1:] < 1e-20)


def test_noncooperative_agents_drift_apart_and_diffusion_agrees(tmp_path) -> None:
    alone = run_local(
        small_config("strategy=noncooperative", "model.same_init=true"), tmp_path / "n.h5"
    )
    together = run_local(small_config("model.same_init=true"), tmp_path / "d.h5")
    assert (
        alone["metrics/disagreement"][-1].mean() > 10 * together["metrics/disagreement"][-1].mean()
    )
    np.testing.assert_array_equal(dense_matrix(alone, 7), np.eye(7))


def test_cta_differs_from_atc(tmp_path) -> None:
    atc = run_local(small_config(), tmp_path / "a.h5")
    cta = run_local(small_config("strategy=cta"), tmp_path / "c.h5")
    assert not np.allclose(atc["params/final"], cta["params/final"])


def test_run_file_layout(tmp_path) -> None:
    config = small_config()
    data = run_local(config, tmp_path / "run.h5")
    rows, agents = 4, 7  # iterations 0, 4, 8, 12
    np.testing.assert_array_equal(data["time/iteration"], [0, 4, 8, 12])
    assert data["time/wall"].shape == (rows,)
    for name in ("train_loss", "val_loss", "disagreement", "grad_norm"):
        assert data[f"metrics/{name}"].shape == (rows, agents)
    for name in (
        "centroid/val_loss",
        "centroid/disagreement",
        "time/comm",
        "time/compute",
        "time/log",
    ):
        assert data[name].shape == (rows,)
    for name in ("metrics/train_loss", "metrics/grad_norm"):
        assert np.isnan(data[name][0]).all()
        assert np.isfinite(data[name][1:]).all() and (data[name][1:] > 0).all()
    np.testing.assert_allclose(
        data["centroid/disagreement"], data["metrics/disagreement"].mean(axis=1)
    )
    assert (data["time/comm"] >= 0).all() and (data["time/compute"][1:] > 0).all()
    assert (data["time/log"] > 0).all()
    # The wall clock covers the iterations and the logging.
    assert data["time/wall"][-1] >= data["time/compute"][1:].sum() + data["time/log"].sum()
    # A ring: every agent hears itself and two neighbours.
    assert data["topology/edges"].shape == (3 * agents, 2)
    np.testing.assert_allclose(dense_matrix(data, agents).sum(axis=0), 1.0)
    assert (
        data["params/initial"].shape
        == data["params/final"].shape
        == (agents, 16 + 16 + 256 + 16 + 17)
    )
    with h5py.File(tmp_path / "run.h5") as f:
        assert f.attrs["complete"]
        assert f.attrs["world_size"] == 1 and f.attrs["seed"] == 0
        assert "dmeta_version" in f.attrs
        assert 0 < f["topology"].attrs["lambda2"] < 1
        assert config_from_json(f.attrs["config"]) == config
    assert not (tmp_path / "run.h5.partial").exists()


def test_agents_start_from_their_own_models_unless_same_init(tmp_path) -> None:
    own = run_local(small_config("iterations=1", "log_every=1"), tmp_path / "a.h5")[
        "params/initial"
    ]
    assert not np.allclose(own[0], own[1])
    same = run_local(
        small_config("iterations=1", "log_every=1", "model.same_init=true"), tmp_path / "b.h5"
    )["params/initial"]
    np.testing.assert_array_equal(same[0], same[1])


def test_random_numbers_do_not_depend_on_which_agents_are_drawn_together() -> None:
    everyone = rng.uniform(5, torch.arange(10), rng.STREAM_TASKS, 3, (4, 6))
    block = rng.uniform(5, torch.arange(3, 7), rng.STREAM_TASKS, 3, (4, 6))
    torch.testing.assert_close(everyone[3:7], block, rtol=0, atol=0)
    assert not torch.equal(everyone[0], everyone[1])
    later = rng.uniform(5, torch.arange(10), rng.STREAM_TASKS, 4, (4, 6))
    assert not torch.equal(everyone, later)


def test_random_numbers_are_uniform() -> None:
    sample = rng.uniform(0, torch.arange(200), rng.STREAM_TASKS, 0, (500,), dtype=torch.float64)
    assert sample.min() >= 0 and sample.max() < 1
    assert abs(sample.mean().item() - 0.5) < 0.005
    assert abs(sample.var().item() - 1 / 12) < 0.002
    counts = torch.histc(sample, bins=10, min=0, max=1)
    assert (counts - 10000).abs().max() < 500  # about 5 standard deviations


def test_sine_tasks_follow_the_agent_amplitude_split() -> None:
    from dmeta.tasks import SineTask

    config = Config()
    task = SineTask(config.task, 40, 0, torch.float64, torch.device("cpu"))
    batch = task.sample(torch.tensor([0, 39]), 1, 50)
    peak = batch.support_y.abs().amax(dim=(1, 2, 3))
    width = (5.0 - 0.1) / 40
    assert peak[0] <= 0.1 + width + 1e-12
    assert peak[1] <= 5.0 + 1e-12 and batch.query_y[1].abs().max() > 5.0 - width - 0.5
    assert batch.support_x.min() >= -5 and batch.support_x.max() <= 5


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_is_respected(tmp_path, dtype) -> None:
    data = run_local(small_config(f"runtime.dtype={dtype}", "iterations=2"), tmp_path / "r.h5")
    assert data["params/final"].dtype == np.dtype(dtype)
    assert json.loads(h5py.File(tmp_path / "r.h5").attrs["config"])["runtime"]["dtype"] == dtype


def test_a_rerun_replaces_the_old_file_when_it_completes(tmp_path) -> None:
    # The command line refuses this without --overwrite (tests/test_badinput.py).
    path = tmp_path / "run.h5"
    run_local(small_config("iterations=2"), path)
    run_local(small_config("iterations=4"), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]
    with h5py.File(path) as f:
        assert f["time/iteration"][-1] == 4


def test_run_file_says_where_and_with_what_it_ran(tmp_path) -> None:
    run_local(small_config("iterations=1"), tmp_path / "r.h5")
    with h5py.File(tmp_path / "r.h5") as f:
        assert list(f.attrs["hosts_per_rank"]) and list(f.attrs["devices_per_rank"]) == ["cpu"]
        assert list(f.attrs["agent_counts_per_rank"]) == [7]
        for key in ("torch_version", "numpy_version", "h5py_version", "git_commit"):
            assert key in f.attrs


def test_centroid_stationarity_pairs_two_halves_of_the_network_meta_gradient(tmp_path) -> None:
    from dmeta.meta import MAML
    from dmeta.models import build_mlp
    from dmeta.tasks import SineTask, TaskBatch

    config = small_config(
        "runtime.dtype=float64", "iterations=4", "validation.stationarity_tasks=6"
    )
    data = run_local(config, tmp_path / "r.h5")
    task = SineTask(config.task, config.agents, config.seed, torch.float64, torch.device("cpu"))
    model = build_mlp(config.model, 1, 1)
    learner = MAML(model.forward, task.loss, config.learner.inner_lr, 1, first_order=False)
    agents = torch.arange(config.agents)
    tasks = task.sample(agents, config_digest(config), 6, rng.STREAM_STATIONARITY)
    centroid = torch.as_tensor(data["params/final"]).mean(dim=0).expand(config.agents, -1)
    # One task at a time: the network mean over agents of each half's tasks.
    per_task = torch.stack(
        [
            learner.meta_gradients(centroid, TaskBatch(*(p[:, t : t + 1] for p in tasks)))[0]
            for t in range(6)
        ],
        dim=1,
    )
    first, second = per_task[:, :3].mean(dim=(0, 1)), per_task[:, 3:].mean(dim=(0, 1))
    assert data["centroid/stationarity"][-1] == pytest.approx(float(first @ second), rel=1e-10)
    noise = float((first - second).square().sum()) / 4
    assert data["centroid/stationarity_noise"][-1] == pytest.approx(noise, rel=1e-10)
    # Together they are the plain squared norm of the mean over all tasks.
    whole = float(per_task.mean(dim=(0, 1)).square().sum())
    total = data["centroid/stationarity"][-1] + data["centroid/stationarity_noise"][-1]
    assert total == pytest.approx(whole, rel=1e-10)
    assert data["centroid/stationarity"].shape == (2,)


def test_stationarity_tasks_zero_turns_the_estimate_off(tmp_path) -> None:
    config = small_config("iterations=2", "validation.stationarity_tasks=0")
    data = run_local(config, tmp_path / "r.h5")
    assert np.isnan(data["centroid/stationarity"]).all()
    assert np.isnan(data["centroid/stationarity_noise"]).all()
    assert np.isfinite(data["centroid/val_loss"]).all()


def test_config_rejects_an_odd_number_of_stationarity_tasks() -> None:
    with pytest.raises(DmetaError, match="stationarity_tasks = 5 must be even"):
        small_config("validation.stationarity_tasks=5")


def test_a_diverging_run_stops_with_a_clear_error(tmp_path) -> None:
    config = small_config("optimizer.name=sgd", "optimizer.lr=1e6", "iterations=40")
    with pytest.raises(DmetaError, match="diverged by iteration .* lower optimizer.lr"):
        run_local(config, tmp_path / "r.h5")
    assert not (tmp_path / "r.h5").exists()


def test_compiled_local_training_runs_the_eager_rounds(tmp_path) -> None:
    """`compile_training` routes integer rounds through the compiled program with t as a
    counter tensor (here an identity compiler: the dispatch without torch.compile's cost):
    the eager rounds' numbers, and the launch models from before a round are left as they
    were (L2C keeps them to form its updates)."""

    def algorithm(name: str):
        config = small_config("runtime.dtype=float64", "strategy=l2c")
        return Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(7), tmp_path / name).algorithm

    eager, compiled = algorithm("eager.h5"), algorithm("compiled.h5")
    assert compiled.compile_training(lambda program: program) is not None
    for t in range(1, 4):
        before = compiled.training.launch_models
        kept = before.clone()
        expected, report = eager.round(t), compiled.round(t)
        assert torch.equal(before, kept)
        torch.testing.assert_close(report.loss_sum, expected.loss_sum, rtol=0, atol=0)
    torch.testing.assert_close(compiled.models(), eager.models(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "part"),
    [
        ([], "round"),
        (["graph.schedule=link_failures"], "training"),
        (["strategy=fedmeta", "federated.clients_per_round=3"], "round"),
        (["strategy=persafl", "asynchrony.concurrency=3"], "meta_gradients"),
    ],
)
def test_a_compiled_training_step_gives_the_eager_run(tmp_path, overrides, part) -> None:
    """runtime.compile=true compiles the whole round where it is device work alone (a static
    graph in one process: task draws by counter, meta-gradients, Adam, the mix; FedMeta's
    server round: the client sample, meta-gradients, the server's Adam), else the
    local training where the algorithm offers it (a graph that changes each round: the mix
    stays eager), else the training meta-gradients; numbers stay to rounding either way."""
    settings = ("runtime.dtype=float64", "graph.rule=metropolis", *overrides)
    eager = run_local(small_config(*settings), tmp_path / "eager.h5")
    compiled = run_local(small_config(*settings, "runtime.compile=true"), tmp_path / "compiled.h5")
    for name in ("metrics/train_loss", "metrics/val_loss", "params/final"):
        np.testing.assert_allclose(compiled[name], eager[name], rtol=1e-9, atol=1e-12)
    with h5py.File(tmp_path / "compiled.h5") as run:
        assert run.attrs["compiled"] and run["time"].attrs["compile_seconds"] > 0
        assert run["time"].attrs["compiled_part"] == part
        # A compiled round holds its mix: no time is counted apart as the combination's; a
        # compiled local training leaves the mix (timed) outside.
        combination = run["time/comm"][1:]
        if part == "round":
            assert (combination == 0).all()
        if part == "training":
            assert (combination > 0).all()
    with h5py.File(tmp_path / "eager.h5") as run:
        assert not run.attrs["compiled"] and "compile_seconds" not in run["time"].attrs


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["iterations=4999"], False),  # shorter than compile_after
        (["iterations=5000"], True),
        (["iterations=50", "runtime.compile_after=50"], True),
        (["iterations=5000", "strategy=fedmeta"], False),  # sampled clients
        (["iterations=5000", "strategy=pushsum", "graph.directed=true"], False),  # awake agents
        (["iterations=10", "runtime.compile=true"], True),
        (["iterations=9000", "runtime.compile=false"], False),
    ],
)
def test_runtime_compile_auto_compiles_long_runs_of_fixed_shape_steps(overrides, expected):
    from dmeta.algorithms import algorithm_class
    from dmeta.runner import resolve_compile

    config = small_config(*overrides)
    algorithm = algorithm_class(config.strategy)
    assert resolve_compile(config, algorithm, torch.device("cpu")) is expected


def test_runtime_compile_auto_stays_eager_without_a_cpp_compiler(monkeypatch) -> None:
    from dmeta.algorithms import algorithm_class
    from dmeta.runner import resolve_compile

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    config = small_config("iterations=5000")
    assert not resolve_compile(config, algorithm_class("atc"), torch.device("cpu"))


def test_runtime_compile_takes_toml_booleans(tmp_path) -> None:
    from dmeta.config import load_config

    job = tmp_path / "job.toml"
    job.write_text("[runtime]\ncompile = true\n")
    assert load_config(job, []).runtime.compile == "true"
    with pytest.raises(DmetaError, match="runtime.compile = 'sometimes' is not one of"):
        load_config(job, ["runtime.compile=sometimes"])


def test_centroid_is_the_perron_average_when_a_is_not_doubly_stochastic(tmp_path) -> None:
    from dmeta.topology import perron_vector

    config = small_config("graph.topology=star", "runtime.dtype=float64", "iterations=4")
    with pytest.warns(UserWarning, match="not doubly stochastic"):
        data = run_local(config, tmp_path / "star.h5")
    matrix = dense_matrix(data, 7)
    p = perron_vector(matrix)
    np.testing.assert_allclose(matrix @ p, p, atol=1e-14)
    assert not np.allclose(p, 1 / 7)
    final = data["params/final"]
    centroid = p @ final
    expected = ((final - centroid) ** 2).sum(axis=1)
    np.testing.assert_allclose(data["metrics/disagreement"][-1], expected, rtol=1e-10)
    with h5py.File(tmp_path / "star.h5") as f:
        assert f["topology"].attrs["centroid"] == "perron"
        assert f["centroid/disagreement"].attrs["centroid_weights"] == "perron"


def test_stationarity_sets_differ_between_runs_of_a_sweep() -> None:
    from dmeta.config import config_digest

    base = small_config()
    assert config_digest(base) == config_digest(small_config("output.flush_every=3"))
    assert config_digest(base) != config_digest(small_config("optimizer.lr=0.002"))
    assert 0 <= config_digest(base) < 2**47


@pytest.mark.parametrize(
    ("strategy", "part"), [("atc", "training round"), ("l2c", "local training")]
)
def test_runtime_compile_auto_runs_eagerly_when_compiling_fails(
    tmp_path, monkeypatch, strategy, part
) -> None:
    """A toolchain that cannot compile leaves an auto run eager, with a warning naming what
    failed to compile, and the numbers of the eager run; an explicit runtime.compile=true lets
    the failure through."""

    def broken(step, **options):
        def call(*args):
            raise RuntimeError("no working C++ compiler\nmore details")

        return call

    settings = ("runtime.dtype=float64", f"strategy={strategy}")
    eager = run_local(small_config(*settings), tmp_path / "eager.h5")
    monkeypatch.setattr(torch, "compile", broken)
    auto = small_config(*settings, "runtime.compile_after=1")
    with pytest.warns(UserWarning, match=f"compiling the {part} failed .*no working C"):
        data = run_local(auto, tmp_path / "auto.h5")
    np.testing.assert_array_equal(data["params/final"], eager["params/final"])
    with h5py.File(tmp_path / "auto.h5") as run:
        assert np.isnan(run["time"].attrs["compile_seconds"])
    with pytest.raises(RuntimeError, match="no working C"):
        run_local(small_config(*settings, "runtime.compile=true"), tmp_path / "true.h5")
