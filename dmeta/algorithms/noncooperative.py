"""The non-cooperative baseline: every agent runs MAML alone (A = I, no communication)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dmeta.algorithms.base import RoundReport, TopologyRecord
from dmeta.algorithms.diffusion import MetaLearning
from dmeta.config import Config
from dmeta.exchange import AgentLayout


class NonCooperative(MetaLearning):
    """Eq. (6a) only: the combination step with A = I is skipped, nothing is sent."""

    @classmethod
    def plan(cls, config: Config, layout: AgentLayout) -> int:
        return config.agents

    def round(self, t: int) -> RoundReport:
        loss_sum, norm = self.training.adapt(t)
        return RoundReport(loss_sum, self.training.steps(), norm, torch.zeros_like(loss_sum))

    def device_round(self) -> Callable[[torch.Tensor], RoundReport]:
        return self.rounds_in_place(lambda models: models)

    @classmethod
    def topology(cls, plan: int) -> TopologyRecord:
        agents = np.arange(plan, dtype=np.int64)
        attributes = {
            "num_agents": plan,
            "lambda2": 1.0,
            "lambda2_method": "A = I",
            "doubly_stochastic": True,
            "schedule": "static",
            "description": "A = I: each agent keeps its own model (self-loops of weight one)",
        }
        return TopologyRecord(np.stack([agents, agents], axis=1), np.ones(plan), attributes)
