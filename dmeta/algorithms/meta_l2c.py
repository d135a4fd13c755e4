"""meta-L2C (Li et al., "Learning to Collaborate in Decentralized Learning of Personalized
Models", CVPR 2022, Section 3.3 and Algorithm 1): mixing weights from dot-product attention
between encodings of the nodes' model changes, by one encoder that all nodes share.

Round t of node i, with L2C's graph, local steps, validation tasks and pruning (l2c.py):

    theta_i^{t+1/2}  `l2c.local_epochs` epochs of the learner from theta_i^t          (eq. 1)
    Delta_j^t      = theta_j^t - theta_j^{t+1/2}, the update node j sends
    dhat_j^t       = theta_j^{t+1/2} - theta_j^0, its change since initialisation  (Alg. 1, l. 11)
    f_ij           = <E(dhat_i^t; alpha), E(dhat_j^t; alpha)>, alpha the encoder's
                     parameters                                                         (eq. 5)
    w_ij           = softmax of f_i over j in i + N(i), its surviving in-edges           (eq. 4)
    theta_i^{t+1}  = theta_i^t - sum_j w_ij Delta_j^t                                   (eq. 2)
    alpha         <- one Adam step (lr `alpha_lr`, weight decay `alpha_weight_decay`: an L2 term
                     as torch.optim.Adam's, or decoupled as AdamW's with
                     `alpha_decoupled_decay`; the paper trains both methods alike) on the mean over
                     all K nodes of grad_alpha L(theta_i^{t+1}; D_i^val)    (eq. 6; Alg. 1, l. 24)

The encoder E (eq. 7-8): the model row is cut into layers, the parameter tensors of one module
that share their first dimension (a linear layer's weight [C, n] and bias [C]: C channels of
n + 1 values; a convolution's filters and biases). Layer l has its own E_l, linear maps to the
widths `l2c.encoder_dims` in turn ((10, 5): the paper's two-layer network, affine maps with no
activation between them). With `l2c.encoder_sharing = "channel"` (eq. 7) E_l maps each channel
of the layer's change and the outputs are concatenated, so that E's parameters depend on the
channels' widths but not their number (an encoder transfers to a model with another number of
classes); with "layer" E_l maps the layer's whole flattened change. E(theta) concatenates all
layers (eq. 8). Query and key are the same encoding, f a plain inner product (eq. 5). The
learner's whole launch row is encoded: Meta-SGD's step sizes are a second copy of the layers.

Node i needs E of its in-neighbours' changes and their gradient in alpha, so every surviving
in-edge j -> i carries [Delta_j, dhat_j] in one exchange (`deliver`, Alg. 1, l. 11: twice
L2C's bytes); node i's gradient in alpha is then local and exact (the changes are constants).
The encoder and its Adam state are shared state, the same on every rank: one all-reduce sums
the nodes' gradients, and every rank takes the same step. Pruning after round T0 ranks the
in-neighbours by that round's attention weights.

The run file logs the encoder after each logged round as /l2c/encoder [T, N] (N its
parameters, flat: per layer and map, the weight [out, in] row-major then the bias; the layers'
input widths, the dims and the sharing are attributes `encoder_*` of /topology). Its last row
is what `l2c.pretrained` loads in another run: for new nodes, a new seed or another task, from
round 1 on, and not trained there unless `l2c.train_pretrained`. Beside it, per row, the two
terms of that round's Adam step: the norms of the mean gradient g of eq. (6) and of the decay
d = `alpha_weight_decay` * alpha (/l2c/gradient_norm, /l2c/decay_norm), and the share of the
parameters where |g| > |d| (/l2c/gradient_share). Adam moves each parameter by about
`alpha_lr` whatever the size of g + d, so a parameter where |g| < |d| shrinks however small g
is: with g far below d the decay steers the encoder and the weights stay uniform.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.func import vmap

from dmeta import problems, rng
from dmeta.algorithms.base import CommTimer, Context, RoundReport, TopologyRecord
from dmeta.algorithms.l2c import (
    ADAM_BETAS,
    ADAM_EPS,
    L2CPlan,
    LearnedMixing,
    decayed,
    masked_softmax,
    plan_l2c,
)
from dmeta.config import Config, is_import_path
from dmeta.errors import DmetaError
from dmeta.exchange import AgentLayout, segment_mix
from dmeta.models import ParameterSlot
from dmeta.optim import Adam
from dmeta.output import Columns

# ---------------------------------------------------------------------------------------------
# The encoder and the attention: pure tensor maths, no exchange, no config.


def map_shapes(width: int, dims: Sequence[int]) -> list[tuple[int, int]]:
    """(inputs, outputs) of E_l's linear maps for an input of `width` values."""
    return list(zip((width, *dims[:-1]), dims, strict=True))


