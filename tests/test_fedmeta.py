"""FedMeta and FedAvg (issue 15, step 1): a round against a hand-written loop, client sampling,
FedAvg against the centralized strategy, checkpoints, logged series and bad settings."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import LINEAR, read_datasets, run_local, small_config

from dmeta.algorithms.federated import sample_clients
from dmeta.engine import Engine, execute
from dmeta.errors import DmetaError
from dmeta.exchange import AgentLayout, LocalExchange
from dmeta.runner import plan_run
from dmeta.tasks import mse_loss

FEDMETA = ["strategy=fedmeta", "federated.clients_per_round=3", "runtime.dtype=float64"]
TINY = ["model.hidden=[8]", "learner.tasks_per_agent=2", "task.support_shots=4"]


def hand_written_gradient(forward, theta, tasks, client, inner_lr, learned, second_order):
    """Algorithm 1, lines 12-18 for one client, by torch.autograd: the query loss after one
    inner step on each task's support set, averaged over its tasks, differentiated in theta."""
    theta = theta.clone().requires_grad_()
    size = theta.shape[0] // 2 if learned else theta.shape[0]
    w, alpha = (theta[:size], theta[size:]) if learned else (theta, inner_lr)
    losses = []
    for sx, sy, qx, qy in zip(*(part[client] for part in tasks), strict=True):
        inner = mse_loss(forward(w, sx), sy)
        (gradient,) = torch.autograd.grad(inner, w, create_graph=second_order)
        losses.append(mse_loss(forward(w - alpha * gradient, qx), qy))
    (meta_gradient,) = torch.autograd.grad(torch.stack(losses).mean(), theta)
    return meta_gradient


