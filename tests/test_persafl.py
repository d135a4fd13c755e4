"""PersA-FL (issue 16, items 7-8): the asynchronous server against synchronous FedMeta and a
hand-computed schedule, staleness weights, layout independence, resume, the synchronous virtual
clock of FedMeta, and bad settings."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import read_datasets, run_local, small_config

from dmeta.algorithms.federated import client_durations, sample_clients
from dmeta.algorithms.persafl import Flush, Schedule, Update
from dmeta.config import AsynchronyConfig, load_config
from dmeta.engine import Engine, execute
from dmeta.errors import DmetaError
from dmeta.exchange import LocalExchange
from dmeta.runner import plan_run

TINY = [
    "runtime.dtype=float64", "model.hidden=[8]", "learner.tasks_per_agent=2",
    "task.support_shots=4",
]  # fmt: skip
ASYNC = [
    "strategy=persafl", "asynchrony.concurrency=4", "asynchrony.buffer_size=2",
    "asynchrony.max_staleness=2", "asynchrony.speed_distribution=pareto",
]  # fmt: skip


def test_synchronous_settings_give_fedmeta(tmp_path) -> None:
    """concurrency = buffer_size = 3, no staleness, equal speeds: every instant is a round with
    FedMeta's clients, tasks and update."""
    common = [*TINY, "federated.server_lr=0.01"]
    fedmeta = small_config(*common, "strategy=fedmeta", "federated.clients_per_round=3")
    persafl = small_config(
        *common, "strategy=persafl", "asynchrony.concurrency=3", "asynchrony.buffer_size=3",
        "asynchrony.max_staleness=0",
    )  # fmt: skip
    expected = run_local(fedmeta, tmp_path / "fedmeta.h5")
    got = run_local(persafl, tmp_path / "persafl.h5")
    names = (
        "params/final", "metrics/val_loss", "metrics/train_loss", "metrics/grad_norm",
        "federated/participations", "comm/bytes_up", "time/virtual",
    )  # fmt: skip
    for name in names:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    np.testing.assert_array_equal(got["time/virtual"], got["time/iteration"])
    np.testing.assert_array_equal(got["federated/staleness/0"], got["time/iteration"] * 3)
    assert got["federated/dropped"][-1] == 0
    # The next model goes out at the flush: 3 more downloads than FedMeta, the first ones.
    assert got["comm/bytes_down"].sum() == expected["comm/bytes_down"].sum() * 13 / 12


def _hand_schedule() -> Schedule:
    """Three clients taking 1, 2.5 and 4 time units, all busy, buffers of 2, staleness <= 1."""
    settings = AsynchronyConfig(concurrency=3, buffer_size=2, max_staleness=1)
    return Schedule(5, np.array([1.0, 2.5, 4.0]), settings)


def test_the_schedule_against_a_hand_computed_one() -> None:
    schedule = _hand_schedule()
    flushes = [schedule.step() for _ in range(4)]
    assert flushes == [
        # t = 1: c0 (version 0); t = 2: c0 again, flush to version 1.
        Flush([Update(0, 0, 1, 0), Update(0, 0, 2, 0)], 2.0, [0, 0], [0, 1, 2, 0, 0]),
        # t = 2.5: c1's version-0 update arrives at version 1 (staleness 1); t = 3: c0 flushes.
        Flush([Update(1, 0, 1, 1), Update(0, 1, 3, 0)], 3.0, [1, 0], [1, 0]),
        # t = 4: c0, then c2's version-0 update (staleness 2) is dropped; t = 5: c0 flushes
        # before c1, which arrives at the same instant.
        Flush([Update(0, 2, 5, 0), Update(0, 2, 6, 0)], 5.0, [0, 2, 0], [0, 2]),
        # Still t = 5: c1 (version 1, now 3) is dropped; c0 at 6 and 7.
        Flush([Update(0, 3, 7, 0), Update(0, 3, 8, 0)], 7.0, [1, 0, 0], [0, 1, 0, 0]),
    ]
    assert schedule.histogram.tolist() == [7, 1] and schedule.dropped == 2
    assert schedule.busy == {2: (8.0, 2, 6), 1: (7.5, 3, 7), 0: (8.0, 4, 9)}


