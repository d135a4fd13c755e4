"""The closed-form MLP meta-gradients (dmeta/mlp_maml.py) against MAML's torch.func ones."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import run_local, small_config
from torch import nn
from torch.func import grad, jvp

from dmeta.config import LearnerConfig, ModelConfig, load_config
from dmeta.meta import MAML
from dmeta.mlp_maml import (
    Change,
    ClosedFormMAML,
    backward,
    closed_form,
    forward,
    hessian_product,
    squared_error,
)
from dmeta.models import FlatModel, build_convnet, build_mlp
from dmeta.runner import build_learner, build_model, build_task
from dmeta.tasks import TaskBatch, mse_loss


def _tasks(agents: int, tasks: int, shots: int, generator: torch.Generator) -> TaskBatch:
    parts = [torch.randn(agents, tasks, shots, 1, generator=generator, dtype=torch.float64)]
    parts.append(torch.sin(3 * parts[0]))
    parts.append(
        torch.randn(agents, tasks, shots + 2, 1, generator=generator, dtype=parts[0].dtype)
    )
    parts.append(torch.sin(3 * parts[2]))
    return TaskBatch(*parts)


@pytest.mark.parametrize(
    ("activation", "hidden", "steps", "first_order", "at_once", "anil"),
    [
        ("relu", [8, 8], 1, False, 0, False),
        ("relu", [8, 8], 1, True, 0, False),
        ("relu", [8, 8], 0, False, 0, False),
        ("tanh", [6, 9, 5], 2, False, 0, False),
        ("relu", [7], 3, False, 2, False),
        ("tanh", [8, 8], 3, True, 2, False),
        ("relu", [8, 8], 2, False, 0, True),
        ("tanh", [5, 6], 1, True, 0, True),
    ],
)
def test_closed_form_equals_torch_func(activation, hidden, steps, first_order, at_once, anil):
    """MAML (second order, several inner steps), FO-MAML, ANIL, FO-ANIL and ARM (no step),
    ReLU and tanh, in chunks of agents or not: the same meta-gradients and losses as MAML's
    torch.func transforms, to rounding in float64."""
    generator = torch.Generator().manual_seed(3)
    model = build_mlp(ModelConfig(hidden=hidden, activation=activation), 1, 1)
    theta = 0.5 * torch.randn(5, model.num_parameters, generator=generator, dtype=torch.float64)
    tasks = _tasks(5, 3, 4, generator)
    mask = model.head_mask().to(torch.float64) if anil else None
    reference = MAML(model.forward, mse_loss, 0.3, steps, first_order, mask, agents_at_once=at_once)
    fast = closed_form(reference, model)
    assert isinstance(fast, ClosedFormMAML)
    for ours, theirs in zip(
        fast.meta_gradients(theta, tasks), reference.meta_gradients(theta, tasks), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-13)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_hessian_product_equals_forward_over_reverse() -> None:
    """The R-operator's H u equals torch.func's jvp of the gradient, per task, in float64."""
    generator = torch.Generator().manual_seed(5)
    model = build_mlp(ModelConfig(hidden=[6, 7], activation="tanh"), 2, 3)
    theta = torch.randn(2, model.num_parameters, generator=generator, dtype=torch.float64)
    x = torch.randn(2, 5, 2, generator=generator, dtype=torch.float64)  # 2 agents x 1 task
    y = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    u = torch.randn(2, model.num_parameters, generator=generator, dtype=torch.float64)
    shapes = [slot.shape for slot in model.slots]
    learner = ClosedFormMAML(MAML(model.forward, mse_loss, 0.1, 1, False), shapes, "tanh")
    layers = learner._layers(theta)
    run = forward(layers, x, "tanh")
    squared_error(run, y)
    backward(layers, run)
    # u's weights as one full-rank term each: I^T V = V.
    directions = []
    for layer in learner._layers(u):
        eye = torch.eye(layer.shared.shape[1], dtype=u.dtype).expand(2, -1, -1)
        directions.append(Change([(1.0, eye, layer.shared)], layer.bias))
    products = hessian_product(layers, run, directions)
    ours = torch.cat(
        [piece.reshape(2, -1) for change in products for piece in change.agent_means(2)], dim=1
    )

    def gradient(w, xs, ys):
        return grad(lambda v: mse_loss(model.forward(v, xs), ys))(w)

    for k in range(2):
        _, theirs = jvp(lambda w, k=k: gradient(w, x[k], y[k]), (theta[k],), (u[k],))
        torch.testing.assert_close(ours[k], theirs, rtol=1e-12, atol=1e-13)


def test_closed_form_covers_only_what_it_computes() -> None:
    """Meta-SGD, a custom loss, a conv net or a module of other layers keep torch.func."""
    mlp = build_mlp(ModelConfig(hidden=[4]), 1, 1)
    assert isinstance(closed_form(MAML(mlp.forward, mse_loss, 0.1, 1, False), mlp), ClosedFormMAML)
    others = [
        MAML(mlp.forward, mse_loss, 0.1, 1, False, learned_inner_lr=True),
        MAML(mlp.forward, lambda p, t: ((p - t).abs()).mean(), 0.1, 1, False),
    ]
    for learner in others:
        assert closed_form(learner, mlp) is learner
    conv = build_convnet(1, 8, 2, 4, 1, "group")
    learner = MAML(conv.forward, mse_loss, 0.1, 1, False)
    assert closed_form(learner, conv) is learner
    odd = FlatModel(nn.Sequential(nn.Linear(1, 3), nn.Sigmoid(), nn.Linear(3, 1)))
    learner = MAML(odd.forward, mse_loss, 0.1, 1, False)
    assert closed_form(learner, odd) is learner

    class Scaled(FlatModel):  # a forward of its own
        def forward(self, flat, inputs):
            return super().forward(flat, 3 * inputs)

    class Linear(nn.Linear):  # a layer that is not what its type says
        def forward(self, inputs):
            return super().forward(2 * inputs)

    hooked = nn.Linear(3, 1)
    hooked.register_forward_pre_hook(lambda module, args: (2 * args[0],))
    scaled = Scaled(nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1)))
    networks = [
        nn.Sequential(Linear(1, 3), nn.ReLU(), nn.Linear(3, 1)),
        nn.Sequential(nn.Linear(1, 3), nn.ReLU(), hooked),
        nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(1, 3)), nn.Linear(3, 1)),
    ]
    for model in [scaled, *(FlatModel(network) for network in networks)]:
        learner = MAML(model.forward, mse_loss, 0.1, 1, False)
        assert closed_form(learner, model) is learner


def test_other_layouts_of_the_data_go_to_torch_func() -> None:
    """Inputs with a sequence axis ([tasks, shots, steps, in]: the Linear layers act on the
    last axis) are not the closed form's layout: its learner hands them to torch.func."""
    generator = torch.Generator().manual_seed(4)
    model = build_mlp(ModelConfig(hidden=[5]), 2, 1)
    theta = torch.randn(3, model.num_parameters, generator=generator, dtype=torch.float64)
    x = torch.randn(3, 2, 4, 6, 2, generator=generator, dtype=torch.float64)
    y = torch.randn(3, 2, 4, 6, 1, generator=generator, dtype=torch.float64)
    tasks = TaskBatch(x, y, x, y)
    reference = MAML(model.forward, mse_loss, 0.3, 1, False)
    fast = closed_form(reference, model)
    assert isinstance(fast, ClosedFormMAML)
    for ours, theirs in zip(
        fast.meta_gradients(theta, tasks), reference.meta_gradients(theta, tasks), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["maml", "fomaml", "arm", "anil", "metasgd"])
