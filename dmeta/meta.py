"""Meta-gradients (eq. 4 and its relatives), vectorized over the agents of a rank and their tasks.

Pure tensor maths: no MPI, no files. Parameters are flat vectors (see dmeta.models); every
function here is written for one agent and one task and lifted with `torch.func.vmap`, so the
agents of a rank form a batch dimension rather than a Python loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, grad_and_value, vmap

from dmeta.tasks import TaskBatch

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MAML:
    """The MAML family: MAML (second order, eq. 3-4), FO-MAML, ANIL, FO-ANIL, Meta-SGD and ARM.

    Second order differentiates through the inner updates, giving
    (I - alpha H(w; X_in)) grad Q(w'; X_o) for one step; first order drops the Jacobian of the
    inner updates and uses grad Q(w'; X_o) alone. `inner_mask` [M] restricts the inner updates
    to some parameters (ANIL: the head). With `learned_inner_lr` (Meta-SGD) the launch model is
    theta = [w, a] in R^{2M}, the inner update w - a * grad Q(w; X_in) uses the per-parameter
    step sizes a, and a is meta-learned (and combined) with w. `inner_steps = 0` is ARM: the
    plain risk gradient grad Q(w; X_o).
    """

    def __init__(
        self,
        forward: Forward,
        loss: Loss,
        inner_lr: float,
        inner_steps: int,
        first_order: bool,
        inner_mask: torch.Tensor | None = None,
        learned_inner_lr: bool = False,
        agents_at_once: int = 0,
    ) -> None:
        self.forward = forward
        self.loss = loss
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.inner_mask = inner_mask
        self.learned_inner_lr = learned_inner_lr
        # Meta-gradients and evaluations of this many agents at a time (0: all): each agent's
        # row is computed alone either way, so chunks change memory and speed, not numbers.
        self.agents_at_once = agents_at_once

    def _chunk(self, count: int) -> int | None:
        """vmap's chunk size for `count` agents: equal chunks of at most `agents_at_once` (a
        short last chunk would cost a chunk's fixed overhead for few agents); None for one."""
        if not self.agents_at_once or count <= self.agents_at_once:
            return None
        pieces = -(-count // self.agents_at_once)
        return -(-count // pieces)

    def plain(self) -> MAML:
        """The gradient of the plain loss, grad Q(w; X_o) (ARM: no inner step), on this
        learner's network and loss, e.g. for FedAvg's client steps."""
        return MAML(self.forward, self.loss, 0.0, 0, False, agents_at_once=self.agents_at_once)

    def initial_state(self, launch_models: torch.Tensor) -> torch.Tensor:
        """The learner's launch rows from the models' [agents, M]: Meta-SGD appends its step
        sizes, all equal to inner_lr; every other learner uses the models as they are."""
        if not self.learned_inner_lr:
            return launch_models
        return torch.cat([launch_models, torch.full_like(launch_models, self.inner_lr)], dim=1)

    def _split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(model w, inner step size: a learned vector or the scalar inner_lr)."""
        if self.learned_inner_lr:
            half = theta.shape[-1] // 2
            return theta[:half], theta[half:]
        return theta, self.inner_lr

    def _support_loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.forward(w, x), y)

    def adapt(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int
    ) -> torch.Tensor:
        """Task-specific model w - alpha grad Q(w; X_in), repeated `steps` times (Alg. 1, l. 6)."""
        w, step = self._split(theta)
        if self.inner_mask is not None:
            step = step * self.inner_mask.to(w)
        # w + (-alpha) g is w - alpha g to the bit, and its backward needs no negation of the
        # [agents, tasks, M] gradient (a pass over memory per second-order step).
        descent = -step
        for _ in range(steps):
            w = w + descent * grad(self._support_loss)(w, x, y)
        return w

    def task_loss(
        self,
        theta: torch.Tensor,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
    ) -> torch.Tensor:
        """Q(w'; X_o) for one task, w' the adapted model; its gradient in w is eq. (4)'s term."""
        adapted = self.adapt(theta, support_x, support_y, self.inner_steps)
        if self.first_order:
            # Same value as `adapted`, but with the identity as its Jacobian in w: the gradient
            # becomes grad Q(w'; X_o) evaluated at w'.
            w, _ = self._split(theta)
            adapted = w + (adapted - w).detach()
        return self.loss(self.forward(adapted, query_x), query_y)

    def agent_meta_loss(self, theta: torch.Tensor, tasks: TaskBatch) -> torch.Tensor:
        """(1/|S_k|) sum over tasks of Q(w'; X_o), for one agent's tasks [tasks, shots, ...]."""
        return vmap(self.task_loss, in_dims=(None, 0, 0, 0, 0))(theta, *tasks).mean()

    def meta_gradients(
        self, launch_models: torch.Tensor, tasks: TaskBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stochastic meta-gradients of eq. (4) and meta-training losses, one row per agent.

        launch_models: [agents, P]; tasks: [agents, tasks, shots, ...].
        Returns gradients [agents, P] and losses [agents].
        """
        chunk = self._chunk(len(launch_models))
        return vmap(grad_and_value(self.agent_meta_loss), chunk_size=chunk)(launch_models, tasks)

    def evaluate(
        self,
        launch_models: torch.Tensor,
        tasks: TaskBatch,
        steps: int,
        scores: tuple[Loss, ...] = (),
        tasks_at_once: int = 0,
    ) -> torch.Tensor:
        """Query loss and `scores` after `steps` inner steps on each support set.

        The same tasks [tasks, shots, ...] for every agent (validation, meta-test). Returns
        [agents, tasks, 1 + len(scores)]: the loss, then each score(prediction, target).
        `tasks_at_once` > 0 adapts that many tasks at a time, bounding memory.
        """
        return self._scores(launch_models, tasks, False, steps, scores, tasks_at_once)

    def evaluate_own(
        self,
        launch_models: torch.Tensor,
        tasks: TaskBatch,
        steps: int,
        scores: tuple[Loss, ...] = (),
        tasks_at_once: int = 0,
    ) -> torch.Tensor:
        """`evaluate` of each agent's model on its own tasks [agents, tasks, shots, ...]:
        returns [agents, tasks, 1 + len(scores)]."""
        return self._scores(launch_models, tasks, True, steps, scores, tasks_at_once)

    def _scores(
        self,
        launch_models: torch.Tensor,
        tasks: TaskBatch,
        own: bool,
        steps: int,
        scores: tuple[Loss, ...],
        tasks_at_once: int,
    ) -> torch.Tensor:
        """[agents, tasks, 1 + len(scores)] of `evaluate` (tasks shared by every agent) or of
        `evaluate_own` (`own`: a leading agent dimension), the agents one vmapped batch."""

        def one_task(
            theta: torch.Tensor,
            sx: torch.Tensor,
            sy: torch.Tensor,
            qx: torch.Tensor,
            qy: torch.Tensor,
        ) -> torch.Tensor:
            prediction = self.forward(self.adapt(theta, sx, sy, steps), qx)
            return torch.stack([measure(prediction, qy) for measure in (self.loss, *scores)])

        def one_agent(theta: torch.Tensor, agent_tasks: TaskBatch) -> torch.Tensor:
            return vmap(one_task, in_dims=(None, 0, 0, 0, 0), chunk_size=tasks_at_once or None)(
                theta, *agent_tasks
            )

        chunk = self._chunk(len(launch_models))
        in_dims = (0, 0 if own else None)
        return vmap(one_agent, in_dims=in_dims, chunk_size=chunk)(launch_models, tasks)


class Reptile(MAML):
    """Reptile (Nichol et al.): the meta-direction is where SGD on a task's data leads.

    With w' after `inner_steps` SGD steps of size alpha on the task's support and query data,
    the direction is g = (w - w') / (alpha inner_steps): the mean gradient along the inner path,
    on the scale of the other learners' gradients, so outer step sizes are comparable. The
    reported loss is the query loss after adaptation on the support set alone.
    """

    def __init__(
        self,
        forward: Forward,
        loss: Loss,
        inner_lr: float,
        inner_steps: int,
        agents_at_once: int = 0,
    ) -> None:
        super().__init__(
            forward, loss, inner_lr, inner_steps, first_order=True, agents_at_once=agents_at_once
        )

    def task_direction(
        self,
        theta: torch.Tensor,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, query loss after adapting on the support set) for one task."""
        x = torch.cat([support_x, query_x])
        y = torch.cat([support_y, query_y])
        travelled = self.adapt(theta, x, y, self.inner_steps)
        direction = (theta - travelled) / (self.inner_lr * self.inner_steps)
        adapted = self.adapt(theta, support_x, support_y, self.inner_steps)
        return direction, self.loss(self.forward(adapted, query_x), query_y)

    def meta_gradients(
        self, launch_models: torch.Tensor, tasks: TaskBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def one_agent(theta: torch.Tensor, agent_tasks: TaskBatch):
            directions, losses = vmap(self.task_direction, in_dims=(None, 0, 0, 0, 0))(
                theta, *agent_tasks
            )
            return directions.mean(dim=0), losses.mean()

        return vmap(one_agent, chunk_size=self._chunk(len(launch_models)))(launch_models, tasks)