def test_updates_are_weighted_by_staleness_at_the_versions_they_downloaded(tmp_path) -> None:
    """Rounds 1 and 2 of the hand-computed schedule: theta_1 = theta_0 - lr (g_0 + g_0') / 2,
    theta_2 = theta_1 - lr (g_1(theta_0) / 2 + g_0(theta_1)) / (1/2 + 1)."""
    config = small_config(
        *TINY, "strategy=persafl", "asynchrony.concurrency=3", "asynchrony.buffer_size=2",
        "asynchrony.max_staleness=1", "federated.server_optimizer=sgd", "federated.server_lr=0.5",
    )  # fmt: skip
    engine = Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(config.agents), tmp_path / "r.h5")
    algorithm = engine.algorithm
    algorithm.schedule = _hand_schedule()

    def gradient(theta: torch.Tensor, client: int, draw: int) -> torch.Tensor:
        clients = torch.tensor([client])
        tasks = engine.task.sample(clients, draw, config.learner.tasks_per_agent)
        return engine.learner.meta_gradients(theta[None], tasks)[0][0]

    theta0 = algorithm.server[0].clone()
    algorithm.round(1)
    theta1 = theta0 - 0.5 * (gradient(theta0, 0, 1) + gradient(theta0, 0, 2)) / 2
    torch.testing.assert_close(algorithm.server[0], theta1, rtol=1e-12, atol=1e-14)
    algorithm.round(2)
    step = (gradient(theta0, 1, 1) / 2 + gradient(theta1, 0, 3)) / 1.5
    torch.testing.assert_close(algorithm.server[0], theta1 - 0.5 * step, rtol=1e-12, atol=1e-14)
    assert float(algorithm.virtual_time[0]) == 3.0
    assert algorithm.participations[:3].tolist() == [3, 1, 0]


def test_the_schedule_is_the_same_on_every_rank_layout(tmp_path) -> None:
    """Every rank of 1, 2 or 3 simulates the whole server from (seed, durations) alone."""
    config = small_config(*TINY, *ASYNC)

    def flushes(size: int, rank: int) -> list[Flush]:
        plan = plan_run(config, size, rank, rank, size)
        engine = Engine(plan, LocalExchange(config.agents), tmp_path / f"{size}_{rank}.h5")
        return [engine.algorithm.schedule.step() for _ in range(30)]

    reference = flushes(1, 0)
    for size in (2, 3):
        for rank in range(size):
            assert flushes(size, rank) == reference
    staleness = [update.staleness for flush in reference for update in flush.updates]
    assert max(staleness) == 2 and min(staleness) == 0, "the setting exercises staleness"


def test_client_durations() -> None:
    for name in ("exponential", "lognormal", "pareto"):
        settings = AsynchronyConfig(speed_distribution=name, speed_shape=1.5)
        durations = client_durations(3, 4000, settings)
        np.testing.assert_array_equal(durations, client_durations(3, 4000, settings))
        np.testing.assert_array_equal(durations[:10], client_durations(3, 10, settings))
        assert (durations > 0).all() and len(set(durations.tolist())) == 4000
        median = {"exponential": np.log(2), "lognormal": 1.0, "pareto": 2 ** (1 / 1.5)}[name]
        assert abs(np.median(durations) / median - 1) < 0.08, name
    pareto = client_durations(3, 4000, AsynchronyConfig(speed_distribution="pareto"))
    assert pareto.min() >= 1 and pareto.max() > 50, "heavy-tailed"
    assert (client_durations(3, 5, AsynchronyConfig()) == 1).all()


