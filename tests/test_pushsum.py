"""PARS-Push (issue 16, items 1-6): running-sums push-sum against a hand-written synchronous
loop, exact averaging and mass conservation under asynchrony, layout-independent events,
checkpoints with messages in flight, logged series and bad settings."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import read_datasets, run_local, small_config

from dmeta.algorithms.base import CommTimer
from dmeta.algorithms.pushsum import (
    RunningSums,
    loss_draws,
    message_delays,
    plan_push,
    wake_draws,
)
from dmeta.config import load_config
from dmeta.engine import Engine, execute
from dmeta.errors import DmetaError
from dmeta.exchange import LocalExchange
from dmeta.runner import plan_run

DIGRAPH = ["graph.directed=true", "graph.topology=exponential", "runtime.dtype=float64"]
TINY = ["model.hidden=[8]", "learner.tasks_per_agent=2", "task.support_shots=4"]
ASYNC = [
    "asynchrony.wake_probability=0.5",
    "asynchrony.max_sleep=4",
    "asynchrony.max_delay=3",
    "asynchrony.loss_probability=0.3",
    "asynchrony.max_consecutive_losses=2",
]


def consensus(settings: list[str], rounds: int, rows: torch.Tensor, check=None) -> RunningSums:
    """Push-sum alone (no gradient step) on 8 agents of the directed exponential graph;
    `check(t, sums)` after every round."""
    config = small_config("agents=8", *DIGRAPH, *settings)
    plan = plan_push(config)
    exchange = LocalExchange(config.agents)
    sums = RunningSums(exchange, plan, torch.arange(config.agents), config.seed, rows)
    timer = CommTimer(torch.device("cpu"))
    for t in range(1, rounds + 1):
        sums.push(t, sums.wake(t), timer)
        if check is not None:
            check(t, sums)
    return sums


def total_mass(sums: RunningSums) -> torch.Tensor:
    """sum_i (x_i, y_i) + sum over edges j -> i of phi_j - rho_ij: what the agents hold plus
    what was sent and not yet applied (in flight, lost or waiting in an inbox)."""
    plan, rows = sums.plan, sums.rows
    in_flight = rows["sent"][plan.sources] - rows["applied"][plan.destinations, plan.slots]
    return rows["numerator"].sum(dim=0) + in_flight.sum(dim=0)


def test_synchronous_pushsum_equals_a_hand_written_sgp_loop(tmp_path) -> None:
    """Wake 1, loss 0, delay 1 (the defaults): x <- P^T (x - mu g(z)), y <- P^T y, z = x / y
    (stochastic gradient push), with the learner's MAML meta-gradients and SGD."""
    config = small_config(*DIGRAPH, *TINY, "strategy=pushsum", "optimizer.name=sgd")
    engine = Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(config.agents), tmp_path / "r.h5")
    algorithm = engine.algorithm
    push = torch.as_tensor(algorithm.sums.plan.push.matrix.toarray())
    assert (push.sum(dim=1) == 1).all() and (push.diagonal() == 0.25).all()
    x, y = algorithm.models().clone(), torch.ones(7, 1, dtype=torch.float64)
    agents = torch.arange(7)
    for t in range(1, 4):
        tasks = engine.task.sample(agents, t, config.learner.tasks_per_agent)
        gradients, _ = engine.learner.meta_gradients(x / y, tasks)
        x = push.T @ (x - config.optimizer.lr * gradients)
        y = push.T @ y
        algorithm.round(t)
        torch.testing.assert_close(algorithm.models(), x / y, rtol=1e-12, atol=1e-12)
        weight = algorithm.row_values()["pushsum/weight"]
        torch.testing.assert_close(weight, y[:, 0], rtol=1e-12, atol=1e-14)
    assert (x / y - x.mean(dim=0)).abs().max() > 1e-3, "the agents still disagree"


