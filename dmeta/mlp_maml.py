"""Closed-form MAML meta-gradients of fully connected networks under the squared error.

For an MLP (linear layers with ReLU or tanh between them) and the mean squared error, the
meta-gradient of eq. (4) after S inner steps,
    (I - alpha H(w_0)) ... (I - alpha H(w_{S-1})) grad Q(w_S; X_o),
is written out here as batched matrix products: each inner step's forward and backward pass,
the query pass, and the Hessian-vector products of the support loss by Pearlmutter's
R-operator (forward-mode derivative of the backward pass). All agents and tasks of a rank are
one batch. torch.func's nested vmap(grad(vmap(grad))) in dmeta.meta.MAML computes the same
numbers through many more operator calls, several on strided layouts where the CPU kernels do
not vectorise; this module is the fast path for those models (2-3x faster eager on the CPU,
BENCHMARKS.md), and MAML stays the definition: the tests hold the two together in float64.

Layout: K agents x T tasks = B task rows of n examples; activations are [B, n, width],
contiguous, so [K, T n, width] is the same memory. A layer's weight is the launch model's
[K, out, in], shared by an agent's tasks, plus a per-task change: the inner steps move it by
-alpha dQ/dW = -alpha delta^T h, a matrix of rank n (the support examples). Such changes, and
the gradients, Hessian products and meta-gradients, are kept factored as left^T right (left
[B, r, out], right [B, r, in]) and never formed as [B, out, in]: products with them cost
n r (in + out) instead of n in out, sums are lists of terms, and each agent's meta-gradient is
one matrix product per term over all its tasks' factors at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import vmap
from torch.nn.utils import parametrize

from dmeta.meta import MAML
from dmeta.models import FlatModel
from dmeta.tasks import TaskBatch, mse_loss


def _as_its_type(layer: nn.Module) -> bool:
    """Whether `layer` computes what its type's forward says: no hooks, no parametrization."""
    hooked = layer._forward_hooks or layer._forward_pre_hooks
    return not hooked and not parametrize.is_parametrized(layer)


def mlp_activation(module: nn.Module) -> str | None:
    """ "relu" or "tanh" for exactly nn.Sequential(Linear, act, Linear, act, ..., Linear) with
    one activation throughout (dmeta.models.build_mlp's networks; no subclass, hook or
    parametrization); None for any other module."""
    if type(module) is not nn.Sequential or len(module) % 2 == 0:
        return None
    kinds = {nn.ReLU: "relu", nn.Tanh: "tanh"}
    linear = all(type(layer) is nn.Linear and layer.bias is not None for layer in module[::2])
    activations = {kinds.get(type(layer)) for layer in module[1::2]}
    plain = all(_as_its_type(layer) for layer in (module, *module))
    if not (linear and plain) or None in activations or len(activations) > 1:
        return None
    return activations.pop() if activations else "relu"


Term = tuple[float, torch.Tensor, torch.Tensor]  # c left^T right: (c, [B, r, out], [B, r, in])


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for batches of matrices; a contraction over one index (a network's single input
    or output) is a broadcast product, several times faster than a matrix product there."""
    return a * b if a.shape[-1] == 1 else torch.bmm(a, b)


def _low_rank(out: torch.Tensor, h: torch.Tensor, terms: list[Term], transpose: bool):
    """out + h M^T (transpose) or out + h M for M = sum of c left^T right, in place on out:
    h M^T = sum c (h right^T) left, h M = sum c (h left^T) right; never forms M."""
    for c, left, right in terms:
        first, second = (right, left) if transpose else (left, right)
        out.baddbmm_(_product(h, first.mT), second, alpha=c)
    return out


@dataclass
class Change:
    """A per-task weight-shaped quantity, sum of c left^T right [B, out, in] over `terms`,
    with a bias part [B, out]: gradients, Hessian products, meta-gradients."""

    terms: list[Term]
    bias: torch.Tensor  # [B, out]

    def plus(self, other: Change, scale: float) -> Change:
        """self + scale * other."""
        scaled = [(scale * c, left, right) for c, left, right in other.terms]
        return Change(self.terms + scaled, self.bias + scale * other.bias)

    def agent_means(self, agents: int) -> list[torch.Tensor]:
        """Means over each agent's tasks: weight [agents, out, in], bias [agents, out]."""
        tasks = self.bias.shape[0] // agents
        weight = None
        for c, left, right in self.terms:
            # One product per term over all of an agent's tasks' rows: the sum over tasks.
            left = left.reshape(agents, -1, left.shape[-1]).mT
            right = right.reshape(agents, -1, right.shape[-1])
            if weight is None:
                weight = torch.bmm(left, right).mul_(c / tasks)
            else:
                weight.baddbmm_(left, right, alpha=c / tasks)
        return [weight, self.bias.view(agents, tasks, -1).mean(dim=1)]


