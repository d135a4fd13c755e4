"""MAML meta-gradients (eq. 4), vectorized over the agents of a rank and their tasks.

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
    """MAML (second order, eq. 3-4) or first-order MAML with any number of inner steps.

    Second order differentiates through the inner updates, giving
    (I - alpha H(w; X_in)) grad Q(w'; X_o) for one step; first order drops the Jacobian of the
    inner updates and uses grad Q(w'; X_o) alone.
    """

    def __init__(
        self, forward: Forward, loss: Loss, inner_lr: float, inner_steps: int, first_order: bool
    ) -> None:
        self.forward = forward
        self.loss = loss
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order

    def _support_loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.forward(w, x), y)

    def adapt(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
        """Task-specific model w - alpha grad Q(w; X_in), repeated `steps` times (Alg. 1, l. 6)."""
        for _ in range(steps):
            w = w - self.inner_lr * grad(self._support_loss)(w, x, y)
        return w

    def task_loss(
        self,
        w: torch.Tensor,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
    ) -> torch.Tensor:
        """Q(w'; X_o) for one task, w' the adapted model; its gradient in w is eq. (4)'s term."""
        adapted = self.adapt(w, support_x, support_y, self.inner_steps)
        if self.first_order:
            # Same value as `adapted`, but with the identity as its Jacobian in w: the gradient
            # becomes grad Q(w'; X_o) evaluated at w'.
            adapted = w + (adapted - w).detach()
        return self.loss(self.forward(adapted, query_x), query_y)

    def agent_meta_loss(self, w: torch.Tensor, tasks: TaskBatch) -> torch.Tensor:
        """(1/|S_k|) sum over tasks of Q(w'; X_o), for one agent's tasks [tasks, shots, ...]."""
        return vmap(self.task_loss, in_dims=(None, 0, 0, 0, 0))(w, *tasks).mean()

    def meta_gradients(
        self, launch_models: torch.Tensor, tasks: TaskBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stochastic meta-gradients of eq. (4) and meta-training losses, one row per agent.

        launch_models: [agents, M]; tasks: [agents, tasks, shots, ...].
        Returns gradients [agents, M] and losses [agents].
        """
        return vmap(grad_and_value(self.agent_meta_loss))(launch_models, tasks)

    def adapted_losses(
        self, launch_models: torch.Tensor, tasks: TaskBatch, steps: int
    ) -> torch.Tensor:
        """Mean query loss after `steps` inner steps on each support set, per agent: [agents].

        The same tasks [tasks, shots, ...] for every agent (validation).
        """

        def one_task(
            w: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor
        ) -> torch.Tensor:
            return self.loss(self.forward(self.adapt(w, sx, sy, steps), qx), qy)

        def one_agent(w: torch.Tensor) -> torch.Tensor:
            return vmap(one_task, in_dims=(None, 0, 0, 0, 0))(w, *tasks).mean()

        return vmap(one_agent)(launch_models)
