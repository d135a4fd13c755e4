"""Dif-MAML (Kayaalp, Vlaski and Sayed, Algorithm 1): adapt, then combine over the graph.

Round i of agent k, with tau = `learner.local_steps` outer steps per round (tau = 1 is
Algorithm 1):

    phi_k = w_k - mu grad J_k(w_k)      (eq. 6a, tau times, the learner's meta-gradient of
                                         eq. 4 on fresh tasks; Adam or SGD per agent)
    w_k   = sum_l a[l, k] phi_l          (eq. 6b, the combination matrix of round i)

`ATC` adapts then combines (the paper's order), `CTA` combines then adapts, `NonCooperative`
never combines (A = I). The combination matrix comes from the graph schedule: fixed, or a
function of (seed, round) for time-varying graphs, the same on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse
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
from dmeta.config import Config
from dmeta.errors import DmetaError
from dmeta.exchange import AgentLayout, indexed_mix
from dmeta.tasks import TaskBatch


@dataclass
class GraphPlan:
    """A checked combination schedule and the facts the run file records about it."""

    schedule: topology.Schedule
    report: topology.MatrixReport  # of round 1's matrix
    lambda2: float  # lambda_2, or the expected per-round mixing rate of a time-varying graph
    lambda2_method: str
    # The Perron vector of round 1's matrix when it is not doubly stochastic (else uniform).
    perron: np.ndarray | None = None

    def edges_at(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sources l, destinations k, weights a[l, k]) of round t's matrix."""
        return matrix_edges(self.schedule.matrix_at(t))