@pytest.mark.parametrize("learner", ["maml", "metasgd"])
def test_one_round_equals_a_hand_written_loop_over_the_sampled_clients(tmp_path, learner):
    config = small_config(*FEDMETA, *TINY, f"learner.name={learner}", "federated.server_lr=0.01")
    engine = Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(config.agents), tmp_path / "r.h5")
    algorithm = engine.algorithm
    theta = algorithm.server[0].clone()
    algorithm.round(1)

    sampled = sample_clients(config.seed, 1, config.agents, 3)
    tasks = engine.task.sample(sampled, 1, config.learner.tasks_per_agent)
    forward, inner_lr, learned = engine.learner.forward, config.learner.inner_lr, learner != "maml"
    gradients = [
        hand_written_gradient(forward, theta, tasks, u, inner_lr, learned, True) for u in range(3)
    ]
    # The server's Adam on the equally weighted mean (Algorithm 1, line 9).
    expected = theta.clone().requires_grad_()
    optimizer = torch.optim.Adam([expected], lr=config.federated.server_lr)
    expected.grad = torch.stack(gradients).mean(dim=0)
    optimizer.step()
    torch.testing.assert_close(algorithm.server[0], expected.detach(), rtol=1e-12, atol=1e-14)
    if learned:  # the step sizes got their true gradient
        assert gradients[0][theta.shape[0] // 2 :].abs().max() > 0
    else:  # the second-order term matters: first order would be another update
        first = hand_written_gradient(forward, theta, tasks, 0, inner_lr, False, False)
        assert (first - gradients[0]).abs().max() > 1e-6 * gradients[0].abs().max()
    assert algorithm.participations.tolist() == [int(k in sampled) for k in range(7)]


def test_client_sampling_depends_on_seed_and_round_only() -> None:
    rounds = [sample_clients(5, t, 11, 4) for t in range(1, 301)]
    for sample in rounds[:20]:
        assert len(set(sample.tolist())) == 4 and sample.tolist() == sorted(sample.tolist())
        assert 0 <= sample.min() and sample.max() < 11
    assert len({tuple(s.tolist()) for s in rounds[:20]}) > 10, "rounds draw different clients"
    torch.testing.assert_close(sample_clients(5, 7, 11, 4), rounds[6], rtol=0, atol=0)
    assert any((sample_clients(6, t, 11, 4) != rounds[t - 1]).any() for t in range(1, 5))
    # Every client equally often (4/11 of the rounds), to sampling noise.
    frequency = torch.bincount(torch.cat(rounds), minlength=11) / len(rounds)
    assert (frequency - 4 / 11).abs().max() < 0.1
    # On any layout the ranks' sampled agents together are the sample.
    for size in (1, 2, 3, 4):
        layout = AgentLayout(11, size)
        for t in (1, 2, 3):
            sample = rounds[t - 1]
            parts = [torch.as_tensor(layout.agents(r)) for r in range(size)]
            mine = torch.cat([agents[torch.isin(agents, sample)] for agents in parts])
            assert mine.tolist() == sample.tolist()


def test_fedavg_with_every_client_and_one_step_equals_the_centralized_strategy(tmp_path) -> None:
    common = ["runtime.dtype=float64", "model.same_init=true", "learner.name=arm", *TINY]
    centralized = small_config(
        *common, "strategy=centralized", "optimizer.name=sgd", "optimizer.lr=0.05"
    )
    fedavg = small_config(
        *common,
        "strategy=fedavg",
        "federated.clients_per_round=7",
        "federated.client_lr=0.05",
        # The default server of fedavg (server_optimizer = auto) averages: plain FedAvg.
        # FedAvg(Meta): validation adapts the server model, as it adapts centralized's models.
        "federated.finetune_at_test=true",
    )
    expected = run_local(centralized, tmp_path / "centralized.h5")
    got = run_local(fedavg, tmp_path / "fedavg.h5")
    # (Stationarity tasks are keyed by a digest of the config, so they differ between the two.)
    # The server model is stored once ([1, M]); centralized stores its K equal rows.
    assert got["params/final"].shape == (1, expected["params/final"].shape[1])
    for name in ("params/initial", "params/final", "metrics/val_loss", "centroid/val_loss"):
        scale = np.abs(expected[name]).max()
        mine = np.broadcast_to(got[name], expected[name].shape)
        np.testing.assert_allclose(mine, expected[name], rtol=1e-10, atol=1e-12 * scale)
    assert got["federated/participations"][-1].tolist() == [12] * 7


def test_a_stopped_fedmeta_run_resumes_to_the_same_file(tmp_path) -> None:
    config = small_config(
        *FEDMETA, *TINY, "learner.name=metasgd", "iterations=20",
        "checkpoint.poll_every=3", "checkpoint.every_minutes=1e-9",
    )  # fmt: skip
    plan = plan_run(config, 1, 0, 0, 1)
    out = tmp_path / "run.h5"
    # Stopped at iteration 6, between the rows of 4 and 8: bytes since row 4 must survive.
    asked = iter([False, True])
    assert execute(plan, None, out, show_progress=False, stop_requested=lambda: next(asked)) == 6
    with h5py.File(f"{out}.ckpt") as f:
        assert "shared/server_model" in f and f["shared/server_optimizer/step"][()].tolist() == [6]
    assert execute(plan, None, out, show_progress=False, resume=True) is None
    resumed, reference = read_datasets(out), run_local(config, tmp_path / "reference.h5")
    assert resumed.keys() == reference.keys()
    for name in resumed:
        if not name.startswith("time/"):
            np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
    # Meta-SGD's rows are [w, alpha]: 2 x 25 parameters of 8 bytes, to and from 3 clients.
    row_bytes = 2 * 25 * 8
    rounds_since = np.diff(reference["time/iteration"], prepend=0)
    np.testing.assert_array_equal(reference["comm/bytes_up"], rounds_since * 3 * row_bytes)
    np.testing.assert_array_equal(reference["comm/bytes_down"], reference["comm/bytes_up"])
    participations = reference["federated/participations"]
    np.testing.assert_array_equal(participations.sum(axis=1), reference["time/iteration"] * 3)
    assert not reference["topology/edges"].size


@pytest.mark.parametrize("strategy", ["fedmeta", "fedavg"])
def test_federated_strategies_learn_linear_representations(tmp_path, strategy) -> None:
    config = small_config(
        *LINEAR, f"strategy={strategy}", "federated.clients_per_round=3", "iterations=40",
        "log_every=20", "federated.server_optimizer=sgd", "federated.server_lr=0.5",
        "federated.client_lr=0.1",
    )  # fmt: skip
    data = run_local(config, tmp_path / "linear.h5")
    distance = data["centroid/rep_distance"]
    assert distance[-1] < distance[0]
    assert np.isfinite(data["metrics/val_loss"]).all()
    # The server model is its own centroid, scored once for both series.
    np.testing.assert_array_equal(data["centroid/val_loss"], data["metrics/val_loss"][:, 0])


@pytest.mark.parametrize(
    "setting, message",
    [
        ("federated.clients_per_round=0", "clients_per_round = 0 must lie in [1, agents = 7]"),
        ("federated.clients_per_round=8", "clients_per_round = 8 must lie in [1, agents = 7]"),
        ("federated.server_lr=0", "federated.server_lr = 0.0 must be positive"),
        ("federated.server_optimizer=average", "'average' is FedAvg's server (the clients'"),
        ("federated.client_lr=-1", "federated.client_lr = -1.0 must be positive"),
        ("federated.local_epochs=0", "federated.local_epochs = 0 must be at least 1"),
        ("federated.batch_size=-1", "federated.batch_size = -1 must be 0 (a client's data as"),
        ("strategy=fedavg federated.batch_size=4", "it needs strategy = 'fedavg' with problem"),
        ("federated.batch_size=4", "it needs strategy = 'fedavg' with problem = 'federated'"),
        ("learner.local_steps=2", "set learner.local_steps = 1"),
        ("strategy=fedavg learner.name=metasgd", "'fedavg' trains no inner step sizes"),
        ("federated.finetune_lr=-1", "federated.finetune_lr = -1.0 must be positive, or 0"),
        ("federated.finetune_lr=0.1", "needs strategy = 'fedavg' with federated.finetune_at"),
        ("strategy=fedavg federated.finetune_lr=0.1", "with federated.finetune_at_test = true"),
    ],
)
def test_bad_federated_settings_give_one_line(setting, message) -> None:
    config = small_config("strategy=fedmeta", "federated.clients_per_round=3", *setting.split())
    with pytest.raises(DmetaError) as error:
        plan_run(config, 1, 0, 0, 1)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_renamed_local_steps_key_names_its_new_name() -> None:
    with pytest.raises(DmetaError) as error:
        small_config("strategy=fedavg", "federated.local_steps=2")
    message = str(error.value)
    assert "'federated.local_steps' is now 'federated.local_epochs'" in message
    assert "\n" not in message


def test_the_example_job_runs(tmp_path) -> None:
    job = Path(__file__).parent.parent / "jobs" / "fedmeta_sine.toml"
    from dmeta.config import load_config

    quick = ["iterations=3", "log_every=1", "validation.tasks=4", "runtime.threads=1"]
    config = load_config(job, quick)
    assert config.strategy == "fedmeta"
    data = run_local(config, tmp_path / "job.h5")
    assert data["comm/bytes_up"].shape == (4,)
