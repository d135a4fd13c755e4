"""Task distributions: per-agent batches of few-shot tasks, drawn with counter-based randomness."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from dmeta import linrep, rng
from dmeta.config import LinearTaskConfig, ModelConfig, ValidationConfig
from dmeta.models import FlatModel, build_mlp


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


def score_series(scores: dict[str, Any]) -> dict[str, tuple[bool, str, str]]:
    """The run-file series of validation scores (`TaskFamily.scores`), for those a family does
    not describe in its own `series`: /metrics/val_<name> [T, K] and /centroid/val_<name> [T]."""
    series = {}
    for name in scores:
        meaning = f"validation {name} after adaptation on the fixed validation tasks"
        series[f"metrics/val_{name}"] = (True, "score units", meaning)
        series[f"centroid/val_{name}"] = (False, "score units", f"{meaning}, of the centroid")
    return series


class TaskFamily(ABC):
    """The interface of a task family: what the engine asks of one, with the defaults of a plain
    regression family. The built-in families (`SineTask` below, the linear-representation,
    few-shot and federated ones) and a family of your own (`problem = "package.module:Class"`,
    see the README's "Your own task family" and examples/my_task.py) all derive from it.

    A subclass must implement `sample`, `validation_set` and `build_model`; every other method
    and attribute has a default. Shapes: a task has `shots` examples, each input `[...in]` and
    target `[...out]` of any shape the model and loss accept (a regression with one input and
    one output: [shots, 1] and [shots, 1]). The engine lifts the model and loss over agents and
    tasks with `torch.func.vmap`, so they are written for one task.

    `own_validation_set` (optional) gives each agent validation tasks of its own distribution,
    which `validation.own_tasks = true` scores it on instead of the shared `validation_set`.
    `series` lists extra row-wise datasets (path -> (per agent?, units, meaning)) whose values
    `row_metrics` returns, `scores` extra validation measures (name -> score(prediction,
    target), a scalar per task) logged as /metrics/val_<name> and /centroid/val_<name> (their
    units and meaning may be given in `series`); with `final_evaluation`,
    `test_batches` gives the fixed meta-test tasks of the evaluation that ends the run.
    Federated strategies ask `example_counts` for a client's weight and FedAvg `training_data`
    for what it trains on; L2C's mixing step scores `validation_data`. A family whose agents
    hold finite data says how many draws make one pass over it (`steps_per_epoch`) and may give
    each agent test tasks of its own (`own_test_set`, scored at every logged row).
    """

    # Settings of a family given by import path: a dataclass whose fields are the keys of the
    # job's [problem_options] table, checked with the types and rules of every config key; the
    # constructor gets an instance as `config`. The built-in families read their own sections.
    @dataclass
    class Options:
        pass

    final_evaluation = False
    # `sample` takes its iteration as a 0-d int64 tensor on the device too and draws with
    # tensor operations alone (no value read back to the host), so that a round drawing its
    # tasks can be captured as a CUDA graph and replayed (runtime.cuda_graph); families that
    # do not say so run their rounds eagerly.
    draws_by_counter = False
    # With final_evaluation: score the network centroid on each test task (one value per task,
    # weighted by `test_weights`: e.g. held-out clients) rather than every agent on all of them.
    final_per_task = False

    series: dict[str, tuple[bool, str, str]] = {}
    scores: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
    # The loss Q(w; X) of one task for the default `learner_functions`: a staticmethod (or a
    # method) loss(prediction, target) -> scalar; here the mean squared error.
    loss = staticmethod(mse_loss)

    def __init__(
        self, config: Any, num_agents: int, seed: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        """`config` is the family's config section (a family given by import path: its
        `Options`, filled from [problem_options]); agents are numbered 0..num_agents-1; random
        numbers come from `seed` (see `sample`); tensors are made in `dtype` on `device`."""
        self.config = config
        self.num_agents = num_agents
        self.seed = seed
        self.dtype = dtype
        self.device = device

    @classmethod
    def check_options(cls, options: Any) -> None:
        """Check the ranges of a family's `Options` (types are checked already) when the config
        is loaded, before anything runs: raise dmeta.errors.DmetaError with one line naming
        the key, e.g. "problem_options.noise_std = -1.0 must not be negative"."""
        return None

    @abstractmethod
    def sample(
        self, agents: torch.Tensor, iteration: int, tasks: int, stream: int = rng.STREAM_TASKS
    ) -> TaskBatch:
        """`tasks` training tasks S_{k,i} of each agent k in `agents` (int64 ids [A], this
        rank's) at `iteration` (the task draw number): TaskBatch of [A, tasks, shots, ...].

        Draw them as a function of (self.seed, agent id, stream, iteration) alone, e.g. with
        `dmeta.rng.uniform(self.seed, agents, stream, iteration, shape, dtype=self.dtype)`, so
        a run draws the same tasks on any number of ranks. Another `stream` (the engine's
        stationarity and L2C draws) must give independent tasks from the same distributions;
        draws in several parts use `rng.substream(stream, part)`.
        """

    @abstractmethod
    def validation_set(self, config: ValidationConfig) -> TaskBatch:
        """The fixed validation tasks, the same for every agent and rank: TaskBatch of
        [config.tasks, shots, ...], with `config.support_shots` and `config.query_shots` where
        the family's tasks have a free size (e.g. drawn from `rng.STREAM_VALIDATION`, agent 0,
        iteration 0)."""

    @abstractmethod
    def build_model(self, config: ModelConfig) -> FlatModel:
        """The network, as a FlatModel (one flat parameter vector per agent): a built-in one
        (`dmeta.models.build_mlp(config, in_features, out_features)` reads [model]'s hidden and
        activation; `build_convnet`) or `FlatModel(module)` of any torch.nn.Module whose state
        is its parameters alone (no buffers), whose forward maps one task's inputs
        [shots, ...in] to predictions, and which torch.func can vmap and differentiate twice."""

    def learner_functions(self, model: FlatModel) -> tuple[Callable, Callable]:
        """(forward(flat [M], inputs) -> predictions, loss(predictions, targets) -> scalar) of
        one task for the learners: by default the model's forward and `loss`."""
        return model.forward, self.loss

    def tasks_per_iteration(self, requested: int) -> int:
        """The tasks `sample` draws per agent when asked for `requested`."""
        return requested

    def test_batches(self, tasks_at_once: int) -> Iterator[TaskBatch]:
        """The fixed meta-test tasks of the final evaluation, in groups of `tasks_at_once`
        (0: all at once); none by default (`final_evaluation` False)."""
        return iter(())

    def validation_weights(self) -> torch.Tensor | None:
        """Weights (summing to one) of the validation tasks in the logged means; None: equal."""
        return None

    def own_validation_set(
        self, agents: torch.Tensor, config: ValidationConfig
    ) -> TaskBatch | None:
        """Each agent's own fixed validation tasks, from its own task distribution, for
        `validation.own_tasks = true`: TaskBatch of [len(agents), config.tasks, shots, ...]
        for the agents `agents` (int64 ids [A], this rank's), with `config.support_shots` and
        `config.query_shots` where the family's tasks have a free size. Draw them as a function
        of (self.seed, agent id) alone, e.g. from `rng.STREAM_OWN_VALIDATION` at iteration 0,
        so every rank layout scores an agent on the same tasks; they weigh equally in the
        logged means. None (the default): the family has none, and a run that asks for them
        stops with one error line."""
        return None

    def own_test_set(self, agents: torch.Tensor) -> TaskBatch | None:
        """Each agent's own fixed test tasks: TaskBatch of [len(agents), tasks, shots, ...],
        scored (after the validation's inner steps on each support set) at every logged row as
        /metrics/test_loss and /metrics/test_<score> [T, K], the tasks weighing equally. None
        (the default): the family has none."""
        return None

    def steps_per_epoch(self) -> int:
        """Draws of `sample` that make one pass over an agent's training data: what one local
        step (`learner.local_steps` of the diffusion family and push-sum, `l2c.local_epochs`,
        `federated.local_epochs` of FedAvg) takes. 1 (the default) for families that draw fresh
        tasks or hold an agent's data as one batch."""
        return 1

    def validation_data(self, agents: torch.Tensor, iteration: int, tasks: int) -> TaskBatch:
        """D_k^val of each agent in round `iteration`, the data L2C's mixing step scores
        (Li et al., eq. 3 and 6): by default `tasks` fresh tasks of the agent's own
        distribution on rng.STREAM_L2C_VALIDATION."""
        return self.sample(agents, iteration, tasks, stream=rng.STREAM_L2C_VALIDATION)

    def test_weights(self) -> torch.Tensor | None:
        """Weights (summing to one) of the test tasks in `final_per_task`'s mean; None: equal."""
        return None

    def training_data(self, agents: torch.Tensor, iteration: int, tasks: int) -> TaskBatch:
        """What a plain (non-meta) learner trains on, as query sets: the tasks by default."""
        return self.sample(agents, iteration, tasks)

    def example_counts(self, agents: torch.Tensor, tasks: TaskBatch) -> torch.Tensor:
        """n_u: the examples each agent holds in `tasks` [agents, tasks, shots, ...] (federated
        weighting); by default its support and query examples of the batch."""
        per_agent, support = tasks.support_y.shape[1:3]
        examples = per_agent * (support + tasks.query_y.shape[2])
        return torch.full((len(agents),), float(examples), device=tasks.support_y.device)

    def initial_parameters(
        self, model: FlatModel, agents: torch.Tensor, same_init: bool, dtype: torch.dtype
    ) -> torch.Tensor:
        """Launch models w_{k,0} [len(agents), M]: by default torch.nn's initialization of
        each layer (U(-1/sqrt(fan_in), 1/sqrt(fan_in)); normalization scale 1, shift 0), drawn
        per agent from the run seed (one shared draw with `same_init`)."""
        return model.initial_parameters(self.seed, agents, same_init, dtype)

    def row_metrics(
        self, models: torch.Tensor, centroid: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Values of `series` at a logged row, from the agents' launch rows [local agents, P]
        and the centroid [P]: (per-agent tensors [local agents], scalars)."""
        return {}, {}

    def arrays(self) -> dict[str, torch.Tensor]:
        """Datasets (path -> tensor) that describe the tasks, written once into the run file."""
        return {}


class SineTask(TaskFamily):
    """y = A sin(x - phase) with agent k's amplitudes from the k-th of K equal intervals.

    Paper, Sec. IV-A: the amplitude range [0.1, 5.0] is split evenly over K agents, the phase
    is uniform on [0, pi] for every agent and x is uniform on [-5, 5].
    """

    draws_by_counter = True

    in_features = 1
    out_features = 1

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

    def own_validation_set(self, agents: torch.Tensor, config: ValidationConfig) -> TaskBatch:
        """Agent k's fixed validation tasks from its own amplitude interval (the whole range
        without task.split_amplitude) and the whole phase range: [agents, tasks, shots, 1],
        keyed by agent id on rng.STREAM_OWN_VALIDATION, iteration 0."""
        low, high = self._amplitude_bounds(agents)
        return self._draw(
            agents,
            rng.STREAM_OWN_VALIDATION,
            0,
            config.tasks,
            config.support_shots,
            config.query_shots,
            low,
            high,
        )

    def build_model(self, config: ModelConfig) -> FlatModel:
        """The fully connected network of `model` (1 input, 1 output)."""
        return build_mlp(config, self.in_features, self.out_features)


class LinearRepresentationTask(TaskFamily):
    """Tasks y = <B* w*, x> + z of seed 001 for the model (B, w) (dmeta/linrep.py).

    In `samples` mode a task is a support and a query set of `linear.samples` points each,
    x ~ N(0, I), y = <B* w*, x> + sigma z. In `population` mode a task is its head alone
    (TaskBatch fields [..., 1, rank]) and the loss is the exact expectation
    (1/2)||B w - B* w*||^2 + sigma^2 / 2, so the run draws no samples at all. B* comes from the
    run's seed; heads are drawn per agent and iteration (`fresh`) or once per agent (`fixed`).
    """

    draws_by_counter = True

    def __init__(
        self,
        config: LinearTaskConfig,
        num_agents: int,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(config, num_agents, seed, dtype, device)
        dim, rank = config.dim, config.rank
        key = torch.zeros(1, dtype=torch.int64, device=device)
        gaussian = rng.normal(seed, key, rng.STREAM_TRUTH, 0, (dim, rank), torch.float64)[0]
        self.truth = linrep.orthonormal_basis(gaussian).to(dtype)
        self.head_mean = torch.full(
            (rank,), config.head_mean / math.sqrt(rank), dtype=dtype, device=device
        )
        self.head_root = linrep.head_covariance_root(rank, config.head_condition_number, dtype).to(
            device
        )
        self.fixed_heads: torch.Tensor | None = None
        if config.heads == "fixed":
            agents = torch.arange(num_agents, device=device)
            self.fixed_heads = self._heads(agents, rng.STREAM_HEADS, 0, config.heads_per_agent)

    series = {
        "metrics/rep_distance": (
            True,
            "1",
            "principal-angle distance ||B_perp^T B*||_2 of the agent's representation to B*",
        ),
        "centroid/rep_distance": (
            False,
            "1",
            "principal-angle distance of the centroid's representation to B*",
        ),
    }

    def _heads(self, agents: torch.Tensor, stream: int, iteration: int, count: int) -> torch.Tensor:
        """Heads w* [len(agents), count, rank] from the head distribution."""
        gaussian = rng.normal(
            self.seed, agents, stream, iteration, (count, self.config.rank), self.dtype
        )
        return self.head_mean + gaussian @ self.head_root.T

    def tasks_per_iteration(self, requested: int) -> int:
        """Population mode with a fixed head set uses every head each iteration (full batch)."""
        c = self.config
        if c.mode == "population" and c.heads == "fixed":
            return c.heads_per_agent
        return requested

    def _batch(self, heads: torch.Tensor, agents: torch.Tensor, stream: int, iteration: int):
        """Support and query sets for heads [A, T, rank], from part PART_SAMPLES of the family
        `stream`: no input shares numbers with the heads or their picks."""
        c = self.config
        if c.mode == "population":
            tasks = heads[..., None, :]
            return TaskBatch(tasks, tasks, tasks, tasks)
        # One draw holds every number: the dim inputs and the noise of each point.
        draws = rng.normal(
            self.seed,
            agents,
            rng.substream(stream, rng.PART_SAMPLES),
            iteration,
            (heads.shape[1], 2 * c.samples, c.dim + 1),
            self.dtype,
        )
        x, noise = draws[..., : c.dim], draws[..., c.dim]
        signal = heads @ self.truth.T  # [A, T, dim]: B* w*
        y = torch.einsum("atsd,atd->ats", x, signal) + c.noise_std * noise
        y = y[..., None]
        return TaskBatch(
            x[:, :, : c.samples], y[:, :, : c.samples], x[:, :, c.samples :], y[:, :, c.samples :]
        )

    def sample(
        self, agents: torch.Tensor, iteration: int, tasks: int, stream: int = rng.STREAM_TASKS
    ) -> TaskBatch:
        """Each agent's tasks at `iteration`: [agents, tasks, samples, dim] (or heads)."""
        tasks = self.tasks_per_iteration(tasks)
        if self.fixed_heads is None:
            heads = self._heads(agents, rng.substream(stream, rng.PART_HEADS), iteration, tasks)
        elif tasks == self.config.heads_per_agent and self.config.mode == "population":
            heads = self.fixed_heads[agents]
        else:
            picks_stream = rng.substream(stream, rng.PART_PICKS)
            unit = rng.uniform(
                self.seed, agents, picks_stream, iteration, (tasks,), dtype=torch.float64
            )
            picks = (unit * self.config.heads_per_agent).long()
            heads = torch.gather(
                self.fixed_heads[agents], 1, picks[..., None].expand(-1, -1, self.config.rank)
            )
        return self._batch(heads, agents, stream, iteration)

    def validation_set(self, config: ValidationConfig) -> TaskBatch:
        """Fixed validation tasks from the head distribution, the same for every agent."""
        key = torch.zeros(1, dtype=torch.int64, device=self.device)
        heads_stream = rng.substream(rng.STREAM_VALIDATION, rng.PART_HEADS)
        heads = self._heads(key, heads_stream, 0, config.tasks)
        return TaskBatch(*(part[0] for part in self._batch(heads, key, rng.STREAM_VALIDATION, 0)))

    def build_model(self, config: ModelConfig) -> FlatModel:
        """(B, w) as one flat vector, B row-major then w."""
        return FlatModel(LinearRepresentation(self.config.dim, self.config.rank))

    def learner_functions(self, model: FlatModel):
        """(forward, loss) for the learners: sampled predictions, or the population residual."""
        dim, rank = self.config.dim, self.config.rank
        if self.config.mode == "samples":
            return model.forward, linrep.sample_loss
        truth, noise_std = self.truth, self.config.noise_std

        def residual(theta: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
            representation, head = linrep.split(theta, dim, rank)
            return (representation @ head)[None, :] - heads @ truth.T

        def loss(residuals: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            return 0.5 * (residuals**2).sum(dim=-1).mean() + 0.5 * noise_std**2

        return residual, loss

    def initial_parameters(
        self, model: FlatModel, agents: torch.Tensor, same_init: bool, dtype: torch.dtype
    ) -> torch.Tensor:
        """Random, or B at the configured distance from B* (per-agent direction) and w = 0."""
        if self.config.init == "random":
            return model.initial_parameters(self.seed, agents, same_init, dtype)
        keys = torch.zeros_like(agents) if same_init else agents
        dim, rank = self.config.dim, self.config.rank
        directions = rng.normal(
            self.seed, keys, rng.STREAM_INIT_DIRECTIONS, 0, (dim, rank), torch.float64
        )
        truth = self.truth.to(torch.float64)
        rows = [
            linrep.flatten(
                linrep.at_distance(truth, self.config.init_distance, direction),
                torch.zeros(rank, dtype=torch.float64, device=direction.device),
            )
            for direction in directions
        ]
        return torch.stack(rows).to(dtype)

    def row_metrics(
        self, models: torch.Tensor, centroid: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """dist(B, B*) of every agent [local agents] and of the centroid, for `series`."""
        dim, rank = self.config.dim, self.config.rank
        size = dim * rank  # B comes first in every learner's launch row (Meta-SGD appends)
        agents = linrep.principal_angle_distance(
            models[:, :size].reshape(-1, dim, rank), self.truth
        )
        center = linrep.principal_angle_distance(centroid[:size].reshape(dim, rank), self.truth)
        return {"metrics/rep_distance": agents}, {"centroid/rep_distance": float(center)}

    def arrays(self) -> dict[str, torch.Tensor]:
        """Datasets of the run file that describe the tasks."""
        arrays = {"tasks/B_star": self.truth}
        if self.fixed_heads is not None:
            arrays["tasks/heads"] = self.fixed_heads
        return arrays


class LinearRepresentation(nn.Module):
    """The model of seed 001: prediction <B w, x>, parameters named B and w (the head)."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.B = nn.Parameter(torch.empty(dim, rank))  # noqa: N815 - the papers' name
        self.w = nn.Parameter(torch.empty(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ (self.B @ self.w))[..., None]