def encoder_size(widths: Sequence[int], dims: Sequence[int]) -> int:
    """Parameters of an encoder of layers with input `widths`: weights and biases."""
    return sum(out * (fan_in + 1) for width in widths for fan_in, out in map_shapes(width, dims))


@dataclass(frozen=True)
class EncoderLayer:
    """One layer of a model row: its tensors at (offset, size), which share their first
    dimension: `channels` channels of `width` values each (the tensors' rows side by side)."""

    pieces: tuple[tuple[int, int], ...]
    channels: int
    width: int


@dataclass(frozen=True)
class EncoderLayout:
    """Where each layer lies in the model row, and the shapes of its encoder E_l."""

    layers: tuple[EncoderLayer, ...]
    dims: tuple[int, ...]  # output widths of E_l's linear maps, in turn
    sharing: str  # "channel" (eq. 7) or "layer"

    def inputs(self, layer: EncoderLayer) -> tuple[int, int]:
        """(rows, width) of E_l's input: one row per channel, or the whole layer as one."""
        if self.sharing == "channel":
            return layer.channels, layer.width
        return 1, layer.channels * layer.width

    @property
    def widths(self) -> tuple[int, ...]:
        """Each E_l's input width: what fixes the encoder's shapes."""
        return tuple(self.inputs(layer)[1] for layer in self.layers)

    def maps(self) -> list[list[tuple[int, int]]]:
        """(inputs, outputs) of each linear map of each E_l."""
        return [map_shapes(width, self.dims) for width in self.widths]

    @property
    def size(self) -> int:
        """Parameters of the encoder."""
        return encoder_size(self.widths, self.dims)

    def unpack(self, params: torch.Tensor) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """(weight [out, in], bias [out]) of each map of each E_l, views of the flat `params`:
        per layer and map, the weight row-major then the bias."""
        sizes = [size for layer in self.maps() for i, o in layer for size in (o * i, o)]
        pieces = iter(torch.split(params, sizes))
        return [
            [(next(pieces).view(out, fan_in), next(pieces)) for fan_in, out in layer]
            for layer in self.maps()
        ]

    def bounds(self) -> torch.Tensor:
        """[size]: 1/sqrt(inputs) of the map each parameter belongs to (torch.nn.Linear's
        initialisation range, weights and biases alike)."""
        return torch.cat(
            [
                torch.full((out * (fan_in + 1),), fan_in**-0.5, dtype=torch.float64)
                for layer in self.maps()
                for fan_in, out in layer
            ]
        )


