"""L2C (Li et al., "Learning to Collaborate in Decentralized Learning of Personalized Models",
CVPR 2022, Algorithm 1): mixing weights learned on each node's validation loss.

Node i keeps logits alpha_i over its in-neighbours and itself, w_i = softmax(alpha_i) over its
surviving in-edges (eq. 3). Round t of node i:

    theta_i^{t+1/2}  `l2c.local_epochs` epochs of the learner from theta_i^t on its training
                     tasks (eq. 1: with `learner.name = "arm"` and SGD, plain local SGD)
    Delta_j^t      = theta_j^t - theta_j^{t+1/2}, the update node j sends
    theta_i^{t+1}  = theta_i^t - sum_{j in i + N(i)} w_ij Delta_j^t            (eq. 2)
    alpha_i       <- one Adam step (lr `alpha_lr`, L2 weight decay `alpha_weight_decay`, as
                     torch.optim.Adam's, or decoupled with `alpha_decoupled_decay`, as
                     AdamW's) on L(theta_i^{t+1}; D_i^val)                          (eq. 3)

The gradient in alpha_i is taken through the mix: the exchange's mix is differentiable in its
weights, and the neighbours' updates enter as constants (they do not depend on alpha_i).
D_i^val is the task family's `validation_data` of round t: `l2c.validation_tasks` tasks of
node i's own distribution drawn each round on their own stream, or the node's own validation
set where it holds one (problem = "noniid": its 20%), and L the learner's loss on them (after
its inner steps: MAML's query loss after adaptation; ARM's plain loss). Each of the
`l2c.local_epochs` local epochs is the family's `steps_per_epoch` steps. After round
`l2c.prune_round` (T0) each node drops the `l2c.prune_count` (K0) in-neighbours of smallest
weight, never itself (Algorithm 1, l. 20-21; ranked by the logits after that round's step,
ties by neighbour id); the exchange stops sending along those edges.

State per in-edge lives with the receiver, in a fixed width [local agents, max in-degree]:
slot p of node i is its p-th in-edge by source id (itself included), the route's edge order.
The unused slots of nodes with fewer in-edges and the pruned slots are inactive: weight 0,
logits and Adam moments frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.func import vmap

from dmeta import topology
from dmeta.algorithms.base import CommTimer, Context, RoundReport, TopologyRecord
from dmeta.algorithms.diffusion import MetaLearning
from dmeta.config import Config, L2CConfig
from dmeta.errors import DmetaError
from dmeta.exchange import AgentLayout, Route
from dmeta.optim import Adam
from dmeta.output import Columns

# torch.optim.Adam's defaults: the paper gives only the learning rate and weight decay.
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


@dataclass
class L2CPlan:
    """The graph's in-edges j -> i, self-loops included, in (destination, source) order: the
    global edge ids of /topology/edges and of the columns of /mixing/weights."""

    sources: np.ndarray  # [E]
    destinations: np.ndarray  # [E]
    slots: np.ndarray  # [E]: the edge's position among its destination's in-edges
    in_degree: np.ndarray  # [K]: in-neighbours plus one (itself)
    settings: L2CConfig

    @property
    def first_edge(self) -> np.ndarray:
        """[K]: the global id of each node's first in-edge."""
        return np.concatenate([[0], np.cumsum(self.in_degree)[:-1]])


def plan_l2c(config: Config) -> L2CPlan:
    """The in-edges of `config.graph` (an undirected graph's both ways) plus self-loops, for
    `strategy = "l2c"` or `"meta_l2c"`."""
    cfg, strategy = config.graph, config.strategy
    if cfg.schedule != "static":
        raise DmetaError(
            f"strategy = {strategy!r} learns weights over a static graph: set graph.schedule = "
            f"'static', not {cfg.schedule!r}"
        )
    if cfg.rule == "matrix":
        raise DmetaError(
            f"strategy = {strategy!r} learns its weights, it reads no matrix file: set "
            "graph.rule = 'averaging' (its initial weights, uniform over each node's in-edges)"
        )
    if config.learner.local_steps != 1:
        raise DmetaError(
            f"strategy = {strategy!r} takes l2c.local_epochs local steps per round: leave "
            f"learner.local_steps = 1, not {config.learner.local_steps}"
        )
    # p[l, k] > 0 exactly for l = k and the edges l -> k.
    pattern = topology.push_weights(topology.build_graph(cfg, config.agents)).matrix.tocoo()
    order = np.lexsort((pattern.row, pattern.col))
    sources = pattern.row[order].astype(np.int64)
    destinations = pattern.col[order].astype(np.int64)
    in_degree = np.bincount(destinations, minlength=config.agents)
    starts = np.concatenate([[0], np.cumsum(in_degree)[:-1]])
    slots = np.arange(len(destinations)) - starts[destinations]
    return L2CPlan(sources, destinations, slots, in_degree, config.l2c)