def matrix_edges(matrix: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-zero entries of a (sparse or dense) K x K matrix as edges l -> k, weight a[l, k]."""
    entries = scipy.sparse.coo_array(matrix)
    positive = entries.data != 0
    return (
        entries.row[positive].astype(np.int64),
        entries.col[positive].astype(np.int64),
        entries.data[positive].astype(np.float64),
    )


def plan_graph(config: Config) -> GraphPlan:
    """Build and check the graph schedule of `config.graph` (round t keyed by graph.seed).

    A static graph must be strongly connected; a time-varying one need not be in any round,
    but its expected mixing rate (Theorem 1's lambda_2 for products of matrices, see
    `topology.Schedule.expected_mixing_rate`) must be below one.
    """
    cfg = config.graph
    schedule = topology.build_schedule(cfg, config.agents, cfg.seed, cfg.rule)
    first = schedule.matrix_at(1)
    topology.validate_combination_matrix(first, require_connected=schedule.static)
    report = topology.describe(first)
    perron = None if report.doubly_stochastic else topology.perron_vector(first)
    if schedule.static:
        return GraphPlan(schedule, report, report.lambda2, report.lambda2_method, perron)
    rate, method = schedule.expected_mixing_rate()
    if not rate < 1.0:
        raise DmetaError(
            f"graph.schedule = {cfg.schedule!r} does not mix the agents' models (expected "
            f"mixing rate {rate:.6g} per round, {method}): use a connected graph or a lower "
            "graph.failure_probability"
        )
    return GraphPlan(schedule, report, rate, f"expected rate per round: {method}", perron)


class LocalTraining:
    """The adapt step shared by the diffusion family: tau meta-gradient steps per round."""

    def __init__(self, context: Context, initial_models: torch.Tensor) -> None:
        self.context = context
        self.optimizer = build_optimizer(context.config.optimizer)
        self.launch_models = initial_models.detach().clone()
        self.optimizer_state = self.optimizer.init_state(self.launch_models)
        self._prefetched: tuple[int, TaskBatch] | None = None
        self._compiled: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None
        self._compiled = None

    def rows(self) -> dict[str, torch.Tensor]:
        return {"launch_models": self.launch_models} | {
            f"optimizer/{name}": value for name, value in self.optimizer_state.items()
        }

    def load(self, rows: dict[str, torch.Tensor]) -> None:
        self.launch_models = rows["launch_models"].clone()
        prefix = "optimizer/"
        self.optimizer_state = {
            name[len(prefix) :]: value.clone()
            for name, value in rows.items()
            if name.startswith(prefix)
        }

    def steps(self, epochs: int = 0) -> int:
        """The outer steps of `epochs` local epochs (default `learner.local_steps`), each the
        task family's `steps_per_epoch` draws (one where tasks are drawn fresh)."""
        epochs = epochs or self.context.config.learner.local_steps
        return epochs * self.context.task.steps_per_epoch()

    def compile(self, compiler: Callable[[Callable], Any]) -> Any | None:
        """Run `adapt` of an integer round through `compiler` (torch.compile) from now on: the
        task draws, meta-gradients and outer steps of a round as one program, t a counter
        tensor. The new launch models are a new tensor, as in an eager round (callers may hold
        the old ones). Returns what `compiler` made; None (nothing compiled) where the task
        family draws with host work."""
        if not self.context.task.draws_by_counter:
            return None
        self._counter = torch.zeros((), dtype=torch.int64, device=self.context.device)
        self._compiled = compiler(self.adapt)
        return self._compiled

    def adapt(self, t: int | torch.Tensor, epochs: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. (6a) tau times, tau = `steps(epochs)`; returns (loss sum over the steps, last
        meta-gradient norm). An integer round runs the compiled program where `compile` made
        one; a tensor round (a counter) runs eagerly or is being traced."""
        if self._compiled is not None and not isinstance(t, torch.Tensor):
            rng.set_counter(self._counter, t)
            return self._compiled(self._counter, epochs)
        context = self.context
        steps = self.steps(epochs)
        loss_sum = torch.zeros(len(context.agents), dtype=torch.float64, device=context.device)
        norm = torch.full_like(loss_sum, float("nan"))
        for step in range(steps):
            tasks = self._tasks(task_draw(t, steps, step))
            gradients, losses = context.meta_gradients(self.launch_models, tasks)
            self.launch_models, self.optimizer_state = self.optimizer.step(
                self.launch_models, gradients, self.optimizer_state
            )
            loss_sum += losses.detach().to(torch.float64)
            norm = torch.linalg.vector_norm(gradients, dim=1).to(torch.float64)
        return loss_sum, norm

    def _tasks(self, draw: int) -> TaskBatch:
        """The tasks of one outer step: prefetched, or drawn now (the same draws either way)."""
        if self._prefetched is not None and self._prefetched[0] == draw:
            tasks = self._prefetched[1]
        else:
            context = self.context
            tasks = context.task.sample(
                context.agents, draw, context.config.learner.tasks_per_agent
            )
        self._prefetched = None
        return tasks

    def prefetch(self, t: int) -> None:
        """Draw round t's first tasks now: work for the CPU while rows travel between ranks
        (not where the draws are part of a compiled program)."""
        if t > self.context.config.iterations or self._compiled is not None:
            return
        draw = task_draw(t, self.steps(), 0)
        self._prefetched = (draw, self._tasks(draw))


class MetaLearning(Algorithm):
    """Agents that each train their launch model with `LocalTraining`; subclasses combine."""

    fixed_shapes = True
    adapt_first = True  # ATC's order: eq. (6a), then (6b)

    def __init__(self, context: Context, plan: Any, initial_models: torch.Tensor) -> None:
        self.context = context
        self.plan_ = plan
        self.training = LocalTraining(context, initial_models)
        self.model_bytes = initial_models.shape[1] * initial_models.element_size()

    def state_rows(self) -> dict[str, torch.Tensor]:
        return self.training.rows()

    def load_state(self, rows: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]) -> None:
        self.training.load(rows)

    def models(self) -> torch.Tensor:
        return self.training.launch_models

    def compile_training(self, compiler: Callable[[Callable], Any]) -> Any | None:
        return self.training.compile(compiler)

    def rounds_in_place(
        self, combine: Callable[[torch.Tensor], torch.Tensor]
    ) -> Callable[[torch.Tensor], RoundReport]:
        """`device_round` of a subclass whose combination `combine` (launch models -> combined
        models, eq. 6b) is device work alone: the round of `round`, the new launch models
        copied into the old ones' memory, nothing sent."""

        def device_round(t: torch.Tensor) -> RoundReport:
            training = self.training
            models = training.launch_models
            try:
                if not self.adapt_first:
                    training.launch_models = combine(training.launch_models)
                loss_sum, norm = training.adapt(t)
                if self.adapt_first:
                    training.launch_models = combine(training.launch_models)
                models.copy_(training.launch_models)
            finally:  # also after a failed capture, which ran nothing
                training.launch_models = models
            return RoundReport(loss_sum, training.steps(), norm, torch.zeros_like(loss_sum))

        return device_round


class Diffusion(MetaLearning):
    """The diffusion family over a graph schedule; subclasses choose the order."""

    @classmethod
    def plan(cls, config: Config, layout: AgentLayout) -> GraphPlan:
        return plan_graph(config)

    def __init__(self, context: Context, plan: GraphPlan, initial_models: torch.Tensor) -> None:
        super().__init__(context, plan, initial_models)
        self.route: Any = None
        self.weights: torch.Tensor | None = None

    def centroid_weights(self) -> torch.Tensor | None:
        if self.plan_.perron is None:
            return None
        agents = self.context.agents.cpu().numpy()
        return torch.as_tensor(self.plan_.perron[agents], device=self.context.device)

    def round(self, t: int) -> RoundReport:
        timer = CommTimer(self.context.device)
        comm_bytes = torch.zeros(len(self.context.agents), dtype=torch.float64)
        if not self.adapt_first:
            comm_bytes += self._combine(t, timer)
        loss_sum, norm = self.training.adapt(t)
        if self.adapt_first:
            comm_bytes += self._combine(t, timer)
        steps = self.training.steps()
        return RoundReport(loss_sum, steps, norm, comm_bytes.to(loss_sum.device), timer.seconds)

    def _combine(self, t: int, timer: CommTimer) -> torch.Tensor:
        """Eq. (6b) on the launch models; returns the bytes each agent's row was sent."""
        exchange = self.context.exchange
        models = self.training.launch_models
        if self.route is None or not self.plan_.schedule.static:
            self._route(t, models)
        with timer:
            pending = exchange.start_mix(models, self.route, self.weights)
        # While the rows travel, the next adapt step's tasks are drawn (ATC: round t + 1's).
        self.training.prefetch(t + 1 if self.adapt_first else t)
        with timer, torch.no_grad():
            self.training.launch_models = pending.wait()
        return torch.as_tensor(self.route.sends_per_agent * self.model_bytes)

    def _route(self, t: int, models: torch.Tensor) -> None:
        """The route and weights of round t's matrix. A collective call on MPI when the
        rank-level support changes (every rank alike)."""
        sources, destinations, weights = self.plan_.edges_at(t)
        self.route = self.context.exchange.route(sources, destinations)
        self.weights = self.route.weights(weights, models)

    def device_round(self) -> Callable[[torch.Tensor], RoundReport] | None:
        """A static graph within one process: the mix is an index and a segment sum
        (`exchange.indexed_mix`, which a CUDA graph captures and torch.compile traces), its
        route built here, before any capture or compilation."""
        if self.context.exchange.size != 1 or not self.plan_.schedule.static:
            return None
        if self.route is None:
            self._route(1, self.training.launch_models)

        def combine(models: torch.Tensor) -> torch.Tensor:
            route = self.route
            with torch.no_grad():
                return indexed_mix(models, route.slots, route.targets, self.weights, len(models))

        return self.rounds_in_place(combine)

    @classmethod
    def topology(cls, plan: GraphPlan) -> TopologyRecord:
        sources, destinations, weights = plan.edges_at(1)
        report = plan.report
        attributes = {
            "num_agents": report.num_agents,
            "lambda2": plan.lambda2,
            "lambda2_method": plan.lambda2_method,
            "doubly_stochastic": report.doubly_stochastic,
            "schedule": plan.schedule.name,
            "centroid": "uniform" if plan.perron is None else "perron",
            "description": "edges l -> k with weight a[l, k], the weight agent k gives agent l; "
            "the weights into each k sum to one (eq. 6b); round 1's graph when time-varying",
        }
        return TopologyRecord(np.stack([sources, destinations], axis=1), weights, attributes)


class ATC(Diffusion):
    """Adapt-then-Combine: Algorithm 1 (eq. 6a, then 6b)."""


class CTA(Diffusion):
    """Combine-then-Adapt: eq. (6b) on the launch models, then eq. (6a)."""

    adapt_first = False