@pytest.mark.parametrize("scaled", [False, True])
def test_a_step_scaled_by_the_weight_moves_z_by_the_optimizer_s_step(tmp_path, scaled) -> None:
    """RASGP's x_i - mu g(z_i) moves z_i = x_i / y_i by -mu g / y_i; with
    asynchrony.scale_step_by_weight, x_i - y_i mu g moves it by -mu g, whatever y_i. Checked on
    the awake agents of a round whose push is left out, after rounds that spread the weights."""
    config = small_config(
        *DIGRAPH, *TINY, *ASYNC, "strategy=pushsum", "optimizer.name=sgd", "optimizer.lr=0.1",
        f"asynchrony.scale_step_by_weight={str(scaled).lower()}",
    )  # fmt: skip
    engine = Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(7), tmp_path / "r.h5")
    algorithm = engine.algorithm
    for t in range(1, 6):
        algorithm.round(t)
    y = algorithm.sums.rows["numerator"][:, -1].clone()
    assert (y - 1).abs().max() > 0.1, "the weights left 1"
    before = algorithm.models().clone()
    algorithm.sums.push = lambda *_: None  # round 6: wake-ups and steps only
    algorithm.round(6)
    awake = torch.nonzero(algorithm.sums.rows["asleep"] == 0).flatten()
    assert 0 < len(awake) < 7
    tasks = engine.task.sample(awake, 6, config.learner.tasks_per_agent)
    gradients, _ = engine.learner.meta_gradients(before[awake], tasks)
    step = -config.optimizer.lr * gradients
    expected = before.clone()
    expected[awake] += step if scaled else step / y[awake, None]
    torch.testing.assert_close(algorithm.models(), expected, rtol=1e-12, atol=1e-14)


def test_the_scaled_step_changes_nothing_while_every_weight_is_one(tmp_path) -> None:
    """Synchronous push-sum on a regular digraph keeps y = 1: both steps give the same file."""
    config = small_config(*DIGRAPH, *TINY, "strategy=pushsum")
    plain = run_local(config, tmp_path / "plain.h5")
    config.asynchrony.scale_step_by_weight = True
    scaled = run_local(config, tmp_path / "scaled.h5")
    np.testing.assert_array_equal(plain["pushsum/weight"], 1.0)
    for name in ("params/final", "metrics/val_loss", "metrics/train_loss"):
        np.testing.assert_array_equal(scaled[name], plain[name], err_msg=name)


@pytest.mark.parametrize("wake", [1.0, 0.5])
def test_z_converges_to_the_exact_average_under_loss_and_delays(wake) -> None:
    rows = torch.as_tensor(np.random.default_rng(3).standard_normal((8, 5)))
    settings = [*ASYNC, f"asynchrony.wake_probability={wake}"]
    sums = consensus(settings, 250, rows)
    torch.testing.assert_close(sums.estimates(), rows.mean(dim=0).expand(8, -1), rtol=0, atol=1e-9)
    assert sums.rows["losses"].max() > 0, "some messages were lost"


@pytest.mark.parametrize(
    "settings",
    [
        [],
        ASYNC,
        ["asynchrony.loss_probability=1", "asynchrony.max_consecutive_losses=3"],
        ["asynchrony.wake_probability=0.2", "asynchrony.max_delay=5"],
        ["asynchrony.max_delay=2", "asynchrony.loss_probability=0.5"],
    ],
)
def test_mass_held_plus_mass_in_flight_is_conserved_every_round(settings) -> None:
    """Also: a message older than the last applied one is never applied (the send rounds of
    the inboxes and of the applied sums never go back), and every weight stays positive."""
    rows = torch.as_tensor(np.random.default_rng(4).standard_normal((8, 3)))
    initial = torch.cat([rows.sum(dim=0), torch.tensor([8.0], dtype=torch.float64)])
    last = {"inbox_round": 0, "applied_round": 0}

    def check(t: int, sums: RunningSums) -> None:
        torch.testing.assert_close(total_mass(sums), initial, rtol=0, atol=1e-12)
        torch.testing.assert_close(sums.local_mass(), initial, rtol=0, atol=1e-12)
        for name, before in last.items():
            assert (sums.rows[name] >= before).all(), name
            last[name] = sums.rows[name].clone()
        assert (sums.rows["numerator"][:, -1] > 0).all()

    sums = consensus(settings, 40, rows, check)
    assert sums.rows["messages"].sum() > 0


