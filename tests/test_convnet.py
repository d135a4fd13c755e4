"""The few-shot conv net on flat parameters: vmapped over agents it equals a loop over them."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from dmeta.config import ModelConfig, load_config
from dmeta.errors import DmetaError
from dmeta.models import build_convnet, build_image_classifier

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


def test_femnist_cnn_has_leafs_parameter_count_and_vmaps() -> None:
    # LEAF's FEMNIST CNN: 832 + 51,264 (convolutions) + 6,424,576 (3136 -> 2048) + 127,038
    # (2048 -> 62) = 6,603,710 parameters.
    config = ModelConfig(convnet="femnist")
    model = build_image_classifier(config, 1, 28, 62, "group")
    assert model.num_parameters == 6_603_710
    small = build_image_classifier(ModelConfig(convnet="femnist", dense=16), 1, 28, 5, "group")
    theta = small.initial_parameters(0, torch.arange(2), False, F64)
    images = torch.rand(2, 4, 1, 28, 28, dtype=F64, generator=torch.Generator().manual_seed(1))
    batched = vmap(small.forward)(theta, images)
    assert batched.shape == (2, 4, 5)
    torch.testing.assert_close(batched[1], small.forward(theta[1], images[1]))


def test_femnist_cnn_needs_images_of_side_four() -> None:
    with pytest.raises(DmetaError, match="max-pools twice: federated.image_size = 3"):
        load_config(
            None,
            [
                "problem=federated",
                "federated.paths=['x']",
                "model.convnet=femnist",
                "federated.image_size=3",
            ],
        )