@dataclass
class Layer:
    """One linear layer's parameters for B task rows: W = shared + the per-task change."""

    shared: torch.Tensor  # [K, out, in]: the launch model's weight
    bias: torch.Tensor  # [K, out] (launch model) or [B, out]
    change: list[Term] = field(default_factory=list)  # the inner steps' moves

    def times(self, h: torch.Tensor, transpose: bool, bias: bool = False) -> torch.Tensor:
        """h W^T (+ b with `bias`) if `transpose`, else h W, for h [B, n, .]."""
        agents, rows = self.shared.shape[0], h.shape[0]
        grouped = h.reshape(agents, -1, h.shape[-1])
        shared = self.shared.mT if transpose else self.shared
        per_agent_bias = bias and self.bias.shape[0] == agents
        if per_agent_bias and grouped.shape[-1] > 1:
            out = torch.baddbmm(self.bias.unsqueeze(1), grouped, shared)
        else:
            out = _product(grouped, shared)
            if per_agent_bias:
                out += self.bias.unsqueeze(1)
        out = _low_rank(out.view(rows, h.shape[1], -1), h, self.change, transpose)
        if bias and self.bias.shape[0] != agents:
            out += self.bias.unsqueeze(1)
        return out

    def stepped(self, gradient: Change, descent: float) -> Layer:
        """W + descent * gradient, per task."""
        change = self.change + [(descent * c, left, right) for c, left, right in gradient.terms]
        rows, width = gradient.bias.shape
        if self.bias.shape[0] == rows:
            bias = self.bias + descent * gradient.bias
        else:  # the launch model's bias [K, out], one copy per task
            grouped = gradient.bias.view(self.bias.shape[0], -1, width)
            bias = (self.bias.unsqueeze(1) + descent * grouped).view(rows, width)
        return Layer(self.shared, bias, change)


@dataclass
class Pass:
    """One forward pass and what its backward pass and the R-operator reuse."""

    activation: str
    inputs: list[torch.Tensor]  # each layer's input h_{l-1} [B, n, in_l]: h_l = sigma(a_l)
    slopes: list[torch.Tensor]  # tanh: sigma'(a_l) of each hidden layer [B, n, out_l]
    bends: list[torch.Tensor]  # tanh: sigma''(a_l) (ReLU's is zero)
    output: torch.Tensor  # f = a_L [B, n, out_L]
    d_output: torch.Tensor | None = None  # dQ/df, set by `squared_error`
    curvature: float = 0.0  # d^2 Q / df^2 (a multiple of the identity), set by `squared_error`
    deltas: list[torch.Tensor] = field(default_factory=list)  # dQ/da_l, set by `backward`
    errors: list[torch.Tensor] = field(default_factory=list)  # dQ/dh_l of hidden layers

    def slope_times(self, l: int, x: torch.Tensor) -> torch.Tensor:  # noqa: E741
        """sigma'(a_l) * x for hidden layer l."""
        if self.activation == "relu":
            # ReLU's derivative, as torch's own: x where h_l = relu(a_l) > 0, else 0.
            return torch.ops.aten.threshold_backward(x, self.inputs[l + 1], 0.0)
        return self.slopes[l] * x