def test_with_no_gradient_step_every_z_reaches_the_exact_average_of_the_launch_models(
    tmp_path,
) -> None:
    """learner.local_steps = 0 under loss, delays and sleep: push-sum consensus alone; the
    logged error to the push-sum limit falls to rounding, and the final estimates are the mean
    of the launch models."""
    config = small_config(
        *DIGRAPH, *ASYNC, "strategy=pushsum", "learner.local_steps=0", "iterations=200",
        "log_every=40", "validation.stationarity_tasks=0", "validation.tasks=2",
    )  # fmt: skip
    data = run_local(config, tmp_path / "run.h5")
    error = data["pushsum/consensus_error"]
    assert error.shape == (6, 7) and error[0].mean() > 1 and error[-1].max() < 1e-22
    assert np.all(np.diff(error.mean(axis=1)) < 0)
    average = data["params/initial"].mean(axis=0)
    np.testing.assert_allclose(data["params/final"], np.tile(average, (7, 1)), rtol=0, atol=1e-12)
    assert np.isnan(data["metrics/train_loss"]).all() and data["comm/messages"][1:].min() > 0


def test_no_gradient_step_is_pushsum_s_alone() -> None:
    with pytest.raises(DmetaError) as error:
        small_config("learner.local_steps=0")
    assert "learner.local_steps = 0 must be at least 1 (0, no gradient step, only with" in str(
        error.value
    )


def test_events_are_the_same_for_any_subset_of_agents_or_edges() -> None:
    everyone = torch.arange(40)
    subsets = [torch.arange(3, 11), torch.tensor([0, 39, 17])]
    for t in (1, 2, 1000):
        for draw, argument in ((wake_draws, 0.3), (loss_draws, 0.3), (message_delays, 3)):
            full = draw(7, everyone, t, argument)
            for subset in subsets:
                assert torch.equal(draw(7, subset, t, argument), full[subset])
    delays = torch.stack([message_delays(7, everyone, t, 3) for t in range(1, 201)])
    assert set(delays.unique().tolist()) == {1, 2, 3}
    assert abs(float((delays == 3).double().mean()) - 1 / 3) < 0.02
    woken = torch.stack([wake_draws(7, everyone, t, 0.3) for t in range(1, 201)])
    assert abs(float(woken.double().mean()) - 0.3) < 0.02
    assert not torch.equal(wake_draws(8, everyone, 1, 0.5), wake_draws(7, everyone, 1, 0.5))


def test_wake_ups_and_losses_respect_their_bounds() -> None:
    """Gamma_w: a wake-up in every max_sleep consecutive rounds; Gamma_f: at most
    max_consecutive_losses lost messages in a row on any edge."""
    rows = torch.zeros(8, 1, dtype=torch.float64)
    seen: dict[str, list] = {"awake": [], "losses": []}

    def check(t: int, sums: RunningSums) -> None:
        seen["awake"].append(sums.rows["asleep"] == 0)
        seen["losses"].append(sums.rows["losses"].max())

    settings = [
        "asynchrony.wake_probability=0.1", "asynchrony.max_sleep=3",
        "asynchrony.loss_probability=0.9", "asynchrony.max_consecutive_losses=2",
    ]  # fmt: skip
    consensus(settings, 60, rows, check)
    awake = torch.stack(seen["awake"])
    windows = awake.unfold(0, 3, 1).any(dim=2)
    assert windows.all() and not awake.all()
    assert max(seen["losses"]) == 2


