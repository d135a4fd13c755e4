"""What an algorithm is to the engine: declared state, one round, models to evaluate.

An algorithm is one module holding a subclass of `Algorithm`, registered by strategy name in
`dmeta.algorithms`. It declares
- `plan(config, layout)`: everything that can fail on bad input (graph, weights), checked
  without communicating, so the entry point agrees on errors before any collective starts;
- its per-agent state (`state_rows`: named tensors with one row per local agent, e.g. launch
  models, optimizer moments and step counts) and shared state (`state_shared`), which the
  engine checkpoints by agent id and puts back with `load_state`;
- `round(t)`: the local computation of round t and its calls to the exchange;
- `models()`: the launch models the engine evaluates and stores (`shared_model`: all one
  model, evaluated and stored once, never copied per agent), adapted with
  `evaluation_steps` inner steps;
- `series` (or `row_series(plan)`, when they depend on the config) and `row_values()`: extra
  row-wise series it logs;
- `topology()`: what the run file records of its communication graph.
The engine owns the loop, logging, evaluation, checkpoints and signals, and knows no names.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from dmeta.config import Config, OptimizerConfig
from dmeta.exchange import AgentLayout, Exchange
from dmeta.meta import MAML
from dmeta.optim import SGD, Adam, RowOptimizer
from dmeta.output import Columns
from dmeta.tasks import TaskFamily


@dataclass
class Context:
    """What a running algorithm is handed: its config, task, learner and exchange."""

    config: Config
    task: TaskFamily
    learner: MAML
    exchange: Exchange
    agents: torch.Tensor  # global ids of this rank's agents
    device: torch.device
    dtype: torch.dtype
    # The learner's meta-gradients of the training step, possibly compiled.
    meta_gradients: Any = None
    # Parameters of the model that no step moves (a frozen embedding), per model row.
    frozen_parameters: int = 0


@dataclass
class TopologyRecord:
    """The communication graph as the run file stores it: edges l -> k with weight a[l, k]."""

    edges: np.ndarray  # [E, 2] int64: (l, k)
    weights: np.ndarray  # [E] float64
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundReport:
    """What one round did, for the metrics window: per local agent, and rank 0's clock."""

    loss_sum: torch.Tensor  # [agents]: meta-training losses summed over the round's steps
    steps: int  # outer steps in the round
    gradient_norm: torch.Tensor  # [agents]: norm of the last meta-gradient
    comm_bytes: torch.Tensor  # [agents]: bytes sent to other ranks on the agent's behalf
    comm_seconds: float = 0.0


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU, so that host clocks time it; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CommTimer:
    """Seconds spent in communication; GPU work queued before is waited for first."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> CommTimer:
        synchronize(self.device)  # host clocks must not time queued GPU work as communication
        self._began = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._began


def task_draw(t: int, steps: int, step: int) -> int:
    """The task draw of local step `step` (0-based) of `steps` in round t: draws are numbered
    by outer step, so one step a round draws round t's tasks (Algorithm 1)."""
    return (t - 1) * steps + step + 1


def build_optimizer(settings: OptimizerConfig) -> RowOptimizer:
    """The outer optimizer `optimizer.name` of eq. (6a), one state row per agent."""
    if settings.name == "sgd":
        return SGD(settings.lr, settings.weight_decay)
    return Adam(settings.lr, settings.beta1, settings.beta2, settings.eps, settings.weight_decay)


class Algorithm(ABC):
    """A strategy: state declared by name, one `round` at a time (see the module docstring)."""

    # Extra row-wise series: path -> (one value per agent?, units, meaning).
    series: ClassVar[dict[str, tuple[bool, str, str]]] = {}
    # Config sections only this family reads (`dmeta config` hides them from other runs).
    config_sections: ClassVar[tuple[str, ...]] = ()
    # Every agent's launch model is one model (a server's): the engine evaluates it once.
    shared_model: ClassVar[bool] = False
    # Every round calls the training step on all local agents (the same shapes each round), so
    # a compiled step compiles once; runtime.compile = "auto" compiles only such algorithms.
    fixed_shapes: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def plan(cls, config: Config, layout: AgentLayout) -> Any:
        """Check the strategy's inputs (DmetaError on bad input) without communicating."""

    @abstractmethod
    def __init__(self, context: Context, plan: Any, initial_models: torch.Tensor) -> None:
        """Start from `initial_models` [agents, P] (the learner's launch rows); a
        `shared_model` algorithm gets agent 0's row alone [1, P], the same on every rank."""

    @abstractmethod
    def state_rows(self) -> dict[str, torch.Tensor]:
        """Per-agent state: name -> [local agents, ...]."""

    def state_shared(self) -> dict[str, torch.Tensor]:
        """State common to all agents (e.g. a server model); none by default."""
        return {}

    @abstractmethod
    def load_state(self, rows: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]) -> None:
        """Continue from state saved by `state_rows` and `state_shared`."""

    @abstractmethod
    def round(self, t: int) -> RoundReport:
        """Round t >= 1: local computation and exchange."""

    @abstractmethod
    def models(self) -> torch.Tensor:
        """The launch models to evaluate and store: [local agents, P]."""

    def device_round(self) -> Callable[[torch.Tensor], RoundReport] | None:
        """`round` as device work alone, for capture in a CUDA graph (`dmeta.cudagraph`) or
        compilation as one program on the CPU (`engine.CompiledRounds`): a call takes t as a
        0-d int64 tensor on the device, updates the state in the tensors that `state_rows`
        gives (so that a replay reads and writes the same memory), and neither reads a value
        back to the host nor communicates. None (the default) where a round cannot be that:
        rows sent between ranks, a graph that changes, shapes that vary."""
        return None

    def compile_training(self, compiler: Callable[[Callable], Any]) -> Any | None:
        """Where a round's local training (task draws, meta-gradients, outer steps) can run
        as one compiled program of fixed shapes, wrap it with `compiler` (the engine's
        torch.compile) and return what `compiler` made; None (the default) where it cannot:
        the engine then compiles the meta-gradients alone (`Context.meta_gradients`)."""
        return None

    def centroid_weights(self) -> torch.Tensor | None:
        """p_k of this rank's agents in the network centroid w_c = sum_k p_k w_k: the Perron
        vector of A when A is not doubly stochastic (Dif-MAML, eq. (18)); None for 1/K."""
        return None

    def evaluation_steps(self, steps: int) -> int:
        """Inner steps that adapt a model at evaluation (validation, test), given the
        configured ones; those by default."""
        return steps

    def row_values(self) -> dict[str, torch.Tensor | float]:
        """Values of `row_series` at a logged row; none by default."""
        return {}

    @classmethod
    def row_series(cls, plan: Any) -> dict[str, tuple[bool | Columns, str, str]]:
        """The extra row-wise series of a run with `plan`: `series` by default; an algorithm
        whose series depend on the config (e.g. one per histogram bin) or have a width given by
        its graph (`Columns`) builds them here."""
        return cls.series

    @classmethod
    def topology(cls, plan: Any) -> TopologyRecord | None:
        """The graph the run file records (None: no graph, e.g. an all-reduce)."""
        return None
