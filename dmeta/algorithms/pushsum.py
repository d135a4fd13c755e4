"""PARS-Push (slides 003, Part II): personalised, asynchronous and robust push-sum.

The aggregation is the running-sums push-sum of RASGP (Spiridonoff, Olshevsky and Paschalidis,
"Robust Asynchronous Stochastic Gradient-Push", JMLR 2021, Algorithm 2; the slides' "running
sums technique"). Agent i holds a numerator x_i (its launch model at the start), a weight y_i
(1 at the start) and its estimate z_i = x_i / y_i, the model it trains and is evaluated on. In
round t an agent that is awake

    x_i <- x_i + (z_i' - z_i)           z_i' the learner's outer step(s) from z_i: with SGD
                                        x_i - mu g_i(z_i), RASGP's gradient step, g_i the
                                        meta-gradient after u = `learner.inner_steps` inner
                                        steps (the slides' multi-step MAML, budget u); with
                                        `scale_step_by_weight`, x_i + y_i (z_i' - z_i)
    phi_i <- phi_i + (x_i, y_i)/(d_i + 1)   the running sum of all it ever pushed along each
    (x_i, y_i) <- (x_i, y_i)/(d_i + 1)      out-edge (d_i out-neighbours, push weights 1/(d+1))
    for each in-edge j -> i whose newest arrived message (phi_j, send round s) is newer than
    the last applied one:  (x_i, y_i) += phi_j - rho_ij,  rho_ij <- phi_j
    z_i = x_i / y_i

RASGP's step moves z_i = x_i / y_i by (z_i' - z_i) / y_i: an agent that kept shrinking its
weight (awake, pushing shares, receiving nothing) jumps. The step scaled by y_i moves z_i by
the optimizer's step itself; the network's numerator mass X then moves by sum_i y_i (z_i' -
z_i), so an agent of small weight counts less in that round's step of the average.

Sleeping agents neither compute, send nor apply. The sender pushes the same share to every
out-neighbour, so one running sum phi_j serves all its out-edges. The communication conserves
(X, Y) = sum_i (x_i, y_i) + sum_{j -> i} (phi_j - rho_ij): a lost message's mass stays in
phi_j - rho_ij and arrives with the next delivered message; nothing is resent. X / Y is the
limit every z_i tends to; with no gradient step (`learner.local_steps = 0`: push-sum consensus
alone) it is the average of the launch models, exactly, and each logged row records every
agent's squared relative error to it (`pushsum/consensus_error`).

Asynchrony (slides: Gamma_w, Gamma_d, Gamma_f), every event a function of (seed, agent or
global edge id, round) on its own Philox stream, so any rank layout draws the same events:
an agent wakes with probability `wake_probability`, and surely after `max_sleep` - 1 rounds
asleep; a message sent in round s on edge e takes d(e, s) in 1..`max_delay` rounds and can be
applied from the end of round s + d - 1 (d = 1 is synchronous push-sum); it is lost with
probability `loss_probability` unless the edge lost the `max_consecutive_losses` messages
before it.

Simulation state lives with the receiver, per in-edge, in a fixed width [local agents, max
in-degree, ...]: slot p of agent i is its p-th in-neighbour by id (the route's edge order); the
unused slots of agents with fewer in-neighbours stay empty. Messages in flight wait in a ring
buffer of depth `max_delay` per in-edge, indexed by arrival round mod depth, then in an inbox
until the receiver wakes. Each round is one `deliver` of every sender's (phi_j, sent this round)
row. All push-sum state is float64: running sums grow with the rounds, and their differences
would lose digits in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dmeta import rng, topology
from dmeta.algorithms.base import (
    Algorithm,
    CommTimer,
    Context,
    RoundReport,
    TopologyRecord,
    build_optimizer,
    task_draw,
)
from dmeta.config import AsynchronyConfig, Config
from dmeta.errors import DmetaError
from dmeta.exchange import AgentLayout, Exchange, Route

F64 = torch.float64


@dataclass
class PushPlan:
    """The checked push graph: in-edges j -> i (no self-loops) in (destination, source) order,
    whose index is the global edge id of the event draws."""

    push: topology.PushWeights
    sources: np.ndarray  # [E]
    destinations: np.ndarray  # [E]
    slots: np.ndarray  # [E]: the edge's position among its destination's in-edges
    out_degree: np.ndarray  # [K]
    max_in_degree: int
    settings: AsynchronyConfig


def plan_push(config: Config) -> PushPlan:
    """Push weights 1/(d_out + 1) on `config.graph` (an undirected graph is its symmetric
    digraph), checked strongly connected, and the per-edge layout of the receivers' state."""
    cfg = config.graph
    if cfg.schedule != "static":
        raise DmetaError(
            f"strategy = 'pushsum' runs on a static graph (its links fail through [asynchrony]): "
            f"set graph.schedule = 'static', not {cfg.schedule!r}"
        )
    if cfg.rule == "matrix":
        raise DmetaError(
            "strategy = 'pushsum' pushes shares 1/(d_out + 1), it reads no matrix file: "
            "set graph.rule = 'averaging'"
        )
    push = topology.push_weights(topology.build_graph(cfg, config.agents))
    topology.validate_push_weights(push)
    entries = push.matrix.tocoo()
    off = entries.row != entries.col
    order = np.lexsort((entries.row[off], entries.col[off]))
    sources = entries.row[off][order].astype(np.int64)
    destinations = entries.col[off][order].astype(np.int64)
    in_degree = np.bincount(destinations, minlength=config.agents)
    starts = np.concatenate([[0], np.cumsum(in_degree)[:-1]])
    slots = np.arange(len(destinations)) - starts[destinations]
    out_degree = np.bincount(sources, minlength=config.agents)
    return PushPlan(
        push, sources, destinations, slots, out_degree, int(in_degree.max(initial=0)),
        config.asynchrony,
    )  # fmt: skip


