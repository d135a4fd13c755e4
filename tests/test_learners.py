"""The learner family against closed forms on quadratic tasks, and local steps in the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_local, small_config
from test_meta import DIM, F64, HESSIAN, generator, quadratic_forward, quadratic_loss

from dmeta.config import ModelConfig
from dmeta.meta import MAML, Reptile
from dmeta.models import build_mlp
from dmeta.tasks import TaskBatch

ALPHA = 0.1
EYE = torch.eye(DIM, dtype=F64)


def one_task() -> tuple[torch.Tensor, TaskBatch, torch.Tensor, torch.Tensor]:
    """A launch model and one quadratic task (support centre c_in, query centre c_out)."""
    w = torch.randn(DIM, generator=generator, dtype=F64)
    c_in = torch.randn(1, 1, 1, DIM, generator=generator, dtype=F64)
    c_out = torch.randn(1, 1, 1, DIM, generator=generator, dtype=F64)
    return w, TaskBatch(c_in, c_in, c_out, c_out), c_in.flatten(), c_out.flatten()


def gradient(learner: MAML, theta: torch.Tensor, tasks: TaskBatch) -> torch.Tensor:
    return learner.meta_gradients(theta[None], tasks)[0][0]


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_adapts_only_the_masked_head(first_order: bool) -> None:
    w, tasks, c_in, c_out = one_task()
    mask = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=F64)
    learner = MAML(quadratic_forward, quadratic_loss, ALPHA, 1, first_order, inner_mask=mask)
    adapted = w - ALPHA * mask * (HESSIAN @ (w - c_in))
    outer = HESSIAN @ (adapted - c_out)
    # d w'/d w = I - alpha D H, D = diag(mask); its transpose is I - alpha H D.
    expected = outer if first_order else (EYE - ALPHA * HESSIAN @ torch.diag(mask)) @ outer
    torch.testing.assert_close(gradient(learner, w, tasks), expected, rtol=1e-12, atol=1e-12)


def test_meta_sgd_learns_its_step_sizes() -> None:
    w, tasks, c_in, c_out = one_task()
    learner = MAML(quadratic_forward, quadratic_loss, ALPHA, 1, False, learned_inner_lr=True)
    theta = learner.initial_state(w[None])[0]
    torch.testing.assert_close(theta[DIM:], torch.full((DIM,), ALPHA, dtype=F64))
    steps = torch.linspace(0.05, 0.2, DIM, dtype=F64)
    theta = torch.cat([w, steps])
    inner = HESSIAN @ (w - c_in)
    outer = HESSIAN @ (w - steps * inner - c_out)
    expected_w = (EYE - HESSIAN @ torch.diag(steps)) @ outer
    expected_steps = -inner * outer  # d w'_j / d a_j = -[H (w - c_in)]_j
    result = gradient(learner, theta, tasks)
    torch.testing.assert_close(result[:DIM], expected_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result[DIM:], expected_steps, rtol=1e-12, atol=1e-12)
    # With every step size at alpha, the model part is MAML's meta-gradient.
    maml = MAML(quadratic_forward, quadratic_loss, ALPHA, 1, False)
    torch.testing.assert_close(
        gradient(learner, learner.initial_state(w[None])[0], tasks)[:DIM],
        gradient(maml, w, tasks),
        rtol=1e-12,
        atol=1e-12,
    )


def test_arm_is_the_plain_risk_gradient() -> None:
    w, tasks, _, c_out = one_task()
    arm = MAML(quadratic_forward, quadratic_loss, ALPHA, 0, False)
    torch.testing.assert_close(gradient(arm, w, tasks), HESSIAN @ (w - c_out), rtol=0, atol=1e-13)


@pytest.mark.parametrize("steps", [1, 3])
def test_reptile_direction_is_the_mean_gradient_along_the_inner_path(steps: int) -> None:
    w, tasks, c_in, _ = one_task()
    # The quadratic loss reads only the first sample of a batch: the support centre.
    travelled = w.clone()
    for _ in range(steps):
        travelled = travelled - ALPHA * HESSIAN @ (travelled - c_in)
    expected = (w - travelled) / (ALPHA * steps)
    reptile = Reptile(quadratic_forward, quadratic_loss, ALPHA, steps)
    torch.testing.assert_close(gradient(reptile, w, tasks), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["anil", "metasgd"])
def test_second_order_learners_match_finite_differences_on_a_network(name: str) -> None:
    model = build_mlp(ModelConfig(hidden=[5], activation="tanh"), 1, 1)
    head = model.head_mask()
    assert head.sum() == 6 and head[-6:].all()  # the last Linear(5, 1): 5 weights, 1 bias
    learner = MAML(
        model.forward,
        lambda p, t: ((p - t) ** 2).mean(),
        0.3,
        2,
        False,
        inner_mask=head if name == "anil" else None,
        learned_inner_lr=name == "metasgd",
    )
    theta = learner.initial_state(
        torch.randn(1, model.num_parameters, generator=generator, dtype=F64)
    )[0]
    x = torch.rand(2, 6, 1, generator=generator, dtype=F64) * 4 - 2
    tasks = TaskBatch(x, torch.sin(x), x + 0.5, torch.sin(x + 0.5))
    analytic = gradient(learner, theta, TaskBatch(*(t[None] for t in tasks)))
    numeric = torch.zeros_like(theta)
    for index in range(len(theta)):
        step = torch.zeros_like(theta)
        step[index] = 1e-6
        plus = learner.agent_meta_loss(theta + step, tasks)
        minus = learner.agent_meta_loss(theta - step, tasks)
        numeric[index] = (plus - minus) / 2e-6
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_local_steps_without_combination_are_consecutive_iterations(tmp_path) -> None:
    """Non-cooperative agents never combine: tau local steps per iteration for T iterations
    take the very steps of T tau iterations, task draws included."""
    common = ("strategy=noncooperative", "optimizer.name=sgd", "log_every=6")
    grouped = run_local(
        small_config(*common, "learner.local_steps=3", "iterations=4"), tmp_path / "a.h5"
    )
    single = run_local(small_config(*common, "iterations=12"), tmp_path / "b.h5")
    np.testing.assert_array_equal(grouped["params/final"], single["params/final"])


def test_metasgd_step_sizes_are_combined_with_the_model(tmp_path) -> None:
    """One ATC iteration by hand: phi = theta - mu g over [w, a], then theta' = A^T phi."""
    from conftest import dense_matrix, mix

    from dmeta.runner import build_learner
    from dmeta.tasks import SineTask

    config = small_config(
        "learner.name=metasgd", "iterations=1", "optimizer.name=sgd", "runtime.dtype=float64"
    )
    data = run_local(config, tmp_path / "r.h5")
    task = SineTask(config.task, config.agents, config.seed, F64, torch.device("cpu"))
    model = task.build_model(config.model)
    learner = build_learner(config.learner, model, task)
    theta = torch.as_tensor(data["params/initial"])
    half = theta.shape[1] // 2
    assert theta.shape[1] == 2 * model.num_parameters
    np.testing.assert_array_equal(theta[:, half:], config.learner.inner_lr)
    tasks = task.sample(torch.arange(config.agents), 1, config.learner.tasks_per_agent)
    gradients, _ = learner.meta_gradients(theta, tasks)
    matrix = dense_matrix(data, config.agents)
    expected = mix(matrix, theta - config.optimizer.lr * gradients)
    np.testing.assert_allclose(data["params/final"], expected.numpy(), rtol=1e-12, atol=1e-15)
    # The step sizes moved, and each agent's are a mix of its neighbours' updated ones.
    assert not np.allclose(data["params/final"][:, half:], config.learner.inner_lr)
