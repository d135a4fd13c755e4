"""The few-shot conv net on flat parameters: vmapped over agents it equals a loop over them."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from dmeta.models import build_convnet

F64 = torch.float64


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_convnet_under_vmap_equals_a_loop_over_agents(norm: str) -> None:
    model = build_convnet(1, 28, 5, filters=8, blocks=4, norm=norm)
    agents = 3
    generator = torch.Generator().manual_seed(0)
    theta = model.initial_parameters(0, torch.arange(agents), False, F64)
    images = torch.rand(agents, 10, 1, 28, 28, generator=generator, dtype=F64)
    labels = torch.randint(0, 5, (agents, 10), generator=generator)

    def loss(parameters, x, y):
        return torch.nn.functional.cross_entropy(model.forward(parameters, x), y)

    batched = vmap(model.forward)(theta, images)
    gradients = vmap(grad(loss))(theta, images, labels)
    for agent in range(agents):
        alone = model.forward(theta[agent], images[agent])
        torch.testing.assert_close(batched[agent], alone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            gradients[agent],
            grad(loss)(theta[agent], images[agent], labels[agent]),
            rtol=1e-10,
            atol=1e-12,
        )
    assert batched.shape == (agents, 10, 5)


def test_batch_norm_uses_the_batch_statistics_and_keeps_no_state() -> None:
    model = build_convnet(1, 28, 5, filters=4, blocks=1, norm="batch")
    assert not list(model.module.buffers())  # no running mean or variance to combine
    theta = model.initial_parameters(1, torch.arange(1), False, F64)[0]
    x = torch.rand(6, 1, 28, 28, dtype=F64)
    # The same image scores differently in different batches: statistics come from the batch.
    first = model.forward(theta, x)[0]
    second = model.forward(theta, torch.cat([x[:1], 3 * x[1:]]))[0]
    assert not torch.allclose(first, second)


def test_normalization_starts_as_the_identity() -> None:
    model = build_convnet(1, 28, 5, filters=4, blocks=2, norm="group")
    theta = model.initial_parameters(0, torch.arange(2), False, F64)
    named = {name: model.unflatten(theta[0])[name] for name in model.unflatten(theta[0])}
    assert torch.equal(named["1.weight"], torch.ones(4, dtype=F64))
    assert torch.equal(named["1.bias"], torch.zeros(4, dtype=F64))
    assert named["0.weight"].abs().max() <= 1 / 3 and named["0.weight"].std() > 0
