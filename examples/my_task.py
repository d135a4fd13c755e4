"""A task family of one's own, outside dmeta: noisy quadratic regression.

Task: y = a x^2 + b x + c + noise, x uniform on [-x_max, x_max]. Agent k draws its curvature a
from the k-th of K equal intervals of [-curvature, curvature] (heterogeneous agents, as in the
paper's sine experiment), b and c uniformly from [-offset, offset]. The validation tasks draw a
from the whole range.

Run it from the repository root (the working folder is searched for `examples.my_task`):

    .venv/bin/dmeta run examples/my_task.toml
    .venv/bin/dmeta run examples/my_task.toml --set problem_options.model=quadratic \
        --set learner.inner_lr=0.05 --out runs/my_task_quadratic.h5

The job names this class by its import path, `problem = "examples.my_task:QuadraticTask"`, and
sets the fields of `QuadraticTask.Options` in its [problem_options] table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dmeta import rng
from dmeta.config import ModelConfig, ValidationConfig
from dmeta.errors import DmetaError
from dmeta.models import FlatModel, build_mlp
from dmeta.tasks import TaskBatch, TaskFamily


class QuadraticModel(nn.Module):
    """y = w2 x^2 + w1 x + w0: a linear layer on the features (x^2, x). Any torch.nn.Module
    works whose state is its parameters alone and whose forward maps one task's inputs
    [shots, 1] to predictions [shots, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([x * x, x], dim=-1))


def mean_absolute_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction - target).abs().mean()


class QuadraticTask(TaskFamily):
    """Noisy quadratic regression, one input and one output."""

    @dataclass
    class Options:
        """The keys of [problem_options], typed and checked like every config key."""

        curvature: float = 1.0
        offset: float = 1.0
        # Agent k draws a from the k-th of K equal intervals of [-curvature, curvature].
        split_curvature: bool = True
        x_max: float = 2.0
        # Standard deviation of the Gaussian noise added to every target.
        noise_std: float = 0.1
        support_shots: int = 10
        query_shots: int = 10
        # mlp: dmeta's fully connected network ([model] hidden, activation);
        # quadratic: QuadraticModel above (three parameters; its inner steps need a larger
        # learner.inner_lr, e.g. 0.05).
        model: Literal["mlp", "quadratic"] = "mlp"

    # Extra validation measures, logged as /metrics/val_mae and /centroid/val_mae.
    scores = {"mae": mean_absolute_error}

    @classmethod
    def check_options(cls, options: Options) -> None:
        for key in ("curvature", "offset", "noise_std"):
            if getattr(options, key) < 0:
                raise DmetaError(
                    f"problem_options.{key} = {getattr(options, key)} must not be negative"
                )
        if options.x_max <= 0:
            raise DmetaError(f"problem_options.x_max = {options.x_max} must be positive")
        for key in ("support_shots", "query_shots"):
            if getattr(options, key) < 1:
                raise DmetaError(f"problem_options.{key} = {getattr(options, key)} must be >= 1")

    def _curvature_bounds(self, keys: torch.Tensor, split: bool) -> tuple[torch.Tensor, ...]:
        """Each agent's interval of a: [A] lower and upper bounds."""
        curvature = self.config.curvature
        low = torch.full((len(keys),), -curvature, dtype=self.dtype, device=self.device)
        if not split:
            return low, -low
        width = 2 * curvature / self.num_agents
        start = low + width * keys.to(self.dtype)
        return start, start + width

    def _draw(
        self,
        keys: torch.Tensor,
        stream: int,
        iteration: int,
        tasks: int,
        support: int,
        query: int,
        split: bool,
    ) -> TaskBatch:
        """[len(keys), tasks, shots, 1] tasks, a function of (seed, key, stream, iteration)."""
        options = self.config
        shots = support + query
        # One uniform draw holds a, b, c and every x; the noise comes from a part of its own.
        unit = rng.uniform(self.seed, keys, stream, iteration, (tasks, 3 + shots), dtype=self.dtype)
        low, high = self._curvature_bounds(keys, split)
        a = low[:, None] + (high - low)[:, None] * unit[..., 0]  # [A, tasks]
        b, c = (options.offset * (2 * unit[..., 1:3] - 1)).unbind(-1)
        x = options.x_max * (2 * unit[..., 3:] - 1)  # [A, tasks, shots]
        noise = rng.normal(
            self.seed, keys, rng.substream(stream, 1), iteration, (tasks, shots), self.dtype
        )
        y = a[..., None] * x**2 + b[..., None] * x + c[..., None] + options.noise_std * noise
        x, y = x[..., None], y[..., None]  # [A, tasks, shots, 1]
        return TaskBatch(x[:, :, :support], y[:, :, :support], x[:, :, support:], y[:, :, support:])

    def sample(
        self, agents: torch.Tensor, iteration: int, tasks: int, stream: int = rng.STREAM_TASKS
    ) -> TaskBatch:
        options = self.config
        return self._draw(
            agents,
            stream,
            iteration,
            tasks,
            options.support_shots,
            options.query_shots,
            options.split_curvature,
        )

    def validation_set(self, config: ValidationConfig) -> TaskBatch:
        key = torch.zeros(1, dtype=torch.int64, device=self.device)
        batch = self._draw(
            key,
            rng.STREAM_VALIDATION,
            0,
            config.tasks,
            config.support_shots,
            config.query_shots,
            split=False,
        )
        return TaskBatch(*(part[0] for part in batch))  # [tasks, shots, 1]

    def build_model(self, config: ModelConfig) -> FlatModel:
        if self.config.model == "quadratic":
            return FlatModel(QuadraticModel())
        return build_mlp(config, in_features=1, out_features=1)