def _unit(seed: int, keys: torch.Tensor, stream: int, t: int) -> torch.Tensor:
    """One float64 uniform in [0, 1) per key at round t."""
    return rng.uniform(seed, keys, stream, t, (1,), dtype=F64)[:, 0]


def wake_draws(seed: int, agents: torch.Tensor, t: int, probability: float) -> torch.Tensor:
    """Whether each of `agents` draws a wake-up in round t (probability `probability`)."""
    return _unit(seed, agents, rng.STREAM_WAKE, t) < probability


def message_delays(seed: int, edges: torch.Tensor, t: int, max_delay: int) -> torch.Tensor:
    """Delay in rounds, uniform in 1..max_delay, of the message sent on each of `edges` (global
    edge ids) in round t."""
    return 1 + (_unit(seed, edges, rng.STREAM_DELAY, t) * max_delay).long()


def loss_draws(seed: int, edges: torch.Tensor, t: int, probability: float) -> torch.Tensor:
    """Whether the message sent on each of `edges` in round t draws a loss."""
    return _unit(seed, edges, rng.STREAM_LOSS, t) < probability


class RunningSums:
    """Running-sums push-sum of a rank's agents under the asynchrony model (module docstring).

    `rows` holds the whole state, one row per local agent: `numerator` (x, y) [L, M + 1],
    `sent` phi [L, M + 1]; per in-edge slot `applied` rho [L, S, M + 1] and its send round
    `applied_round` [L, S], the newest arrived message `inbox`, `inbox_round`, the ring buffer
    `flight` [L, S, depth, M + 1] and `flight_round` [L, S, depth] (round 0: empty), the
    consecutive `losses` [L, S]; per agent the rounds `asleep` and the `messages` it pushed
    since they were last counted.
    """

    def __init__(
        self, exchange: Exchange, plan: PushPlan, agents: torch.Tensor, seed: int,
        initial: torch.Tensor,
    ) -> None:  # fmt: skip
        self.exchange = exchange
        self.plan = plan
        self.agents = agents
        self.seed = seed
        count, width = len(agents), initial.shape[1] + 1
        slots, depth = plan.max_in_degree, plan.settings.max_delay
        device = initial.device

        def zeros(*shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        ones = torch.ones((count, 1), dtype=F64, device=device)
        self.rows = {
            "numerator": torch.cat([initial.detach().to(F64), ones], dim=1),
            "sent": zeros(count, width),
            "applied": zeros(count, slots, width),
            "applied_round": zeros(count, slots, dtype=torch.int64),
            "inbox": zeros(count, slots, width),
            "inbox_round": zeros(count, slots, dtype=torch.int64),
            "flight": zeros(count, slots, depth, width),
            "flight_round": zeros(count, slots, depth, dtype=torch.int64),
            "losses": zeros(count, slots, dtype=torch.int64),
            "asleep": zeros(count, dtype=torch.int64),
            "messages": zeros(count, dtype=torch.int64),
        }
        self.out_degree = torch.as_tensor(plan.out_degree[agents.cpu().numpy()], device=device)
        self.route: Route | None = None

    def estimates(self) -> torch.Tensor:
        """z = x / y of every local agent [L, M] (float64)."""
        numerator = self.rows["numerator"]
        return numerator[:, :-1] / numerator[:, -1:]

    def local_mass(self) -> torch.Tensor:
        """This rank's share of the conserved mass (X, Y) [M + 1]: what its agents hold plus,
        for the edges j -> i, d_j phi_j of its senders j minus rho_ij of its receivers i, so
        that the network's sum is sum_i (x_i, y_i) + sum_{j -> i} (phi_j - rho_ij). Unused
        slots hold rho = 0."""
        rows = self.rows
        pushed = (self.out_degree[:, None].to(F64) * rows["sent"]).sum(dim=0)
        return rows["numerator"].sum(dim=0) + pushed - rows["applied"].sum(dim=(0, 1))

    def wake(self, t: int) -> torch.Tensor:
        """Which local agents are awake in round t: a wake draw, or max_sleep - 1 rounds
        asleep (so every max_sleep consecutive rounds hold a wake-up)."""
        settings = self.plan.settings
        asleep = self.rows["asleep"]
        drawn = wake_draws(self.seed, self.agents, t, settings.wake_probability)
        awake = drawn | (asleep >= settings.max_sleep - 1)
        self.rows["asleep"] = torch.where(awake, 0, asleep + 1)
        return awake

    def push(self, t: int, awake: torch.Tensor, timer: CommTimer) -> None:
        """Round t's push of the awake agents, the exchange, the arrivals and the awake
        receivers' application of their newest messages."""
        rows = self.rows
        share = rows["numerator"][awake] / (self.out_degree[awake, None] + 1).to(F64)
        rows["sent"][awake] += share
        rows["numerator"][awake] = share
        rows["messages"] += torch.where(awake, self.out_degree, 0)
        if self.route is None:
            self._connect()
        table = torch.cat([rows["sent"], awake[:, None].to(F64)], dim=1)
        with timer:
            delivered = self.exchange.deliver(table, self.route)
        self._receive(t, delivered[:, :-1], delivered[:, -1] > 0)
        self._apply(awake)

    def _connect(self) -> None:
        """The route of the in-edges (a collective call on MPI) and each edge's id and slot."""
        plan = self.plan
        self.route = self.exchange.route(plan.sources, plan.destinations)
        device = self.agents.device
        self.edges = torch.as_tensor(self.route.edges, device=device)
        self.edge_slots = torch.as_tensor(plan.slots[self.route.edges], device=device)

    def _receive(self, t: int, sums: torch.Tensor, sent: torch.Tensor) -> None:
        """Put the messages sent in round t (`sums` [E_in, M + 1] where `sent`) that are not
        lost into the ring buffer at their arrival round, then move round t's arrivals into
        the inboxes when newer than what waits there."""
        settings, rows = self.plan.settings, self.rows
        target, slot = self.route.targets, self.edge_slots
        losses = rows["losses"][target, slot]
        lost = sent & loss_draws(self.seed, self.edges, t, settings.loss_probability)
        lost &= losses < settings.max_consecutive_losses
        rows["losses"][target, slot] = torch.where(sent, torch.where(lost, losses + 1, 0), losses)
        arrives = sent & ~lost
        depth = settings.max_delay
        delay = message_delays(self.seed, self.edges, t, depth)
        ring = (t + delay - 1) % depth
        where = (target[arrives], slot[arrives], ring[arrives])
        rows["flight"][where] = sums[arrives]
        rows["flight_round"][where] = t
        now = t % depth
        arrived = rows["flight_round"][:, :, now]
        newer = arrived > rows["inbox_round"]
        rows["inbox"] = torch.where(newer[..., None], rows["flight"][:, :, now], rows["inbox"])
        rows["inbox_round"] = torch.where(newer, arrived, rows["inbox_round"])
        rows["flight_round"][:, :, now] = 0

    def _apply(self, awake: torch.Tensor) -> None:
        """Awake receivers add phi_j - rho_ij of every in-edge with a message newer than the
        last applied one, and keep phi_j as rho_ij (RASGP's running sums)."""
        rows = self.rows
        newer = (rows["inbox_round"] > rows["applied_round"]) & awake[:, None]
        gain = torch.where(newer[..., None], rows["inbox"] - rows["applied"], 0.0)
        rows["numerator"] = rows["numerator"] + gain.sum(dim=1)
        rows["applied"] = torch.where(newer[..., None], rows["inbox"], rows["applied"])
        rows["applied_round"] = torch.where(newer, rows["inbox_round"], rows["applied_round"])


class PushSum(Algorithm):
    """PARS-Push: the learner's outer steps on z at awake agents, then running-sums push-sum."""

    config_sections = ("asynchrony",)
    series = {
        "pushsum/weight": (True, "1", "push-sum weight y_k after the row's round (z = x / y)"),
        "comm/messages": (
            False,
            "1",
            "messages the awake agents pushed to their out-neighbours since the previous row, "
            "lost ones included",
        ),
        "pushsum/consensus_error": (
            True,
            "1",
            "||z_k - x_bar||^2 / ||x_bar||^2, x_bar = X / Y the push-sum limit of the row, (X, Y) "
            "= sum_i (x_i, y_i) plus the mass in flight; with no gradient step (learner."
            "local_steps = 0) x_bar is the average of the launch models, exactly",
        ),
    }

    @classmethod
    def plan(cls, config: Config, layout: AgentLayout) -> PushPlan:
        return plan_push(config)

    def __init__(self, context: Context, plan: PushPlan, initial_models: torch.Tensor) -> None:
        self.context = context
        self.optimizer = build_optimizer(context.config.optimizer)
        self.optimizer_state = self.optimizer.init_state(initial_models)
        self.sums = RunningSums(
            context.exchange, plan, context.agents, context.config.seed, initial_models
        )
        # The loss and meta-gradient norm of each agent's latest round (NaN before its first).
        nan = torch.full((len(context.agents),), torch.nan, dtype=F64, device=context.device)
        self.last_loss, self.last_norm = nan, nan.clone()

    def state_rows(self) -> dict[str, torch.Tensor]:
        optimizer = {f"optimizer/{name}": value for name, value in self.optimizer_state.items()}
        sums = {f"pushsum/{name}": value for name, value in self.sums.rows.items()}
        return sums | optimizer | {"last_loss": self.last_loss, "last_norm": self.last_norm}

    def load_state(self, rows: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {
                name[len(prefix) :]: value.clone()
                for name, value in rows.items()
                if name.startswith(prefix)
            }

        self.sums.rows = part("pushsum/")
        self.optimizer_state = part("optimizer/")
        self.last_loss, self.last_norm = rows["last_loss"].clone(), rows["last_norm"].clone()

    def models(self) -> torch.Tensor:
        """Every agent's estimate z = x / y, in the run's dtype."""
        return self.sums.estimates().to(self.context.dtype)

    def round(self, t: int) -> RoundReport:
        """Wake-ups, the awake agents' outer steps on z applied to x, then the push."""
        context = self.context
        awake = self.sums.wake(t)
        rows = torch.nonzero(awake).flatten()
        if len(rows) and context.config.learner.local_steps:
            self._train(t, rows)
        timer = CommTimer(context.device)
        with torch.no_grad():
            self.sums.push(t, awake, timer)
        row_bytes = (self.sums.rows["sent"].shape[1] + 1) * 8
        sends = torch.as_tensor(self.sums.route.sends_per_agent * row_bytes, device=context.device)
        return RoundReport(
            loss_sum=self.last_loss.clone(),
            steps=self._steps(),
            gradient_norm=self.last_norm.clone(),
            comm_bytes=sends,
            comm_seconds=timer.seconds,
        )

    def _steps(self) -> int:
        """The outer steps of `learner.local_steps` local epochs (the task family's
        steps_per_epoch each, as in the diffusion strategies)."""
        return self.context.config.learner.local_steps * self.context.task.steps_per_epoch()

    def _train(self, t: int, rows: torch.Tensor) -> None:
        """`learner.local_steps` local epochs of the agents `rows` from their z (task draws
        numbered as in the diffusion strategies); x moves by the change of z (times y with
        `asynchrony.scale_step_by_weight`, so that z moves by it)."""
        context = self.context
        settings = context.config.learner
        steps = self._steps()
        agents = context.agents[rows]
        start = self.sums.estimates()[rows].to(context.dtype)
        models = start
        state = {name: value[rows] for name, value in self.optimizer_state.items()}
        loss_sum = torch.zeros(len(rows), dtype=F64, device=context.device)
        for step in range(steps):
            tasks = context.task.sample(agents, task_draw(t, steps, step), settings.tasks_per_agent)
            gradients, losses = context.meta_gradients(models, tasks)
            models, state = self.optimizer.step(models, gradients, state)
            loss_sum += losses.detach().to(F64)
        for name, value in state.items():
            self.optimizer_state[name][rows] = value
        numerator = self.sums.rows["numerator"]
        step = (models - start).detach().to(F64)
        if context.config.asynchrony.scale_step_by_weight:
            step = step * numerator[rows, -1:]
        numerator[rows, :-1] += step
        self.last_loss[rows] = loss_sum
        self.last_norm[rows] = torch.linalg.vector_norm(gradients, dim=1).to(F64)

    def row_values(self) -> dict[str, torch.Tensor | float]:
        """y per agent, the network's messages since the previous row and each agent's error
        to the push-sum limit: one all-reduce, so every rank calls this at every logged row
        (the engine does)."""
        messages = self.sums.rows["messages"]
        local = torch.cat([messages.sum().to(F64)[None], self.sums.local_mass()])
        # All ranks synchronise here: the messages and the network's mass (X, Y), P + 2 numbers.
        total = self.context.exchange.allreduce_sum(local)
        messages.zero_()
        limit = total[1:-1] / total[-1]
        error = (self.sums.estimates() - limit).square().sum(dim=1) / limit.square().sum()
        return {
            "pushsum/weight": self.sums.rows["numerator"][:, -1].clone(),
            "comm/messages": float(total[0]),
            "pushsum/consensus_error": error,
        }

    @classmethod
    def topology(cls, plan: PushPlan) -> TopologyRecord:
        entries = plan.push.matrix.tocoo()
        order = np.lexsort((entries.row, entries.col))
        edges = np.stack([entries.row[order], entries.col[order]], axis=1).astype(np.int64)
        attributes = {
            "num_agents": plan.push.matrix.shape[0],
            "kind": "push",
            "schedule": "static",
            "centroid": "uniform",
            "description": "edges l -> k with weight p[l, k], the share of its (x, y) agent l "
            "pushes to k when awake (1/(d_out(l) + 1), self-loops included); rows sum to one",
        }
        return TopologyRecord(edges, entries.data[order].astype(np.float64), attributes)