def test_a_checkpoint_with_messages_in_flight_resumes_to_the_same_file(tmp_path) -> None:
    config = small_config(
        *DIGRAPH, *TINY, *ASYNC, "strategy=pushsum", "iterations=20",
        "checkpoint.poll_every=3", "checkpoint.every_minutes=1e-9",
    )  # fmt: skip
    plan = plan_run(config, 1, 0, 0, 1)
    out = tmp_path / "run.h5"
    asked = iter([False, True])
    assert execute(plan, None, out, show_progress=False, stop_requested=lambda: next(asked)) == 6
    with h5py.File(f"{out}.ckpt") as f:
        assert (f["agents/pushsum/flight_round"][()] > 0).any(), "messages in flight"
        assert (f["agents/pushsum/messages"][()] > 0).any(), "messages not yet logged"
    assert execute(plan, None, out, show_progress=False, resume=True) is None
    resumed, reference = read_datasets(out), run_local(config, tmp_path / "reference.h5")
    assert resumed.keys() == reference.keys()
    for name in resumed:
        if not name.startswith("time/"):
            np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


def test_logged_series_count_messages_and_weights(tmp_path) -> None:
    config = small_config(*DIGRAPH, *TINY, "strategy=pushsum", "asynchrony.wake_probability=0.4")
    data = run_local(config, tmp_path / "run.h5")
    plan = plan_push(config)
    asleep, sent = torch.zeros(7, dtype=torch.int64), []
    for t in range(1, config.iterations + 1):
        awake = wake_draws(config.seed, torch.arange(7), t, 0.4) | (asleep >= 9)
        asleep = torch.where(awake, 0, asleep + 1)
        sent.append(int(plan.out_degree[awake.numpy()].sum()))
    expected = [0] + [sum(sent[t - 4 : t]) for t in (4, 8, 12)]
    np.testing.assert_array_equal(data["comm/messages"], expected)
    assert data["pushsum/weight"].shape == (4, 7)
    assert data["pushsum/consensus_error"].shape == (4, 7)
    np.testing.assert_allclose(data["pushsum/weight"].sum(axis=1)[0], 7.0)
    assert data["topology/edges"].shape == (7 + 21, 2)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("asynchrony.wake_probability=0", "wake_probability = 0.0 must lie in (0, 1]"),
        ("asynchrony.wake_probability=1.5", "wake_probability = 1.5 must lie in (0, 1]"),
        ("asynchrony.loss_probability=-0.1", "loss_probability = -0.1 must lie in [0, 1]"),
        ("asynchrony.max_delay=0", "asynchrony.max_delay = 0 must be at least 1"),
        ("asynchrony.max_sleep=0", "asynchrony.max_sleep = 0 must be at least 1"),
        ("asynchrony.max_consecutive_losses=-1", "must not be negative"),
        ("graph.schedule=link_failures", "set graph.schedule = 'static'"),
    ],
)
def test_bad_asynchrony_settings_give_one_line(setting, message) -> None:
    with pytest.raises(DmetaError) as error:
        plan_run(small_config("strategy=pushsum", setting), 1, 0, 0, 1)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("directed", ["false", "true"])
def test_a_graph_that_is_not_strongly_connected_gives_one_line(tmp_path, directed) -> None:
    """Undirected: two components, so not strongly connected as a symmetric digraph either;
    directed: a path 0 -> 1 -> ... -> 6 (connected, not strongly)."""
    edges = "0 1\n1 2\n2 0\n3 4\n4 5\n5 6\n6 3\n" if directed == "false" else "0 1\n1 2\n2 3\n"
    path = tmp_path / "edges.txt"
    path.write_text(edges + ("3 4\n4 5\n5 6\n" if directed == "true" else ""))
    config = small_config(
        "strategy=pushsum", "graph.topology=edge_list", f"graph.edge_list_path={path}",
        f"graph.directed={directed}",
    )  # fmt: skip
    with pytest.raises(DmetaError) as error:
        plan_run(config, 1, 0, 0, 1)
    text = str(error.value)
    assert "strongly connected components: push-sum needs a strongly connected graph" in text
    assert "\n" not in text


def test_the_example_job_runs(tmp_path) -> None:
    job = Path(__file__).parent.parent / "jobs" / "pushsum_sine.toml"
    quick = ["iterations=3", "log_every=1", "validation.tasks=4", "runtime.threads=1"]
    config = load_config(job, quick)
    assert config.strategy == "pushsum"
    data = run_local(config, tmp_path / "job.h5")
    assert data["comm/messages"].shape == (4,) and (data["comm/messages"][1:] > 0).all()
