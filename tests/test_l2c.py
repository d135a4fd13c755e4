"""L2C (issue 17, step 1): one round against a hand-written loop over nodes, the alpha gradient
against finite differences, pruning, the logged weights, checkpoints and bad settings."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import in_neighbours, own_tasks, read_datasets, run_local, small_config

from dmeta import rng
from dmeta.algorithms.base import CommTimer
from dmeta.algorithms.l2c import smallest_weights
from dmeta.config import load_config
from dmeta.engine import Engine, execute
from dmeta.errors import DmetaError
from dmeta.exchange import LocalExchange
from dmeta.runner import plan_run

TINY = [
    "strategy=l2c", "runtime.dtype=float64", "model.hidden=[8]", "learner.tasks_per_agent=2",
    "task.support_shots=4", "l2c.validation_tasks=2",
]  # fmt: skip


def build(tmp_path: Path, *settings: str) -> Engine:
    config = small_config(*TINY, *settings)
    return Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(config.agents), tmp_path / "r.h5")


@pytest.mark.parametrize("decoupled", [False, True])
def test_rounds_equal_a_hand_written_loop_over_nodes(tmp_path, decoupled) -> None:
    """Two local SGD steps of MAML per node, eq. (2) on the updates, torch.optim.Adam with
    weight decay on each node's alpha (eq. 3), and pruning of the weakest neighbour after
    round 2 of the ring: every node, one at a time."""
    engine = build(
        tmp_path, "optimizer.name=sgd", "optimizer.lr=0.05", "l2c.local_epochs=2",
        "l2c.prune_round=2", "l2c.prune_count=1", "l2c.alpha_lr=0.3",
        f"l2c.alpha_decoupled_decay={str(decoupled).lower()}",
    )  # fmt: skip
    algorithm, learner, lr = engine.algorithm, engine.learner, 0.05
    neighbours = in_neighbours(engine)
    theta = algorithm.models().clone()
    alpha = [torch.zeros(len(n), dtype=torch.float64, requires_grad=True) for n in neighbours]
    adams = [
        torch.optim.Adam([a], lr=0.3, weight_decay=0.01, decoupled_weight_decay=decoupled)
        for a in alpha
    ]
    active = [torch.ones(len(n), dtype=torch.bool) for n in neighbours]
    for t in range(1, 4):
        half = []
        for i in range(7):
            w = theta[i]
            for step in range(2):
                tasks = own_tasks(engine, i, 2 * (t - 1) + step + 1, 2, rng.STREAM_TASKS)
                w = w - lr * torch.func.grad(learner.agent_meta_loss)(w, tasks)
            half.append(w)
        delta = theta - torch.stack(half)
        aggregated = []
        for i in range(7):
            w = torch.softmax(alpha[i].masked_fill(~active[i], -torch.inf), dim=0)
            model = theta[i] - sum(w[p] * delta[j] for p, j in enumerate(neighbours[i]))
            tasks = own_tasks(engine, i, t, 2, rng.STREAM_L2C_VALIDATION)
            adams[i].zero_grad()
            learner.agent_meta_loss(model, tasks).backward()
            adams[i].step()
            aggregated.append(model.detach())
        theta = torch.stack(aggregated)
        if t == 2:
            for i in range(7):
                key = alpha[i].detach().masked_fill(torch.tensor(neighbours[i]) == i, torch.inf)
                active[i][int(torch.argmin(key))] = False
        algorithm.round(t)
        torch.testing.assert_close(algorithm.models(), theta, rtol=1e-12, atol=1e-12)
        for i in range(7):
            w = torch.softmax(alpha[i].detach().masked_fill(~active[i], -torch.inf), dim=0)
            torch.testing.assert_close(algorithm.weights()[i], w, rtol=1e-10, atol=1e-12)
    assert (algorithm.weights() > 0).sum(dim=1).tolist() == [2] * 7


def test_the_alpha_gradient_equals_finite_differences(tmp_path) -> None:
    """d/d alpha of sum_i L(theta_i - sum_j w_ij Delta_j; D_i^val) through the exchange's mix,
    against central differences of the same losses after a dense aggregation."""
    engine = build(tmp_path, "graph.topology=erdos_renyi", "graph.edge_probability=0.5")
    algorithm = engine.algorithm
    generator = torch.Generator().manual_seed(3)
    valid = algorithm.valid
    alpha = torch.randn(valid.shape, generator=generator, dtype=torch.float64)
    algorithm.mixing["alpha"] = alpha
    start = algorithm.models().clone()
    updates = 0.3 * torch.randn(start.shape, generator=generator, dtype=torch.float64)
    aggregated, gradient = algorithm.aggregate(1, start, updates, CommTimer(start.device))
    neighbours = in_neighbours(engine)

    def losses(logits: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(logits.masked_fill(~valid, -torch.inf), dim=1)
        models = torch.stack([
            start[i] - sum(weights[i, p] * updates[j] for p, j in enumerate(sources))
            for i, sources in enumerate(neighbours)
        ])  # fmt: skip
        return algorithm.validation_loss(1, models), models

    torch.testing.assert_close(aggregated, losses(alpha)[1], rtol=1e-13, atol=1e-13)
    numeric = torch.zeros_like(alpha)
    step = 1e-6
    for i, p in valid.nonzero().tolist():
        shift = torch.zeros_like(alpha)
        shift[i, p] = step
        numeric[i, p] = (losses(alpha + shift)[0][i] - losses(alpha - shift)[0][i]) / (2 * step)
    assert gradient.abs().max() > 1e-3
    torch.testing.assert_close(gradient, numeric, rtol=1e-6, atol=1e-8)


def test_smallest_weights_keeps_the_rest_and_breaks_ties_by_slot() -> None:
    weights = torch.tensor([[0.1, 0.2, 0.1, 0.6], [0.5, 0.5, 0.0, 0.0]])
    candidates = torch.tensor([[True, True, True, False], [False, True, False, False]])
    dropped = smallest_weights(weights, candidates, 2)
    assert dropped.tolist() == [[True, False, True, False], [False, True, False, False]]


@pytest.mark.parametrize("count, survivors", [(4, 3), (10, 1)])
def test_pruning_keeps_self_and_a_distribution_over_the_surviving_edges(
    tmp_path, count, survivors
) -> None:
    """A complete graph of 7: after round 2 each node keeps itself and 6 - K0 neighbours (only
    itself when K0 >= 6); its logged weights sum to one over them, 0 on the pruned edges, and
    the exchange routes only the surviving edges."""
    config = small_config(
        *TINY, "graph.topology=complete", "l2c.prune_round=2", f"l2c.prune_count={count}",
        "iterations=4", "log_every=1",
    )  # fmt: skip
    data = run_local(config, tmp_path / "run.h5")
    edges, weights = data["topology/edges"], data["mixing/weights"]
    assert edges.shape == (49, 2) and weights.shape == (5, 49)
    np.testing.assert_allclose(data["topology/weights"], 1 / 7)
    sums = np.stack([np.bincount(edges[:, 1], weights=row, minlength=7) for row in weights])
    np.testing.assert_allclose(sums, 1.0, rtol=1e-12)
    own = edges[:, 0] == edges[:, 1]
    assert (weights[:, own] > 0).all(), "a node never drops itself"
    kept = np.bincount(edges[:, 1], weights=weights[-1] > 0, minlength=7)
    assert kept.tolist() == [survivors] * 7
    assert ((weights[-1] > 0) == (weights[2] > 0)).all() and (weights[1] > 0).all()
    engine = build(tmp_path, "graph.topology=complete", "l2c.prune_round=1",
                   f"l2c.prune_count={count}")  # fmt: skip
    engine.algorithm.round(1)
    engine.algorithm.round(2)
    assert len(engine.algorithm.route.edges) == 7 * survivors


def test_a_checkpoint_after_pruning_resumes_to_the_same_file(tmp_path) -> None:
    """Stopped at iteration 6, after pruning at 4: the pruned edges come back from the
    per-agent state and the route is rebuilt from them."""
    config = small_config(
        *TINY, "graph.topology=complete", "iterations=12", "l2c.prune_round=4",
        "l2c.prune_count=3", "checkpoint.poll_every=3", "checkpoint.every_minutes=1e-9",
    )  # fmt: skip
    plan = plan_run(config, 1, 0, 0, 1)
    out = tmp_path / "run.h5"
    asked = iter([False, True])
    assert execute(plan, None, out, show_progress=False, stop_requested=lambda: next(asked)) == 6
    with h5py.File(f"{out}.ckpt") as f:
        assert not f["agents/l2c/active"][()].all(), "pruned before the checkpoint"
    assert execute(plan, None, out, show_progress=False, resume=True) is None
    resumed, reference = read_datasets(out), run_local(config, tmp_path / "reference.h5")
    assert resumed.keys() == reference.keys()
    for name in resumed:
        if not name.startswith("time/"):
            np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("l2c.local_epochs=0", "l2c.local_epochs = 0 must be at least 1"),
        ("l2c.alpha_lr=0", "l2c.alpha_lr = 0.0 must be positive"),
        ("l2c.prune_count=-1", "l2c.prune_count = -1 must not be negative"),
        ("learner.local_steps=2", "leave learner.local_steps = 1"),
        ("graph.schedule=link_failures", "set graph.schedule = 'static'"),
    ],
)
def test_bad_l2c_settings_give_one_line(setting, message) -> None:
    with pytest.raises(DmetaError) as error:
        plan_run(small_config("strategy=l2c", setting), 1, 0, 0, 1)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_example_job_runs(tmp_path) -> None:
    job = Path(__file__).parent.parent / "jobs" / "l2c_sine.toml"
    quick = ["iterations=3", "log_every=1", "validation.tasks=4", "runtime.threads=1",
             "l2c.prune_round=2"]  # fmt: skip
    config = load_config(job, quick)
    assert config.strategy == "l2c" and config.l2c.prune_count > 0
    data = run_local(config, tmp_path / "job.h5")
    assert data["mixing/weights"].shape[0] == 4
