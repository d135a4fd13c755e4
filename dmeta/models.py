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
from dmeta.errors import DmetaError


@dataclass(frozen=True)
class ParameterSlot:
    """Where one named parameter of the network lives inside the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int
    init_bound: float  # U(-bound, bound); 0 with init_value for normalization layers
    init_value: float = 0.0


class FlatModel:
    """A torch module evaluated on flat parameter vectors (functional, no module state)."""

    def __init__(self, module: nn.Module) -> None:
        buffers = [name for name, _ in module.named_buffers()]
        if buffers:
            # Only parameters are passed to functional_call: buffers would stay on "meta".
            raise DmetaError(
                f"the model's module holds buffers ({', '.join(buffers)}); a model is its "
                "parameters alone: e.g. BatchNorm2d(track_running_stats=False) or GroupNorm"
            )
        self.module = module.to("meta")
        slots = []
        offset = 0
        fan_in = 1
        norms = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
        normalized = {
            f"{prefix}.{kind}"
            for prefix, layer in self.module.named_modules()
            if isinstance(layer, norms)
            for kind in ("weight", "bias")
        }
        for name, parameter in self.module.named_parameters():
            shape = tuple(parameter.shape)
            size = math.prod(shape)
            if name in normalized:
                # torch.nn's default for normalization: scale 1, shift 0.
                value = 1.0 if name.endswith("weight") else 0.0
                slots.append(ParameterSlot(name, shape, offset, size, 0.0, value))
            else:
                if len(shape) >= 2:
                    fan_in = math.prod(shape[1:])
                # torch.nn's default: weights and the biases that follow them drawn from
                # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of their layer.
                slots.append(ParameterSlot(name, shape, offset, size, fan_in**-0.5))
            offset += size
        self.slots = tuple(slots)
        self.sizes = [slot.size for slot in slots]
        self.num_parameters = offset
        # Parameters that no step moves (a frozen embedding: the module's `frozen_parameters`).
        frozen = set(getattr(module, "frozen_parameters", ()))
        self.frozen_size = sum(slot.size for slot in slots if slot.name in frozen)

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
        # One split rather than a slice per parameter: the gradient of a split is one
        # concatenation, where every slice's would be a zero-filled [M] vector plus an add.
        pieces = torch.split(flat, self.sizes)
        return {
            slot.name: piece.view(slot.shape)
            for slot, piece in zip(self.slots, pieces, strict=True)
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
        values = torch.cat(
            [torch.full((slot.size,), slot.init_value, dtype=dtype) for slot in self.slots]
        ).to(agents.device)
        return values + unit * bounds


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


def build_convnet(
    in_channels: int, size: int, outputs: int, filters: int, blocks: int, norm: str
) -> FlatModel:
    """MAML's few-shot classifier: `blocks` x (3x3 conv, norm, ReLU, 2x2 max-pool), then a
    linear head. Normalization uses the statistics of the batch it sees, as MAML does, and
    keeps no running statistics: there is nothing but parameters to combine, and the norm's
    scale and shift are combined like every other parameter. `norm` is "batch" or "group"
    (GroupNorm with 8 groups, independent of the batch)."""
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(blocks):
        normalization = (
            nn.BatchNorm2d(filters, track_running_stats=False)
            if norm == "batch"
            else nn.GroupNorm(min(8, filters), filters)
        )
        layers += [
            nn.Conv2d(channels, filters, 3, padding=1),
            normalization,
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = filters
        size //= 2
    layers += [nn.Flatten(), nn.Linear(filters * size * size, outputs)]
    return FlatModel(nn.Sequential(*layers))


def build_femnist_cnn(in_channels: int, size: int, outputs: int, dense: int) -> FlatModel:
    """LEAF's FEMNIST CNN, the FedMeta paper's (App. A.2): two 5x5 convolutions of 32 and 64
    channels ("same" padding), each followed by ReLU and 2x2 max-pool, a dense ReLU layer of
    `dense` units (2048 in the paper) and a linear head; no normalization."""
    side = size // 4
    return FlatModel(
        nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * side * side, dense),
            nn.ReLU(),
            nn.Linear(dense, outputs),
        )
    )


def build_image_classifier(
    config: ModelConfig, in_channels: int, size: int, outputs: int, norm: str
) -> FlatModel:
    """The image classifier `model.convnet` names: MAML's conv net (with `norm`) or the
    FEMNIST CNN."""
    if config.convnet == "femnist":
        return build_femnist_cnn(in_channels, size, outputs, config.dense)
    return build_convnet(in_channels, size, outputs, config.filters, config.blocks, norm)


class LSTMLayer(nn.Module):
    """One LSTM layer over a sequence, written out step by step (functional, vmappable and
    twice differentiable, unlike the fused nn.LSTM): gates i, f, g, o as in torch.nn.LSTM."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden, inputs))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden, hidden))
        self.bias = nn.Parameter(torch.empty(4 * hidden))

    def forward(self, sequence: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [batch, steps, hidden] of a sequence [batch, steps, inputs]. With
        `real` [batch, steps] (bool), a step where it is False (padding) keeps the state."""
        batch, steps, _ = sequence.shape
        hidden = self.weight_hh.shape[1]
        h = sequence.new_zeros(batch, hidden)
        c = sequence.new_zeros(batch, hidden)
        projected = sequence @ self.weight_ih.T + self.bias  # all steps' input terms at once
        # unbind, not projected[:, step]: the backward of `steps` selections would add `steps`
        # zero-padded copies of the whole sequence's gradient (quadratic in steps); unbind's
        # backward stacks the steps' gradients once.
        inputs = projected.unbind(dim=1)
        outputs = []
        for step in range(steps):
            gates = inputs[step] + h @ self.weight_hh.T
            i, f, g, o = gates.chunk(4, dim=-1)
            c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_next = torch.sigmoid(o) * torch.tanh(c_next)
            if real is None:
                h, c = h_next, c_next
            else:
                keep = real[:, step, None]
                h, c = torch.where(keep, h_next, h), torch.where(keep, c_next, c)
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model (Chen et al., App. A.1): a character embedding, stacked LSTMs,
    and a linear head on the last step's state giving the next character's logits."""

    def __init__(
        self, vocabulary: int, embedding: int, hidden: int, layers: int, outputs: int = 0
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, embedding)
        widths = [embedding] + [hidden] * layers
        self.layers = nn.ModuleList(
            LSTMLayer(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.head = nn.Linear(hidden, outputs or vocabulary)

    def forward(self, characters: torch.Tensor) -> torch.Tensor:
        """Logits [batch, vocabulary] of the character after each sequence [batch, steps]."""
        states = self.embedding(characters)
        for layer in self.layers:
            states = layer(states)
        return self.head(states[:, -1])


def build_char_lstm(vocabulary: int, embedding: int, hidden: int, layers: int) -> FlatModel:
    """LEAF's stacked character LSTM (8-dim embedding, 2 x 256 LSTM, 80 characters) as a flat
    model, vmappable over clients."""
    return FlatModel(CharLSTM(vocabulary, embedding, hidden, layers))


class WordLSTM(CharLSTM):
    """LEAF's Sent140 classifier (Chen et al., App. A.2): a word embedding, stacked LSTMs and a
    linear head on the state after the last word. Index 0 is padding, at the front of a
    sequence: padded steps keep the (zero) state, so the logits do not depend on the padding.
    A frozen embedding (the paper's fixed GloVe vectors) is read detached, so every gradient of
    every learner is zero on it and no step moves it."""

    def __init__(
        self,
        vocabulary: int,
        embedding: int,
        hidden: int,
        layers: int,
        outputs: int,
        frozen_embedding: bool = False,
    ) -> None:
        super().__init__(vocabulary, embedding, hidden, layers, outputs)
        self.frozen_embedding = frozen_embedding

    @property
    def frozen_parameters(self) -> tuple[str, ...]:
        """The parameters that no step moves (`FlatModel.frozen_size`): a frozen embedding."""
        return ("embedding.weight",) if self.frozen_embedding else ()

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        """Logits [batch, outputs] of word sequences [batch, steps] (indices, 0 padding)."""
        real = words != 0
        table = self.embedding.weight
        states = nn.functional.embedding(words, table.detach() if self.frozen_embedding else table)
        for layer in self.layers:
            states = layer(states, real)
        return self.head(states[:, -1])


def build_word_lstm(
    vocabulary: int,
    classes: int,
    embedding: int,
    hidden: int,
    layers: int,
    frozen_embedding: bool = False,
) -> FlatModel:
    """The word LSTM classifier over `vocabulary` indices (padding and unknown included) as a
    flat model, vmappable over clients; `frozen_embedding` keeps the embedding fixed."""
    return FlatModel(WordLSTM(vocabulary, embedding, hidden, layers, classes, frozen_embedding))