def forward(layers: list[Layer], x: torch.Tensor, activation: str) -> Pass:
    """a_l = h_{l-1} W_l^T + b_l, h_l = sigma(a_l) (h_0 = x [B, n, in]), f = a_L."""
    inputs, slopes, bends = [], [], []
    h = x
    for layer in layers[:-1]:
        inputs.append(h)
        a = layer.times(h, transpose=True, bias=True)
        if activation == "relu":
            h = torch.relu(a)
        else:
            h = torch.tanh(a)
            slope = 1 - h * h
            slopes.append(slope)
            bends.append(-2 * h * slope)
    inputs.append(h)
    return Pass(activation, inputs, slopes, bends, layers[-1].times(h, True, bias=True))


def squared_error(run: Pass, target: torch.Tensor) -> torch.Tensor:
    """Per-task losses Q = mean of (f - y)^2 over a task's examples and outputs [B]; records
    dQ/df and d^2 Q / df^2 in `run`."""
    residual = run.output - target
    run.curvature = 2.0 / residual[0].numel()
    run.d_output = run.curvature * residual
    return (residual**2).mean(dim=(1, 2))


def backward(layers: list[Layer], run: Pass) -> list[Change]:
    """Per-task gradients dQ/dW_l = delta_l^T h_{l-1}, dQ/db_l from dQ/df [B, n, out_L] (set
    by `squared_error`); records the deltas dQ/da_l and errors dQ/dh_l in `run` for the
    R-operator."""
    depth = len(layers)
    d_output = run.d_output
    run.deltas, run.errors = [d_output] * depth, [d_output] * (depth - 1)
    grads: list[Change] = []
    delta = d_output
    for layer in reversed(range(depth)):
        run.deltas[layer] = delta
        grads.append(Change([(1.0, delta, run.inputs[layer])], delta.sum(dim=1)))
        if layer:
            run.errors[layer - 1] = layers[layer].times(delta, transpose=False)
            delta = run.slope_times(layer - 1, run.errors[layer - 1])
    return grads[::-1]


def hessian_product(layers: list[Layer], run: Pass, direction: list[Change]) -> list[Change]:
    """H u of the loss of `run` (a pass that `backward` went through) for per-task directions
    u: the R-operator R{.} = d/dr (.)(w + r u) at r = 0 applied to the forward and backward
    passes (Pearlmutter 1994)."""
    depth = len(layers)
    r_inputs: list[torch.Tensor | None] = [None]  # R{h_0} = R{x} = 0
    r_pre: list[torch.Tensor] = []
    for i, (layer, u) in enumerate(zip(layers, direction, strict=True)):
        # R{a_l} = R{h_{l-1}} W^T + h_{l-1} U^T + u_b.
        r_a = u.bias.unsqueeze(1).expand(*run.inputs[i].shape[:2], -1).clone()
        _low_rank(r_a, run.inputs[i], u.terms, transpose=True)
        if r_inputs[i] is not None:
            r_a += layer.times(r_inputs[i], transpose=True)
        r_pre.append(r_a)
        if i < depth - 1:
            r_inputs.append(run.slope_times(i, r_a))
    r_delta = run.curvature * r_pre[-1]
    products: list[Change] = []
    for i in reversed(range(depth)):
        # R{dQ/dW_l} = R{delta_l}^T h_{l-1} + delta_l^T R{h_{l-1}}: two terms.
        terms = [(1.0, r_delta, run.inputs[i])]
        if r_inputs[i] is not None:
            terms.append((1.0, run.deltas[i], r_inputs[i]))
        products.append(Change(terms, r_delta.sum(dim=1)))
        if i:
            r_error = layers[i].times(r_delta, transpose=False)
            _low_rank(r_error, run.deltas[i], direction[i].terms, transpose=False)
            r_delta = run.slope_times(i - 1, r_error)
            if run.bends:
                r_delta += run.errors[i - 1] * run.bends[i - 1] * r_pre[i - 1]
    return products[::-1]