def decayed(
    params: torch.Tensor, gradient: torch.Tensor, settings: L2CConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where Adam starts from and what gradient it takes, with `alpha_weight_decay` lambda:
    (params, gradient + lambda params) for the L2 term (torch.optim.Adam's weight_decay), or
    ((1 - lr lambda) params, gradient) decoupled (`alpha_decoupled_decay`: AdamW's)."""
    decay = settings.alpha_weight_decay
    if settings.alpha_decoupled_decay:
        return params * (1 - settings.alpha_lr * decay), gradient
    return params, gradient + decay * params


def masked_softmax(alpha: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """w_i = softmax(alpha_i) over the active slots of each row, 0 elsewhere (eq. 3)."""
    return torch.softmax(alpha.masked_fill(~active, -torch.inf), dim=1)


def smallest_weights(weights: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """[L, S]: the `count` candidate slots of smallest weight in each row (all candidates when
    fewer), ties to the lower slot."""
    key = weights.masked_fill(~candidates, torch.inf)
    order = torch.argsort(key, dim=1, stable=True)
    positions = torch.arange(weights.shape[1], device=weights.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    return candidates & (ranks < count)


class LearnedMixing(MetaLearning):
    """What L2C and meta-L2C share: each node's in-edges by slot, their pruning after round
    T0, the route of the surviving edges, the validation loss of eq. (3)/(6), and the logged
    weights. A subclass says how the weights are made (`weights`) and runs the round."""

    config_sections = ("l2c",)
    # How the logged /mixing/weights relate to the row's round.
    weights_meaning = "w_ij after the row's round"

    @classmethod
    def plan(cls, config: Config, layout: AgentLayout) -> L2CPlan:
        return plan_l2c(config)

    def __init__(self, context: Context, plan: L2CPlan, initial_models: torch.Tensor) -> None:
        super().__init__(context, plan, initial_models)
        agents = context.agents.cpu().numpy()
        width = int(plan.in_degree.max())
        slots = torch.arange(width, device=context.device)
        in_degree = torch.as_tensor(plan.in_degree[agents], device=context.device)
        # Slots that hold an in-edge of the graph, pruned or not.
        self.valid = slots < in_degree[:, None]
        # Per-edge state by slot, checkpointed per node under l2c/.
        self.mixing: dict[str, torch.Tensor] = {"active": self.valid.clone()}
        # The self-loop's slot (one self-loop per node, in destination order).
        own = plan.slots[plan.sources == plan.destinations][agents]
        self.own_slot = slots == torch.as_tensor(own, device=context.device)[:, None]
        self.route: Route | None = None
        self.edge_slots: torch.Tensor | None = None

    def state_rows(self) -> dict[str, torch.Tensor]:
        return super().state_rows() | {f"l2c/{k}": v for k, v in self.mixing.items()}

    def load_state(self, rows: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]) -> None:
        prefix = "l2c/"
        super().load_state({k: v for k, v in rows.items() if not k.startswith(prefix)}, shared)
        self.mixing = {k[len(prefix) :]: v.clone() for k, v in rows.items() if k.startswith(prefix)}
        self.route = None  # rebuilt from the loaded pruning decisions

    def weights(self) -> torch.Tensor:
        """w [local agents, max in-degree]: each node's mixing weights by slot."""
        raise NotImplementedError

    def validation_loss(self, t: int, models: torch.Tensor) -> torch.Tensor:
        """[local agents]: L(theta_i; D_i^val), the learner's loss on node i's validation
        data of round t (`TaskFamily.validation_data`), differentiable in `models`."""
        context = self.context
        count = self.plan_.settings.validation_tasks
        tasks = context.task.validation_data(context.agents, t, count)
        return vmap(context.learner.agent_meta_loss)(models, tasks)

    def _prune(self, count: int) -> None:
        """Drop each node's `count` in-neighbours of smallest weight, never itself."""
        active = self.mixing["active"]
        dropped = smallest_weights(self.weights(), active & ~self.own_slot, count)
        self.mixing["active"] = active & ~dropped
        self.route = None

    def _connect(self) -> None:
        """The route of the surviving edges. Pruning decisions live with the receivers, so
        every rank learns all of them with one allgather (collective; at the first round,
        after pruning and after a resume)."""
        plan, mixing = self.plan_, self.mixing
        rows, slots = torch.nonzero(~mixing["active"] & self.valid, as_tuple=True)
        agents = self.context.agents.cpu().numpy()
        local = plan.first_edge[agents][rows.cpu().numpy()] + slots.cpu().numpy()
        # All ranks synchronise here: every rank's dropped edge ids.
        dropped = np.concatenate(self.context.exchange.allgather_object(local))
        kept = np.setdiff1d(np.arange(len(plan.sources)), dropped)
        # A collective call on MPI when the rank-level support changes (every rank alike).
        self.route = self.context.exchange.route(plan.sources[kept], plan.destinations[kept])
        edge_ids = kept[self.route.edges]
        self.edge_slots = torch.as_tensor(plan.slots[edge_ids], device=self.context.device)

    def row_values(self) -> dict[str, torch.Tensor | float]:
        return {"mixing/weights": self.weights().detach()}

    @classmethod
    def row_series(cls, plan: L2CPlan) -> dict[str, tuple[bool | Columns, str, str]]:
        return {
            "mixing/weights": (
                Columns(plan.in_degree),
                "1",
                f"{cls.weights_meaning}, one column per edge j -> i of /topology/edges "
                "(self-loops included, in that order); 0 once pruned",
            )
        }

    @classmethod
    def topology(cls, plan: L2CPlan) -> TopologyRecord:
        edges = np.stack([plan.sources, plan.destinations], axis=1)
        attributes = {
            "num_agents": len(plan.in_degree),
            "kind": "learned",
            "schedule": "static",
            "centroid": "uniform",
            "description": "edges j -> i (self-loops included) with node i's initial weight "
            "1/(|N(i)| + 1), softmax of zero logits; the learned weights are /mixing/weights",
        }
        return TopologyRecord(edges, 1.0 / plan.in_degree[plan.destinations], attributes)


class L2C(LearnedMixing):
    """L2C, Algorithm 1 (module docstring): local steps, eq. (2), one step of eq. (3)."""

    @classmethod
    def plan(cls, config: Config, layout: AgentLayout) -> L2CPlan:
        if config.l2c.pretrained:
            raise DmetaError(
                f"l2c.pretrained = {config.l2c.pretrained!r} is a meta-L2C encoder, which "
                "strategy = 'l2c' does not use: set strategy = 'meta_l2c' or l2c.pretrained = ''"
            )
        return plan_l2c(config)

    def __init__(self, context: Context, plan: L2CPlan, initial_models: torch.Tensor) -> None:
        super().__init__(context, plan, initial_models)
        self.adam = Adam(plan.settings.alpha_lr, *ADAM_BETAS, ADAM_EPS)
        alpha = torch.zeros(self.valid.shape, dtype=context.dtype, device=context.device)
        self.mixing["alpha"] = alpha
        self.mixing |= {f"adam/{k}": v for k, v in self.adam.init_state(alpha).items()}

    def weights(self) -> torch.Tensor:
        """w [local agents, max in-degree]: each node's mixing weights by slot (eq. 3)."""
        return masked_softmax(self.mixing["alpha"], self.mixing["active"])

    def round(self, t: int) -> RoundReport:
        """Local steps (eq. 1), aggregation of the updates (eq. 2), the alpha step (eq. 3) and,
        after round T0, the pruning."""
        settings = self.plan_.settings
        start = self.training.launch_models
        loss_sum, norm = self.training.adapt(t, settings.local_epochs)
        updates = (start - self.training.launch_models).detach()
        timer = CommTimer(self.context.device)
        aggregated, gradient = self.aggregate(t, start, updates, timer)
        self.training.launch_models = aggregated
        self._step_alpha(gradient)
        # This round's sends: pruning changes the route from the next round on.
        sends = torch.as_tensor(self.route.sends_per_agent * self.model_bytes)
        if t == settings.prune_round and settings.prune_count > 0:
            self._prune(settings.prune_count)
        steps = self.training.steps(settings.local_epochs)
        return RoundReport(loss_sum, steps, norm, sends.to(loss_sum.device), timer.seconds)

    def aggregate(
        self, t: int, start: torch.Tensor, updates: torch.Tensor, timer: CommTimer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta^{t+1} = theta^t - sum_j w_ij Delta_j (eq. 2), the gradient in alpha of the
        validation losses of theta^{t+1} (eq. 3)): one neighbour exchange of the updates."""
        if self.route is None:
            self._connect()
        alpha = self.mixing["alpha"].detach().requires_grad_()
        weights = masked_softmax(alpha, self.mixing["active"])
        with timer:
            mixed = self.context.exchange.mix(
                updates, self.route, weights[self.route.targets, self.edge_slots]
            )
        aggregated = start - mixed
        gradient = torch.autograd.grad(self.validation_loss(t, aggregated).sum(), alpha)[0]
        return aggregated.detach(), gradient

    def _step_alpha(self, gradient: torch.Tensor) -> None:
        """One Adam step of the active logits on `gradient` with the weight decay (`decayed`)."""
        mixing, active = self.mixing, self.mixing["active"]
        alpha = mixing["alpha"]
        start, gradient = decayed(alpha, gradient, self.plan_.settings)
        state = {k: mixing[f"adam/{k}"] for k in ("exp_avg", "exp_avg_sq", "step")}
        stepped, state = self.adam.step(start, torch.where(active, gradient, 0.0), state)
        mixing["alpha"] = torch.where(active, stepped, alpha)
        for name in ("exp_avg", "exp_avg_sq"):
            mixing[f"adam/{name}"] = torch.where(active, state[name], mixing[f"adam/{name}"])
        mixing["adam/step"] = state["step"]
