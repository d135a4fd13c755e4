"""The centralized baseline: every agent takes the network average (A = (1/K) 1 1^T)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dmeta.algorithms.base import CommTimer, RoundReport, TopologyRecord
from dmeta.algorithms.diffusion import MetaLearning
from dmeta.config import Config
from dmeta.exchange import AgentLayout


class Centralized(MetaLearning):
    """Eq. (6a), then the all-reduce average of the launch models; no K x K matrix."""

    @classmethod
    def plan(cls, config: Config, layout: AgentLayout) -> int:
        return config.agents

    def round(self, t: int) -> RoundReport:
        loss_sum, norm = self.training.adapt(t)
        exchange = self.context.exchange
        timer = CommTimer(self.context.device)
        models = self.training.launch_models
        with timer, torch.no_grad():
            # All ranks synchronise here: one all-reduce of the local model sums.
            average = exchange.allreduce_sum(models.sum(dim=0)) / self.context.config.agents
            self.training.launch_models = average.expand_as(models).clone()
        # A bandwidth-optimal all-reduce sends 2 (P - 1) / P model sums per rank, shared here
        # evenly by the rank's agents.
        share = 2 * (exchange.size - 1) / exchange.size * self.model_bytes / exchange.num_local
        steps = self.training.steps()
        return RoundReport(loss_sum, steps, norm, torch.full_like(loss_sum, share), timer.seconds)

    def device_round(self) -> Callable[[torch.Tensor], RoundReport] | None:
        """Within one process the all-reduce is the sum over the rank's rows."""
        if self.context.exchange.size != 1:
            return None
        agents = self.context.config.agents
        return self.rounds_in_place(lambda models: (models.sum(dim=0) / agents).expand_as(models))

    @classmethod
    def topology(cls, plan: int) -> TopologyRecord:
        attributes = {
            "num_agents": plan,
            "lambda2": 0.0,
            "lambda2_method": "A = J/K",
            "doubly_stochastic": True,
            "schedule": "static",
            "description": "A = (1/K) 1 1^T by all-reduce; its K^2 edges are not stored",
        }
        return TopologyRecord(np.zeros((0, 2), dtype=np.int64), np.zeros(0), attributes)