class ClosedFormMAML(MAML):
    """MAML (second order), FO-MAML, ANIL, FO-ANIL and ARM on an MLP under the mean squared
    error, with the meta-gradients and evaluations in closed form (module docstring) for data
    laid out [..., examples, features]; anything else is MAML's."""

    def __init__(self, learner: MAML, shapes: list[tuple[int, ...]], activation: str) -> None:
        super().__init__(
            learner.forward,
            learner.loss,
            learner.inner_lr,
            learner.inner_steps,
            learner.first_order,
            learner.inner_mask,
            agents_at_once=learner.agents_at_once,
        )
        self.shapes = shapes
        self.sizes = [torch.Size(shape).numel() for shape in shapes]
        self.activation = activation
        # The layers the inner steps adapt (ANIL: the head; MAML: all), from the inner mask.
        self.adapted = [True] * (len(shapes) // 2)
        if learner.inner_mask is not None:
            pieces = torch.split(learner.inner_mask, self.sizes)
            self.adapted = [bool(pieces[2 * i].any()) for i in range(len(self.adapted))]

    def plain(self) -> MAML:
        """MAML.plain, in closed form."""
        return ClosedFormMAML(super().plain(), self.shapes, self.activation)

    def _computes(self, tasks: TaskBatch, dims: int) -> bool:
        """Whether `tasks` have the layout this class computes: every part `dims`-dimensional,
        [..., examples, features] with the network's input and output widths. Other layouts
        (a sequence dimension, targets without a feature axis) go to torch.func, which
        broadcasts as the network's modules do."""
        widths = (self.shapes[0][1], self.shapes[-1][0])
        features = [part.shape[-1] for part in tasks]
        expected = [widths[0], widths[1], widths[0], widths[1]]
        return all(part.dim() == dims for part in tasks) and features == expected

    def _layers(self, theta: torch.Tensor) -> list[Layer]:
        """The launch models [agents, M] as layers (views, no copy)."""
        pieces = torch.split(theta, self.sizes, dim=1)
        views = [
            piece.view(len(theta), *shape) for piece, shape in zip(pieces, self.shapes, strict=True)
        ]
        return [Layer(w, b) for w, b in zip(views[::2], views[1::2], strict=True)]

    def _one_chunk(self, theta: torch.Tensor, tasks: TaskBatch) -> tuple[torch.Tensor, ...]:
        """meta_gradients for one chunk of agents."""
        agents, count = tasks.support_x.shape[:2]
        sx, sy, qx, qy = (part.reshape(agents * count, *part.shape[2:]) for part in tasks)
        layers, runs = self._adapted(theta, sx, sy, self.inner_steps)
        query = forward(layers[-1], qx, self.activation)
        losses = squared_error(query, qy)
        meta = backward(layers[-1], query)
        if not self.first_order:  # times (I - alpha H(w_s) P), from the last inner step back
            for layer, run in zip(reversed(layers[:-1]), reversed(runs), strict=True):
                # P keeps the adapted layers (the inner mask): w_{s+1} = w_s - alpha P g(w_s).
                direction = [
                    g if on else Change([], torch.zeros_like(g.bias))
                    for g, on in zip(meta, self.adapted, strict=True)
                ]
                products = hessian_product(layer, run, direction)
                meta = [g.plus(h, -self.inner_lr) for g, h in zip(meta, products, strict=True)]
        pieces = [piece.reshape(agents, -1) for g in meta for piece in g.agent_means(agents)]
        return torch.cat(pieces, dim=1), losses.view(agents, count).mean(dim=1)

    def _adapted(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int):
        """(The layers after `steps` inner steps on (x, y) [B, n, .], each step's pass)."""
        layers = [self._layers(theta)]
        runs = []
        for _ in range(steps):  # w_{s+1} = w_s - alpha grad Q(w_s; X_in)
            run = forward(layers[-1], x, self.activation)
            squared_error(run, y)
            grads = backward(layers[-1], run)
            runs.append(run)
            stepped = zip(layers[-1], grads, self.adapted, strict=True)
            layers.append(
                [layer.stepped(g, -self.inner_lr) if on else layer for layer, g, on in stepped]
            )
        return layers, runs

    def _scores(
        self,
        launch_models: torch.Tensor,
        tasks: TaskBatch,
        own: bool,
        steps: int,
        scores: tuple,
        tasks_at_once: int,
    ) -> torch.Tensor:
        """MAML's evaluations in closed form: [agents, tasks, 1 + len(scores)]."""
        if not self._computes(tasks, 4 if own else 3):
            return super()._scores(launch_models, tasks, own, steps, scores, tasks_at_once)
        agents = len(launch_models)
        if not own:  # the same tasks for every agent
            tasks = TaskBatch(*(part.expand(agents, *part.shape) for part in tasks))
        count = tasks.support_x.shape[1]
        by_tasks = tasks_at_once or count
        chunk = self._chunk(agents) or agents
        rows = []
        for first in range(0, agents, chunk):
            theta = launch_models[first : first + chunk]
            pieces = [
                self._score_chunk(
                    theta, TaskBatch(*(p[first : first + chunk, t : t + by_tasks] for p in tasks)),
                    steps, scores,
                )
                for t in range(0, count, by_tasks)
            ]  # fmt: skip
            rows.append(torch.cat(pieces, dim=1))
        return torch.cat(rows)

    def _score_chunk(
        self, theta: torch.Tensor, tasks: TaskBatch, steps: int, scores: tuple
    ) -> torch.Tensor:
        """[agents, tasks, 1 + len(scores)] for one chunk of agents and tasks [agents, tasks,
        ...]: the query loss and scores after `steps` inner steps on each support set."""
        agents, count = tasks.support_x.shape[:2]
        sx, sy, qx, qy = (part.reshape(agents * count, *part.shape[2:]) for part in tasks)
        layers, _ = self._adapted(theta, sx, sy, steps)
        query = forward(layers[-1], qx, self.activation)
        columns = [squared_error(query, qy)]
        columns += [vmap(score)(query.output, qy) for score in scores]
        return torch.stack(columns, dim=-1).view(agents, count, -1)

    def meta_gradients(
        self, launch_models: torch.Tensor, tasks: TaskBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MAML.meta_gradients in closed form: gradients [agents, M], losses [agents]."""
        if not self._computes(tasks, 4):
            return super().meta_gradients(launch_models, tasks)
        chunk = self._chunk(len(launch_models)) or len(launch_models)
        parts = [
            self._one_chunk(theta, TaskBatch(*(part[start : start + chunk] for part in tasks)))
            for start, theta in zip(
                range(0, len(launch_models), chunk), torch.split(launch_models, chunk), strict=True
            )
        ]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([g for g, _ in parts]), torch.cat([loss for _, loss in parts])


def closed_form(learner: MAML, model: FlatModel) -> MAML:
    """`learner` with closed-form meta-gradients where this module covers it (MAML, FO-MAML,
    ANIL, FO-ANIL or ARM on `model`'s forward, an MLP, under `mse_loss`; not Meta-SGD, whose
    per-parameter step sizes make the inner change full rank), else `learner` itself."""
    activation = mlp_activation(model.module)
    covered = (
        type(learner) is MAML
        and activation is not None
        and type(model).forward is FlatModel.forward
        and learner.forward == model.forward
        and learner.loss is mse_loss
        and not learner.learned_inner_lr
    )
    if not covered:
        return learner
    shapes = [slot.shape for slot in model.slots]
    return ClosedFormMAML(learner, shapes, activation)
