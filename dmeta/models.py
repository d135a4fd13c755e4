"""Models as flat parameter vectors: one row of a [agents, M] tensor per agent.

The launch model w_k of eq. (6a)-(6b) is a vector in R^M. Keeping every agent's model as a row
of one contiguous tensor makes the combination step a single matrix product or one MPI buffer,
and `torch.func.functional_call` runs the network on views of that row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from dmeta import rng
from dmeta.config import ModelConfig


@dataclass(frozen=True)
class ParameterSlot:
    """Where one named parameter of the network lives inside the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int
    init_bound: float


class FlatModel:
    """A torch module evaluated on flat parameter vectors (functional, no module state)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module.to("meta")
        slots = []
        offset = 0
        fan_in = 1
        for name, parameter in self.module.named_parameters():
            shape = tuple(parameter.shape)
            if len(shape) >= 2:
                fan_in = math.prod(shape[1:])
            # torch.nn's default: weights and the biases that follow them drawn from
            # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of their layer.
            slots.append(ParameterSlot(name, shape, offset, math.prod(shape), fan_in**-0.5))
            offset += math.prod(shape)
        self.slots = tuple(slots)
        self.num_parameters = offset

    def head_mask(self) -> torch.Tensor:
        """[M] ones on the last layer's parameters (the head that ANIL adapts), zeros elsewhere."""
        last_layer = self.slots[-1].name.rsplit(".", 1)[0]
        mask = torch.zeros(self.num_parameters)
        for slot in self.slots:
            if slot.name.rsplit(".", 1)[0] == last_layer:
                mask[slot.offset : slot.offset + slot.size] = 1.0
        return mask

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named parameter views of one flat vector [M]."""
        return {
            slot.name: flat[slot.offset : slot.offset + slot.size].view(slot.shape)
            for slot in self.slots
        }

    def forward(self, flat: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The network's output for `inputs` under the parameters `flat` [M]."""
        return functional_call(self.module, self.unflatten(flat), (inputs,))

    def initial_parameters(
        self,
        seed: int,
        agents: torch.Tensor,
        same_init: bool,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Launch models w_{k,0} [len(agents), M]: per agent, or one shared draw if `same_init`."""
        keys = torch.zeros_like(agents) if same_init else agents
        unit = rng.uniform(seed, keys, rng.STREAM_INIT, 0, (self.num_parameters,), -1.0, 1.0, dtype)
        bounds = torch.cat(
            [torch.full((slot.size,), slot.init_bound, dtype=dtype) for slot in self.slots]
        ).to(agents.device)
        return unit * bounds


def build_mlp(config: ModelConfig, in_features: int, out_features: int) -> FlatModel:
    """A fully connected network in_features -> hidden... -> out_features."""
    activation = {"relu": nn.ReLU, "tanh": nn.Tanh}[config.activation]
    layers: list[nn.Module] = []
    width = in_features
    for hidden in config.hidden:
        layers += [nn.Linear(width, hidden), activation()]
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return FlatModel(nn.Sequential(*layers))
