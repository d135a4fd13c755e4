"""Task distributions: per-agent batches of few-shot tasks, drawn with counter-based randomness."""

from __future__ import annotations

from typing import NamedTuple

import torch

from dmeta import rng
from dmeta.config import SineTaskConfig, ValidationConfig


class TaskBatch(NamedTuple):
    """Support (X_in) and query (X_o) sets of eq. (4), drawn independently.

    Shapes: [..., tasks, shots, features], with any leading batch dimensions (e.g. agents).
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


def mse_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Q(w; X): the mean squared error over the samples of one batch."""
    return ((prediction - target) ** 2).mean()


class SineTask:
    """y = A sin(x - phase) with agent k's amplitudes from the k-th of K equal intervals.

    Paper, Sec. IV-A: the amplitude range [0.1, 5.0] is split evenly over K agents, the phase
    is uniform on [0, pi] for every agent and x is uniform on [-5, 5].
    """

    in_features = 1
    out_features = 1
    loss = staticmethod(mse_loss)

    def __init__(
        self,
        config: SineTaskConfig,
        num_agents: int,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.config = config
        self.num_agents = num_agents
        self.seed = seed
        self.dtype = dtype
        self.device = device

    def _amplitude_bounds(self, agents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.config.amplitude_min, self.config.amplitude_max
        if not self.config.split_amplitude:
            ones = torch.ones(len(agents), dtype=self.dtype, device=self.device)
            return low * ones, high * ones
        width = (high - low) / self.num_agents
        start = low + width * agents.to(self.dtype)
        return start, start + width

    def _draw(
        self,
        key_agents: torch.Tensor,
        stream: int,
        iteration: int,
        tasks: int,
        support_shots: int,
        query_shots: int,
        amplitude_low: torch.Tensor,
        amplitude_high: torch.Tensor,
    ) -> TaskBatch:
        """One keyed draw of [len(key_agents), tasks] sine tasks with their support and query."""
        c = self.config
        shots = support_shots + query_shots
        # One draw per call holds every number: amplitude, phase, then the x of each shot.
        unit = rng.uniform(
            self.seed, key_agents, stream, iteration, (tasks, 2 + shots), dtype=self.dtype
        )
        amplitude = (
            amplitude_low[:, None] + (amplitude_high - amplitude_low)[:, None] * unit[..., 0]
        )
        phase = c.phase_min + (c.phase_max - c.phase_min) * unit[..., 1]
        x = c.x_min + (c.x_max - c.x_min) * unit[..., 2:]
        y = amplitude[..., None] * torch.sin(x - phase[..., None])
        x, y = x[..., None], y[..., None]
        return TaskBatch(
            x[:, :, :support_shots],
            y[:, :, :support_shots],
            x[:, :, support_shots:],
            y[:, :, support_shots:],
        )

    def sample(
        self, agents: torch.Tensor, iteration: int, tasks: int, stream: int = rng.STREAM_TASKS
    ) -> TaskBatch:
        """The tasks S_{k,i} of Algorithm 1 for each agent: shapes [agents, tasks, shots, 1].

        Another `stream` gives an independent family of tasks from the same distributions.
        """
        low, high = self._amplitude_bounds(agents)
        return self._draw(
            agents,
            stream,
            iteration,
            tasks,
            self.config.support_shots,
            self.config.query_shots,
            low,
            high,
        )

    def validation_set(self, config: ValidationConfig) -> TaskBatch:
        """Fixed validation tasks from the whole amplitude and phase range: [tasks, shots, 1]."""
        key = torch.zeros(1, dtype=torch.int64, device=self.device)
        low = torch.full((1,), self.config.amplitude_min, dtype=self.dtype, device=self.device)
        high = torch.full((1,), self.config.amplitude_max, dtype=self.dtype, device=self.device)
        batch = self._draw(
            key,
            rng.STREAM_VALIDATION,
            0,
            config.tasks,
            config.support_shots,
            config.query_shots,
            low,
            high,
        )
        return TaskBatch(*(part[0] for part in batch))
