"""Linear representation maths (seed 001): population loss and gradient, principal angles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmeta import linrep, rng
from dmeta.meta import MAML

F64 = torch.float64
DIM, RANK = 8, 2
generator = torch.Generator().manual_seed(3)


def truth() -> torch.Tensor:
    return linrep.orthonormal_basis(torch.randn(DIM, RANK, generator=generator, dtype=F64))


def test_normal_samples_are_standard_and_keyed_per_agent() -> None:
    agents = torch.arange(4)
    samples = rng.normal(7, agents, rng.STREAM_TASKS, 3, (20000,), F64)
    assert samples.shape == (4, 20000)
    assert abs(samples.mean()) < 0.02 and abs(samples.std() - 1) < 0.02
    # Agent 2's numbers do not depend on which other agents are drawn with it.
    alone = rng.normal(7, agents[2:3], rng.STREAM_TASKS, 3, (20000,), F64)
    torch.testing.assert_close(alone[0], samples[2], rtol=0, atol=0)


def test_population_gradient_is_the_autograd_of_the_population_loss() -> None:
    b_star = truth()
    theta = torch.randn(DIM * RANK + RANK, generator=generator, dtype=F64, requires_grad=True)
    task_head = torch.randn(RANK, generator=generator, dtype=F64)
    loss = linrep.population_loss(theta, task_head, b_star, noise_std=0.3)
    (autograd,) = torch.autograd.grad(loss, theta)
    closed = linrep.population_gradient(theta.detach(), task_head, b_star)
    torch.testing.assert_close(closed, autograd, rtol=1e-13, atol=1e-13)


def test_sample_loss_averages_to_the_population_loss() -> None:
    b_star = truth()
    theta = torch.randn(DIM * RANK + RANK, generator=generator, dtype=F64)
    task_head = torch.randn(RANK, generator=generator, dtype=F64)
    samples, noise_std = 400_000, 0.5
    x = torch.randn(samples, DIM, generator=generator, dtype=F64)
    y = (x @ (b_star @ task_head))[:, None] + noise_std * torch.randn(
        samples, 1, generator=generator, dtype=F64
    )
    empirical = linrep.sample_loss(linrep.predict(theta, x, DIM, RANK), y)
    population = linrep.population_loss(theta, task_head, b_star, noise_std)
    assert float(empirical) == pytest.approx(float(population), rel=0.01)


def test_flat_layout_is_b_row_major_then_w() -> None:
    representation = torch.arange(DIM * RANK, dtype=F64).reshape(DIM, RANK)
    head = torch.tensor([100.0, 200.0], dtype=F64)
    theta = linrep.flatten(representation, head)
    assert theta[:3].tolist() == [0.0, 1.0, 2.0] and theta[-2:].tolist() == [100.0, 200.0]
    back_b, back_w = linrep.split(theta, DIM, RANK)
    assert torch.equal(back_b, representation) and torch.equal(back_w, head)


@pytest.mark.parametrize("distance", [0.0, 0.3, 0.9, 1.0])
def test_initialization_lands_at_the_requested_principal_angle_distance(distance) -> None:
    b_star = truth()
    direction = torch.randn(DIM, RANK, generator=generator, dtype=F64)
    start = linrep.at_distance(b_star, distance, direction)
    measured = linrep.principal_angle_distance(start, b_star)
    assert float(measured) == pytest.approx(distance, abs=1e-12)


def test_distance_depends_only_on_the_column_space() -> None:
    b_star = truth()
    mixing = torch.randn(RANK, RANK, generator=generator, dtype=F64) + 3 * torch.eye(RANK)
    assert float(linrep.principal_angle_distance(3.0 * b_star @ mixing, b_star)) < 1e-12
    other = torch.randn(DIM, RANK, generator=generator, dtype=F64)
    batched = linrep.principal_angle_distance(torch.stack([other, other @ mixing]), b_star)
    assert batched.shape == (2,) and float(batched[0]) == pytest.approx(float(batched[1]))


def test_anil_on_the_population_loss_adapts_the_head_in_closed_form() -> None:
    """One ANIL inner step on the population loss: w' = w - alpha B^T (B w - B* w*)."""
    b_star = truth()
    theta = torch.randn(DIM * RANK + RANK, generator=generator, dtype=F64)
    task_head = torch.randn(RANK, generator=generator, dtype=F64)
    mask = torch.cat([torch.zeros(DIM * RANK, dtype=F64), torch.ones(RANK, dtype=F64)])

    def forward(parameters: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        representation, own = linrep.split(parameters, DIM, RANK)
        return representation @ own - b_star @ head

    def loss(residual: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return 0.5 * residual @ residual

    learner = MAML(forward, loss, 0.1, 1, first_order=False, inner_mask=mask)
    adapted = learner.adapt(theta, task_head, task_head, 1)
    representation, head = linrep.split(theta, DIM, RANK)
    expected_head = head - 0.1 * representation.T @ (representation @ head - b_star @ task_head)
    torch.testing.assert_close(adapted[-RANK:], expected_head, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(adapted[:-RANK], theta[:-RANK], rtol=0, atol=0)


def test_head_covariance_has_the_requested_condition_number() -> None:
    root = linrep.head_covariance_root(4, 10.0, F64)
    eigenvalues = torch.diagonal(root @ root.T)
    assert float(eigenvalues.max() / eigenvalues.min()) == pytest.approx(10.0)
    assert math.isclose(float(eigenvalues.max()), 1.0)


def linear_config(*extra: str):
    from conftest import LINEAR, small_config

    return small_config(*LINEAR, *extra)


def test_linear_run_logs_distances_and_describes_its_tasks(tmp_path) -> None:
    from conftest import run_local

    config = linear_config(
        "linear.init=distance",
        "linear.init_distance=0.6",
        "linear.heads=fixed",
        "linear.heads_per_agent=4",
        "learner.name=anil",
    )
    data = run_local(config, tmp_path / "r.h5")
    np.testing.assert_allclose(data["metrics/rep_distance"][0], 0.6, atol=1e-12)
    assert data["centroid/rep_distance"].shape == data["time/iteration"].shape
    b_star = data["tasks/B_star"]
    np.testing.assert_allclose(b_star.T @ b_star, np.eye(2), atol=1e-12)
    assert data["tasks/heads"].shape == (7, 4, 2)
    # B row-major then w: the initial heads are zero.
    np.testing.assert_array_equal(data["params/initial"][:, 12:], 0.0)


def test_population_meta_gradient_with_fixed_heads_is_the_full_batch_closed_form() -> None:
    from dmeta.runner import build_learner
    from dmeta.tasks import LinearRepresentationTask

    config = linear_config(
        "linear.mode=population",
        "linear.heads=fixed",
        "linear.heads_per_agent=3",
        "learner.name=arm",
    )
    task = LinearRepresentationTask(config.linear, 7, 0, F64, torch.device("cpu"))
    model = task.build_model(config.model)
    learner = build_learner(config.learner, model, task)
    agents = torch.arange(2, 4)
    theta = torch.randn(2, model.num_parameters, generator=generator, dtype=F64)
    tasks = task.sample(agents, 5, tasks=1)  # population + fixed: all 3 heads every time
    assert tasks.support_x.shape == (2, 3, 1, 2)
    gradients, losses = learner.meta_gradients(theta, tasks)
    for row, agent in enumerate(agents):
        heads = task.fixed_heads[agent]
        expected = torch.stack(
            [linrep.population_gradient(theta[row], h, task.truth) for h in heads]
        ).mean(dim=0)
        torch.testing.assert_close(gradients[row], expected, rtol=1e-12, atol=1e-12)
        loss = torch.stack(
            [linrep.population_loss(theta[row], h, task.truth, 0.1) for h in heads]
        ).mean()
        torch.testing.assert_close(losses[row], loss, rtol=1e-12, atol=1e-12)


def test_distance_of_a_diverged_representation_is_nan() -> None:
    b_star = truth()
    broken = torch.full((DIM, RANK), math.nan, dtype=F64)
    distances = linrep.principal_angle_distance(torch.stack([b_star, broken]), b_star)
    assert float(distances[0]) < 1e-12 and math.isnan(float(distances[1]))


def test_heads_and_inputs_of_a_task_come_from_independent_streams() -> None:
    from dmeta.tasks import LinearRepresentationTask

    agents = torch.arange(20_000)
    first = {}
    for mode in ("population", "samples"):
        config = linear_config(f"linear.mode={mode}")
        task = LinearRepresentationTask(config.linear, len(agents), 0, F64, torch.device("cpu"))
        # A population task is its head w*, a sample task its inputs x: compare first entries.
        first[mode] = task.sample(agents, 3, tasks=1).support_x[:, 0, 0, 0].abs()
    magnitudes = torch.stack([first["population"], first["samples"]])
    assert abs(float(torch.corrcoef(magnitudes)[0, 1])) < 5 / math.sqrt(len(agents))
