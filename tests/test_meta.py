"""Meta-gradients (eq. 4) against closed forms and finite differences."""

from __future__ import annotations

import pytest
import torch

from dmeta.config import ModelConfig
from dmeta.meta import MAML
from dmeta.models import build_mlp
from dmeta.tasks import TaskBatch, mse_loss

F64 = torch.float64

# Quadratic tasks: Q(w; X) = 1/2 (w - c)^T H (w - c) with the "data" X = c and a fixed H.
DIM = 4
generator = torch.Generator().manual_seed(0)
_root = torch.randn(DIM, DIM, generator=generator, dtype=torch.float64)
HESSIAN = _root @ _root.T / DIM + torch.eye(DIM, dtype=torch.float64)


def quadratic_forward(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return w.expand_as(x)


def quadratic_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    d = (prediction - target)[0]
    return 0.5 * d @ HESSIAN @ d


def quadratic_closed_form(w, c_in, c_out, alpha, steps, first_order):
    """Closed form: (I - aH)^n H (w' - c_out), w' after n inner steps on Q(.; c_in)."""
    adapted = w
    for _ in range(steps):
        adapted = adapted - alpha * HESSIAN @ (adapted - c_in)
    outer = HESSIAN @ (adapted - c_out)
    if first_order:
        return outer
    jacobian = torch.linalg.matrix_power(torch.eye(DIM, dtype=F64) - alpha * HESSIAN, steps)
    return jacobian @ outer


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_quadratic_meta_gradient_matches_closed_form(steps: int, first_order: bool) -> None:
    alpha = 0.1
    agents, tasks = 3, 5
    w = torch.randn(agents, DIM, generator=generator, dtype=F64)
    c_in = torch.randn(agents, tasks, 1, DIM, generator=generator, dtype=F64)
    c_out = torch.randn(agents, tasks, 1, DIM, generator=generator, dtype=F64)
    batch = TaskBatch(c_in, c_in, c_out, c_out)
    learner = MAML(quadratic_forward, quadratic_loss, alpha, steps, first_order)
    gradients, _ = learner.meta_gradients(w, batch)
    for a in range(agents):
        expected = torch.stack(
            [
                quadratic_closed_form(
                    w[a], c_in[a, t, 0], c_out[a, t, 0], alpha, steps, first_order
                )
                for t in range(tasks)
            ]
        ).mean(0)
        torch.testing.assert_close(gradients[a], expected, rtol=1e-10, atol=1e-12)


def test_second_order_mlp_gradient_matches_finite_differences() -> None:
    model = build_mlp(ModelConfig(hidden=[8], activation="tanh"), 1, 1)
    learner = MAML(model.forward, mse_loss, 0.05, 2, first_order=False)
    w = model.initial_parameters(0, torch.arange(1), False, torch.float64)
    x = torch.rand(1, 2, 5, 1, generator=generator, dtype=torch.float64) * 4 - 2
    batch = TaskBatch(x, torch.sin(x), x.flip(2), torch.sin(x.flip(2)))
    gradient, loss = learner.meta_gradients(w, batch)
    torch.testing.assert_close(
        loss[0], learner.agent_meta_loss(w[0], TaskBatch(*(b[0] for b in batch)))
    )
    step = 1e-6
    for index in range(0, model.num_parameters, 3):
        shift = torch.zeros_like(w[0])
        shift[index] = step
        plus = learner.agent_meta_loss(w[0] + shift, TaskBatch(*(b[0] for b in batch)))
        minus = learner.agent_meta_loss(w[0] - shift, TaskBatch(*(b[0] for b in batch)))
        numeric = (plus - minus) / (2 * step)
        assert abs(float(numeric - gradient[0, index])) < 1e-7 * max(1.0, abs(float(numeric)))


def test_first_and_second_order_differ_on_curved_loss() -> None:
    model = build_mlp(ModelConfig(hidden=[8], activation="tanh"), 1, 1)
    w = model.initial_parameters(1, torch.arange(2), False, torch.float64)
    x = torch.linspace(-2, 2, 10, dtype=torch.float64).reshape(1, 1, 10, 1).expand(2, 1, 10, 1)
    batch = TaskBatch(x, torch.sin(x), x, torch.cos(x))
    second, _ = MAML(model.forward, mse_loss, 0.1, 1, False).meta_gradients(w, batch)
    first, _ = MAML(model.forward, mse_loss, 0.1, 1, True).meta_gradients(w, batch)
    assert not torch.allclose(first, second)


def test_vmap_over_agents_equals_one_agent_at_a_time() -> None:
    model = build_mlp(ModelConfig(hidden=[16, 16]), 1, 1)
    learner = MAML(model.forward, mse_loss, 0.01, 1, False)
    w = model.initial_parameters(0, torch.arange(4), False, torch.float64)
    x = torch.rand(4, 3, 10, 1, generator=generator, dtype=torch.float64)
    batch = TaskBatch(x, x**2, x, x**2)
    together, losses = learner.meta_gradients(w, batch)
    for a in range(4):
        alone, loss = learner.meta_gradients(
            w[a : a + 1], TaskBatch(*(b[a : a + 1] for b in batch))
        )
        torch.testing.assert_close(together[a], alone[0])
        torch.testing.assert_close(losses[a], loss[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_meta_gradients_and_evaluations_in_chunks_of_agents_are_the_same_bits(dtype) -> None:
    """runtime.agents_at_once changes memory and speed, not numbers: each agent's row is
    computed alone in either case."""
    model = build_mlp(ModelConfig(hidden=[8, 8]), 1, 1)
    theta = 0.3 * torch.randn(7, model.num_parameters, dtype=dtype)
    tasks = TaskBatch(*(torch.randn(7, 3, 4, 1, dtype=dtype) for _ in range(4)))
    whole = MAML(model.forward, mse_loss, 0.1, 2, False).meta_gradients(theta, tasks)
    chunked = MAML(model.forward, mse_loss, 0.1, 2, False, agents_at_once=3)
    for ours, theirs in zip(chunked.meta_gradients(theta, tasks), whole, strict=True):
        assert torch.equal(ours, theirs)
    shared = TaskBatch(*(part[0] for part in tasks))
    evaluated = MAML(model.forward, mse_loss, 0.1, 2, False).evaluate(theta, shared, 1)
    assert torch.equal(chunked.evaluate(theta, shared, 1), evaluated)