def test_fedmeta_waits_for_its_slowest_sampled_client(tmp_path) -> None:
    config = small_config(
        *TINY, "strategy=fedmeta", "federated.clients_per_round=3",
        "asynchrony.speed_distribution=exponential",
    )  # fmt: skip
    data = run_local(config, tmp_path / "fedmeta.h5")
    durations = client_durations(config.seed, 7, config.asynchrony)
    rounds = [durations[sample_clients(config.seed, t, 7, 3).numpy()].max() for t in range(13)]
    clock = np.cumsum([0.0, *rounds[1:]])
    np.testing.assert_allclose(data["time/virtual"], clock[data["time/iteration"]], rtol=1e-14)


def test_a_stopped_persafl_run_resumes_to_the_same_file(tmp_path) -> None:
    config = small_config(
        *TINY, *ASYNC, "iterations=20", "checkpoint.poll_every=3",
        "checkpoint.every_minutes=1e-9",
    )  # fmt: skip
    plan = plan_run(config, 1, 0, 0, 1)
    out = tmp_path / "run.h5"
    asked = iter([False, True])
    assert execute(plan, None, out, show_progress=False, stop_requested=lambda: next(asked)) == 6
    with h5py.File(f"{out}.ckpt") as f:
        assert f["shared/version"][()].tolist() == [6]
        assert f["shared/server_versions"].shape[0] == 3
    assert execute(plan, None, out, show_progress=False, resume=True) is None
    resumed, reference = read_datasets(out), run_local(config, tmp_path / "reference.h5")
    assert resumed.keys() == reference.keys()
    for name in resumed:
        if name.startswith("time/") and name != "time/virtual":
            continue
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
    # Every upload was accepted into a buffer or dropped.
    histogram = sum(reference[f"federated/staleness/{tau}"] for tau in range(3))
    np.testing.assert_array_equal(histogram, reference["time/iteration"] * 2)
    uploads = np.cumsum(reference["comm/bytes_up"]) / (25 * 8)
    np.testing.assert_array_equal(uploads, histogram + reference["federated/dropped"])
    assert reference["federated/dropped"][-1] > 0 and np.all(np.diff(reference["time/virtual"]) > 0)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("asynchrony.concurrency=0", "asynchrony.concurrency = 0 must be at least 1"),
        ("asynchrony.concurrency=8", "asynchrony.concurrency = 8 must lie in [1, agents = 7]"),
        ("asynchrony.buffer_size=0", "asynchrony.buffer_size = 0 must be at least 1"),
        ("asynchrony.max_staleness=-1", "asynchrony.max_staleness = -1 must not be negative"),
        ("asynchrony.speed_shape=0", "asynchrony.speed_shape = 0.0 must be positive"),
        ("asynchrony.speed_distribution=weibull", "is not one of 'constant', 'exponential'"),
        ("federated.server_lr=0", "federated.server_lr = 0.0 must be positive"),
        ("federated.server_optimizer=average", "strategy = 'persafl' returns meta-gradients"),
        ("learner.local_steps=2", "set learner.local_steps = 1"),
        ("federated.batch_size=4", "strategy = 'persafl' does not read it, set it to 0"),
    ],
)
def test_bad_persafl_settings_give_one_line(setting, message) -> None:
    with pytest.raises(DmetaError) as error:
        plan_run(small_config("strategy=persafl", "asynchrony.concurrency=3", setting), 1, 0, 0, 1)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_example_job_runs(tmp_path) -> None:
    job = Path(__file__).parent.parent / "jobs" / "persafl_sine.toml"
    quick = ["iterations=3", "log_every=1", "validation.tasks=4", "runtime.threads=1"]
    config = load_config(job, quick)
    assert config.strategy == "persafl" and config.asynchrony.speed_distribution == "pareto"
    data = run_local(config, tmp_path / "job.h5")
    assert data["time/virtual"].shape == (4,) and data["time/virtual"][-1] > 0