def test_runtime_closed_form_chooses_the_learner(name: str) -> None:
    """runtime.closed_form = true builds the closed form for the learners it covers on the sine
    task's MLP; false keeps torch.func."""
    config = load_config(None, [f"learner.name={name}"])
    task = build_task(config, torch.float64, torch.device("cpu"))
    model = build_model(task, config)
    fast = build_learner(LearnerConfig(name=name), model, task, closed_form=True)
    plain = build_learner(LearnerConfig(name=name), model, task, closed_form=False)
    assert isinstance(fast, ClosedFormMAML) == (name != "metasgd")
    assert not isinstance(plain, ClosedFormMAML)


def test_a_run_in_closed_form_gives_the_torch_func_run(tmp_path) -> None:
    """runtime.closed_form changes the arithmetic, not the run: the same losses and models to
    rounding in float64 (the default, closed form, against torch.func)."""
    fast = run_local(small_config("runtime.dtype=float64"), tmp_path / "fast.h5")
    plain = run_local(
        small_config("runtime.dtype=float64", "runtime.closed_form=false"), tmp_path / "plain.h5"
    )
    for name in ("metrics/train_loss", "metrics/val_loss", "params/final"):
        np.testing.assert_allclose(fast[name], plain[name], rtol=1e-10, atol=1e-12)
    for name, code in (("fast", "closed_form"), ("plain", "torch.func")):
        with h5py.File(tmp_path / f"{name}.h5") as run:
            assert run.attrs["meta_gradients"] == code


@pytest.mark.parametrize(
    ("steps", "at_once", "tasks_at_once", "anil"),
    [(1, 0, 0, False), (2, 2, 3, False), (0, 0, 2, False), (2, 0, 0, True)],
)
def test_closed_form_evaluations_equal_torch_func(steps, at_once, tasks_at_once, anil) -> None:
    """evaluate (tasks shared by every agent) and evaluate_own (each agent's own tasks), with
    a score beside the loss, in chunks of agents and of tasks or not: MAML's numbers."""
    generator = torch.Generator().manual_seed(11)
    model = build_mlp(ModelConfig(hidden=[6, 5], activation="tanh"), 1, 1)
    theta = 0.5 * torch.randn(5, model.num_parameters, generator=generator, dtype=torch.float64)
    mask = model.head_mask().to(torch.float64) if anil else None
    reference = MAML(model.forward, mse_loss, 0.3, 1, False, mask, agents_at_once=at_once)
    fast = closed_form(reference, model)

    def error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (prediction - target).abs().max()

    own = _tasks(5, 7, 4, generator)
    shared = TaskBatch(*(part[0] for part in own))
    for method in ("evaluate", "evaluate_own"):
        tasks = shared if method == "evaluate" else own
        ours = getattr(fast, method)(theta, tasks, steps, (error,), tasks_at_once)
        theirs = getattr(reference, method)(theta, tasks, steps, (error,), tasks_at_once)
        assert ours.shape == theirs.shape == (5, 7, 2)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-13)


def test_the_plain_gradient_stays_in_closed_form() -> None:
    """learner.plain() (FedAvg's client steps: no inner step) keeps the closed form and
    equals MAML's plain gradient."""
    generator = torch.Generator().manual_seed(2)
    model = build_mlp(ModelConfig(hidden=[6]), 1, 1)
    theta = torch.randn(3, model.num_parameters, generator=generator, dtype=torch.float64)
    tasks = _tasks(3, 2, 4, generator)
    reference = MAML(model.forward, mse_loss, 0.3, 2, False)
    plain = closed_form(reference, model).plain()
    assert isinstance(plain, ClosedFormMAML) and plain.inner_steps == 0
    for ours, theirs in zip(
        plain.meta_gradients(theta, tasks),
        reference.plain().meta_gradients(theta, tasks),
        strict=True,
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-13)