def encoder_layout(
    slots: Sequence[ParameterSlot], row_width: int, dims: Sequence[int], sharing: str
) -> EncoderLayout:
    """The layers of a model row of `row_width` values, `slots` its parameters: consecutive
    tensors of one module with the same first dimension form a layer (a 0-d tensor is one
    channel); a row longer than the model (Meta-SGD's [w, a]) repeats the layers."""
    model_size = sum(slot.size for slot in slots)
    if model_size == 0 or row_width % model_size:
        raise ValueError(f"a row of {row_width} values is no copies of a {model_size}-value model")
    layers: list[EncoderLayer] = []
    for copy in range(row_width // model_size):
        previous = None
        for slot in slots:
            channels = slot.shape[0] if slot.shape else 1
            key = (slot.name.rsplit(".", 1)[0], channels)
            piece = (copy * model_size + slot.offset, slot.size)
            if key == previous:
                last = layers[-1]
                layers[-1] = EncoderLayer(
                    (*last.pieces, piece), channels, last.width + slot.size // channels
                )
            else:
                layers.append(EncoderLayer((piece,), channels, slot.size // channels))
            previous = key
    return EncoderLayout(tuple(layers), tuple(int(d) for d in dims), sharing)


def embed(layout: EncoderLayout, params: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """E(change; params) [embedding_size] of one model change [row width] (eq. 7-8): each
    layer's E_l on each of its channels (or on the whole layer), outputs concatenated."""
    outputs = []
    for layer, maps in zip(layout.layers, layout.unpack(params), strict=True):
        rows, width = layout.inputs(layer)
        parts = [change.narrow(0, offset, size) for offset, size in layer.pieces]
        x = torch.cat([part.reshape(layer.channels, -1) for part in parts], dim=1)
        x = x.reshape(rows, width)
        for weight, bias in maps:
            x = torch.nn.functional.linear(x, weight, bias)
        outputs.append(x.reshape(-1))
    return torch.cat(outputs)


def attention_logits(
    layout: EncoderLayout, params: torch.Tensor, query: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """f [S]: <E(query), E(keys[s])> for one node's change `query` [row width] and its
    in-neighbours' (itself included) `keys` [S, row width] (eq. 5)."""
    own = embed(layout, params, query)
    others = vmap(partial(embed, layout), in_dims=(None, 0))(params, keys)
    return others @ own


def attention_weights(
    layout: EncoderLayout,
    params: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    active: torch.Tensor,
) -> torch.Tensor:
    """w [nodes, S]: softmax over each node's active slots of its attention logits (eq. 4),
    0 elsewhere, from the nodes' changes `queries` [nodes, row width] and their slots'
    changes `keys` [nodes, S, row width]; differentiable in `params`."""
    logits = vmap(partial(attention_logits, layout), in_dims=(None, 0, 0))(params, queries, keys)
    return masked_softmax(logits, active)


# ---------------------------------------------------------------------------------------------
# The pretrained encoder of another run.


@dataclass(frozen=True)
class PretrainedEncoder:
    """The last /l2c/encoder row of a meta_l2c run file and the geometry it was made for."""

    path: str
    values: np.ndarray  # [N] float64
    iteration: int  # of that row
    widths: tuple[int, ...]
    dims: tuple[int, ...]
    sharing: str


ENCODER_ATTRIBUTES = ("encoder_widths", "encoder_dims", "encoder_sharing")


def read_pretrained(path: str) -> PretrainedEncoder:
    """The encoder a finished meta_l2c run wrote: the last row of its /l2c/encoder, with the
    /topology attributes that say its shapes; DmetaError (one line) on anything else."""
    what = f"l2c.pretrained = {path!r}"
    if not Path(path).is_file():
        raise DmetaError(f"{what}: no such file (give the run file of a strategy = 'meta_l2c' run)")
    try:
        with h5py.File(path, "r") as file:
            data = file.get("l2c/encoder")
            topology = file.get("topology")
            attributes = topology.attrs if isinstance(topology, h5py.Group) else {}
            if (
                not isinstance(data, h5py.Dataset)
                or data.ndim != 2
                or data.shape[0] == 0
                or any(name not in attributes for name in ENCODER_ATTRIBUTES)
            ):
                raise DmetaError(
                    f"{what} holds no meta-L2C encoder (rows of /l2c/encoder and the /topology "
                    "attributes encoder_*): give the run file of a strategy = 'meta_l2c' run"
                )
            values = np.asarray(data[-1], dtype=np.float64)
            iterations = file.get("time/iteration")
            row = data.shape[0] - 1
            iteration = (
                int(iterations[row])
                if isinstance(iterations, h5py.Dataset) and iterations.shape[0] > row
                else -1
            )
            widths = tuple(int(w) for w in np.atleast_1d(attributes["encoder_widths"]))
            dims = tuple(int(d) for d in np.atleast_1d(attributes["encoder_dims"]))
            sharing = attributes["encoder_sharing"]
            sharing = sharing.decode() if isinstance(sharing, bytes) else str(sharing)
    except DmetaError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise DmetaError(f"{what} is not a readable run file ({reason})") from None
    size = encoder_size(widths, dims)
    if values.shape != (size,):
        raise DmetaError(
            f"{what}: its /l2c/encoder row holds {values.size} values, not the {size} of its "
            "encoder_* attributes: the file is damaged"
        )
    if not np.isfinite(values).all():
        raise DmetaError(f"{what}: its last /l2c/encoder row is not finite (the run diverged)")
    return PretrainedEncoder(path, values, iteration, widths, dims, sharing)


# ---------------------------------------------------------------------------------------------
# The algorithm.


@dataclass
class MetaL2CPlan(L2CPlan):
    """L2C's in-edges, the pretrained encoder if any, and the encoder's layout."""

    pretrained: PretrainedEncoder | None = None
    # Set by the algorithm, which alone sees the model; the engine asks for the row series and
    # the topology record only after building the algorithm.
    encoder: EncoderLayout | None = None

    def encoder_columns(self) -> np.ndarray:
        """[K]: how many of the encoder's parameters each agent's columns of /l2c/encoder
        hold, so that the columns, agent by agent, are the flat encoder once."""
        if self.encoder is None:
            raise RuntimeError("the encoder's layout is known once the algorithm is built")
        count = len(self.in_degree)
        base, extra = divmod(self.encoder.size, count)
        return base + (np.arange(count) < extra).astype(np.int64)


# The terms of the encoder's step (eq. 6) the run file logs: the validation loss's pull against
# the weight decay's.
ENCODER_STEP_SERIES = {
    "l2c/gradient_norm": "|g|, the norm of the nodes' mean validation-loss gradient (eq. 6)",
    "l2c/decay_norm": "|d|, the norm of the weight decay term alpha_weight_decay * alpha",
    "l2c/gradient_share": "the share of the encoder's parameters where |g| > |d|, whose step "
    "the validation loss leads",
}


def model_slots(context: Context) -> tuple[ParameterSlot, ...]:
    """The parameter tensors of the run's model (built anew on the meta device)."""
    config = context.config
    if is_import_path(config.problem):
        model = problems.build_family_model(context.task, config.problem, config.model)
    else:
        model = context.task.build_model(config.model)
    return model.slots


def check_pretrained(pretrained: PretrainedEncoder, layout: EncoderLayout) -> None:
    """DmetaError (one line) unless the pretrained encoder fits this run's model layers."""
    made_for = (pretrained.widths, pretrained.dims, pretrained.sharing)
    if made_for != (layout.widths, layout.dims, layout.sharing):
        raise DmetaError(
            f"l2c.pretrained = {pretrained.path!r} holds an encoder for layers of input widths "
            f"{list(pretrained.widths)} (encoder_dims {list(pretrained.dims)}, "
            f"encoder_sharing {pretrained.sharing!r}), but this run's model needs "
            f"{list(layout.widths)} (encoder_dims {list(layout.dims)}, encoder_sharing "
            f"{layout.sharing!r}): use a model with the same layers and the same [l2c] encoder keys"
        )


class MetaL2C(LearnedMixing):
    """meta-L2C, Algorithm 1 (module docstring): local steps, attention weights (eq. 4-5),
    eq. (2), one step of the shared encoder on eq. (6), pruning after round T0."""

    weights_meaning = (
        "w_ij of the row's round, the attention weights its aggregation used (uniform in row 0)"
    )

    @classmethod
    def plan(cls, config: Config, layout: AgentLayout) -> MetaL2CPlan:
        edges = plan_l2c(config)
        path = config.l2c.pretrained
        fields = {item.name: getattr(edges, item.name) for item in dataclasses.fields(edges)}
        return MetaL2CPlan(**fields, pretrained=read_pretrained(path) if path else None)

    def __init__(self, context: Context, plan: MetaL2CPlan, initial_models: torch.Tensor) -> None:
        super().__init__(context, plan, initial_models)
        settings = plan.settings
        layout = encoder_layout(
            model_slots(context),
            initial_models.shape[1],
            settings.encoder_dims,
            settings.encoder_sharing,
        )
        plan.encoder = self.layout = layout
        device, dtype = context.device, context.dtype
        if plan.pretrained is None:
            unit = rng.uniform(
                context.config.seed,
                torch.zeros(1, dtype=torch.int64, device=device),
                rng.STREAM_L2C_ENCODER,
                0,
                (layout.size,),
                -1.0,
                1.0,
                dtype,
            )
            encoder = unit * layout.bounds().to(device=device, dtype=dtype)
        else:
            check_pretrained(plan.pretrained, layout)
            encoder = torch.as_tensor(plan.pretrained.values, device=device, dtype=dtype)[None]
        self.train_encoder = plan.pretrained is None or settings.train_pretrained
        # The latest encoder step's terms, 0-d (`_step_encoder`); NaN before any step and when
        # the encoder is not trained.
        nan = torch.tensor(float("nan"), device=device, dtype=dtype)
        self.step_terms = dict.fromkeys(ENCODER_STEP_SERIES, nan)
        self.adam = Adam(settings.alpha_lr, *ADAM_BETAS, ADAM_EPS)
        # Shared state [1, N], the same on every rank: the encoder and its Adam moments.
        self.shared = {"encoder": encoder}
        self.shared |= {f"adam/{k}": v for k, v in self.adam.init_state(encoder).items()}
        # theta_i^0, whose difference the encoder sees.
        self.initial = initial_models.detach().clone()
        # The weights of the latest round; before any, those of equal encodings: uniform.
        self.latest = masked_softmax(torch.zeros_like(self.valid, dtype=dtype), self.valid)
        # Which encoder parameter each column of the local agents' /l2c/encoder rows holds
        # (index N: padding, not stored).
        columns = plan.encoder_columns()
        starts = np.concatenate([[0], np.cumsum(columns)[:-1]])
        agents = context.agents.cpu().numpy()
        offsets = np.arange(max(int(columns.max()), 1))
        index = np.where(
            offsets < columns[agents, None], starts[agents, None] + offsets, layout.size
        )
        self.encoder_index = torch.as_tensor(index, device=device)

    def weights(self) -> torch.Tensor:
        """w [local agents, max in-degree]: the attention weights of the latest round."""
        return self.latest

    def state_rows(self) -> dict[str, torch.Tensor]:
        return super().state_rows() | {"l2c/initial": self.initial}

    def state_shared(self) -> dict[str, torch.Tensor]:
        return {f"l2c/{k}": v for k, v in self.shared.items()}

    def load_state(self, rows: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]) -> None:
        rows = dict(rows)
        self.initial = rows.pop("l2c/initial").clone()
        super().load_state(rows, shared)
        prefix = "l2c/"
        self.shared = {
            k[len(prefix) :]: v.clone() for k, v in shared.items() if k.startswith(prefix)
        }

    def round(self, t: int) -> RoundReport:
        """Local steps (eq. 1), attention weights (eq. 4-5) and aggregation (eq. 2), the
        encoder's step (eq. 6) and, after round T0, the pruning."""
        settings = self.plan_.settings
        start = self.training.launch_models
        loss_sum, norm = self.training.adapt(t, settings.local_epochs)
        middle = self.training.launch_models
        updates = (start - middle).detach()
        changes = (middle - self.initial).detach()
        timer = CommTimer(self.context.device)
        aggregated, gradient = self.aggregate(t, start, updates, changes, timer)
        self.training.launch_models = aggregated
        if gradient is not None:
            self._step_encoder(gradient, timer)
        # This round's sends, an update and a change per edge: pruning changes the route from
        # the next round on.
        sends = torch.as_tensor(self.route.sends_per_agent * 2 * self.model_bytes)
        if t == settings.prune_round and settings.prune_count > 0:
            self._prune(settings.prune_count)
        steps = self.training.steps(settings.local_epochs)
        return RoundReport(loss_sum, steps, norm, sends.to(loss_sum.device), timer.seconds)

    def aggregate(
        self,
        t: int,
        start: torch.Tensor,
        updates: torch.Tensor,
        changes: torch.Tensor,
        timer: CommTimer,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(theta^{t+1} = theta^t - sum_j w_ij Delta_j (eq. 2) with the attention weights of
        the changes (eq. 4-5), the gradient in the encoder of this rank's nodes' summed
        validation losses of theta^{t+1}, or None when the encoder is not trained): one
        neighbour exchange of [updates, changes]."""
        if self.route is None:
            self._connect()
        route, width = self.route, updates.shape[1]
        with timer:
            delivered = self.context.exchange.deliver(torch.cat([updates, changes], 1), route)
        # Each slot's change [local agents, max in-degree, width]; pruned and unused slots 0.
        keys = changes.new_zeros((*self.valid.shape, width))
        keys[route.targets, self.edge_slots] = delivered[:, width:]
        encoder = self.shared["encoder"][0].detach().requires_grad_(self.train_encoder)
        weights = attention_weights(self.layout, encoder, changes, keys, self.mixing["active"])
        edges = torch.arange(len(route.targets), device=start.device)
        mixed = segment_mix(
            delivered[:, :width],
            edges,
            route.targets,
            weights[route.targets, self.edge_slots],
            len(start),
            route.crow,
        )
        aggregated = start - mixed
        self.latest = weights.detach()
        if not self.train_encoder:
            return aggregated.detach(), None
        loss = self.validation_loss(t, aggregated).sum()
        return aggregated.detach(), torch.autograd.grad(loss, encoder)[0]

    def _step_encoder(self, gradient: torch.Tensor, timer: CommTimer) -> None:
        """One Adam step of the shared encoder on the nodes' mean gradient g (eq. 6) plus the
        L2 weight decay d = `alpha_weight_decay` * alpha: the same numbers on every rank. Adam
        scales each parameter's step to about `alpha_lr` whatever the size of g + d, so where
        |g| < |d| the step shrinks the parameter, however small g is: `step_terms` keeps
        |g|, |d| and the share of parameters with |g| > |d| for the run file."""
        with timer:
            # All ranks synchronise here: the sum of every node's gradient.
            total = self.context.exchange.allreduce_sum(gradient)
        shared = self.shared
        encoder = shared["encoder"]
        mean = total[None] / self.context.config.agents
        decay = self.plan_.settings.alpha_weight_decay * encoder
        self.step_terms = {
            "l2c/gradient_norm": torch.linalg.vector_norm(mean),
            "l2c/decay_norm": torch.linalg.vector_norm(decay),
            "l2c/gradient_share": (mean.abs() > decay.abs()).to(mean.dtype).mean(),
        }
        state = {k: shared[f"adam/{k}"] for k in ("exp_avg", "exp_avg_sq", "step")}
        start, direction = decayed(encoder, mean, self.plan_.settings)
        shared["encoder"], state = self.adam.step(start, direction, state)
        shared |= {f"adam/{k}": v for k, v in state.items()}

    def row_values(self) -> dict[str, torch.Tensor | float]:
        encoder = self.shared["encoder"][0].detach()
        padded = torch.cat([encoder, encoder.new_zeros(1)])
        steps = {name: float(value) for name, value in self.step_terms.items()}
        return super().row_values() | {"l2c/encoder": padded[self.encoder_index]} | steps

    @classmethod
    def row_series(cls, plan: MetaL2CPlan) -> dict[str, tuple[bool | Columns, str, str]]:
        steps = {
            name: (
                False,
                "1",
                f"{meaning}, of the encoder's Adam step in the row's round (NaN in row 0 and "
                "when the encoder is not trained)",
            )
            for name, meaning in ENCODER_STEP_SERIES.items()
        }
        return (
            super().row_series(plan)
            | {
                "l2c/encoder": (
                    Columns(plan.encoder_columns(), label="encoder parameter"),
                    "1",
                    "the shared meta-L2C encoder after the row's round, flat (per layer and "
                    "linear map: the weight [out, in] row-major, then the bias; the layers' input "
                    "widths, the dims and the sharing are the /topology attributes encoder_*); "
                    "the last row is what l2c.pretrained loads",
                )
            }
            | steps
        )

    @classmethod
    def topology(cls, plan: MetaL2CPlan) -> TopologyRecord:
        record = super().topology(plan)
        layout = plan.encoder
        if layout is None:
            raise RuntimeError("the encoder's layout is known once the algorithm is built")
        record.attributes |= {
            "kind": "attention",
            "description": "edges j -> i (self-loops included) with node i's initial weight "
            "1/(|N(i)| + 1), the attention weights of equal encodings; the weights of each "
            "round are /mixing/weights",
            "encoder_widths": np.asarray(layout.widths, dtype=np.int64),
            "encoder_dims": np.asarray(layout.dims, dtype=np.int64),
            "encoder_sharing": layout.sharing,
            "encoder_parameters": layout.size,
        }
        if plan.pretrained is not None:
            record.attributes |= {
                "encoder_pretrained": plan.pretrained.path,
                "encoder_pretrained_iteration": plan.pretrained.iteration,
            }
        return record
