"""Validation on each agent's own tasks (validation.own_tasks; issues 16 item 4 and 17): the draws
do not depend on the rank layout, the batched evaluation equals a loop over agents, and the
centroid's score is the mean over every agent's tasks."""

from __future__ import annotations

import h5py
import numpy as np
import torch
from conftest import run_local, small_config

from dmeta.config import load_config
from dmeta.engine import Engine
from dmeta.exchange import AgentLayout, LocalExchange
from dmeta.runner import plan_run
from dmeta.tasks import SineTask, TaskBatch

OWN = ["validation.own_tasks=true", "runtime.dtype=float64", "model.hidden=[8]"]


def sine_family(agents: int = 7) -> SineTask:
    config = load_config(None, [f"agents={agents}"])
    return SineTask(config.task, agents, config.seed, torch.float64, torch.device("cpu"))


def test_own_tasks_are_the_same_on_any_layout_and_lie_in_the_agent_s_interval() -> None:
    family, validation = sine_family(), load_config(None, ["validation.tasks=3"]).validation
    whole = family.own_validation_set(torch.arange(7), validation)
    assert whole.support_x.shape == (7, 3, validation.support_shots, 1)
    for ranks in (2, 3):
        layout = AgentLayout(7, ranks)
        blocks = [
            family.own_validation_set(torch.as_tensor(layout.agents(r)), validation)
            for r in range(ranks)
        ]
        for part, joined in zip(whole, zip(*blocks, strict=True), strict=True):
            torch.testing.assert_close(torch.cat(joined), part, rtol=0, atol=0)
    # |y| <= A and agent k's amplitudes A lie in its k-th of 7 intervals of [0.1, 5.0].
    high = 0.1 + 0.7 * torch.arange(1, 8, dtype=torch.float64)
    assert (whole.query_y.abs().amax(dim=(1, 2, 3)) <= high).all()
    assert not torch.equal(whole.query_y, family.sample(torch.arange(7), 0, 3).query_y)


def test_the_batched_evaluation_equals_a_loop_over_agents(tmp_path) -> None:
    config = small_config(*OWN)
    engine = Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(7), tmp_path / "e.h5")
    models = engine.algorithm.models()
    own = engine.own_tasks
    batched = engine.learner.evaluate_own(models, own, 1, (), tasks_at_once=4)
    for k in range(7):
        tasks = TaskBatch(*(part[k] for part in own))
        looped = engine.learner.evaluate(models[k : k + 1], tasks, 1)[0]
        torch.testing.assert_close(batched[k], looped, rtol=1e-12, atol=1e-14)


def test_a_run_scores_every_agent_and_the_centroid_on_the_agents_own_tasks(tmp_path) -> None:
    """The last row against a hand-written loop over agents from /params/final: each agent's
    model and the centroid adapted on agent k's own tasks, drawn for agent k alone."""
    config = small_config(*OWN)
    out = tmp_path / "run.h5"
    data = run_local(config, out)
    engine = Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(7), tmp_path / "e.h5")
    models = torch.as_tensor(data["params/final"])
    centroid = models.mean(dim=0, keepdim=True)
    agents, at_centroid = [], []
    for k in range(7):
        tasks = engine.task.own_validation_set(torch.tensor([k]), config.validation)
        tasks = TaskBatch(*(part[0] for part in tasks))
        agents.append(engine.learner.evaluate(models[k : k + 1], tasks, 1).mean())
        at_centroid.append(engine.learner.evaluate(centroid, tasks, 1).mean())
    np.testing.assert_allclose(data["metrics/val_loss"][-1], torch.stack(agents), rtol=1e-12)
    np.testing.assert_allclose(data["centroid/val_loss"][-1], np.mean(at_centroid), rtol=1e-12)
    with h5py.File(out) as file:
        assert "own fixed validation tasks" in file["metrics/val_loss"].attrs["description"]
        assert "each agent's own" in file["centroid/val_loss"].attrs["description"]


def test_a_shared_model_is_scored_on_each_client_s_own_tasks(tmp_path) -> None:
    config = small_config(*OWN, "strategy=fedmeta", "federated.clients_per_round=3")
    data = run_local(config, tmp_path / "run.h5")
    validation = data["metrics/val_loss"]
    assert (validation.std(axis=1) > 0).all()  # one model, the clients' own tasks
    np.testing.assert_allclose(data["centroid/val_loss"], validation.mean(axis=1), rtol=1e-12)
