"""FedMeta (Chen et al., "Federated Meta-Learning with Fast Convergence and Efficient
Communication", Algorithm 1) and its FedAvg baseline: a server model and sampled clients.

The agents are the clients. Round t of the server (Algorithm 1, lines 4-10):

    U_t   = the `clients_per_round` clients sampled by (seed, t)        (line 5)
    g_u   = the client's update from the server model theta            (lines 6-8)
    theta = server optimizer step with sum_u n_u g_u / sum_u n_u        (line 9)

FedMeta: g_u is the learner's meta-gradient on the client's tasks of the round (its inner
steps on the support sets, the query loss; `maml` keeps the graph through the inner steps,
`metasgd` sends its step sizes down with theta and gets their gradient back; lines 12-18).
FedAvg: the client runs `federated.local_epochs` epochs of SGD steps of size `client_lr` on
its plain loss (the learner with no inner step on the task's `training_data`: the query sets'
loss, or all of a client's data for federated data) and returns its change g_u = theta - w_u;
the server steps with sum_u n_u (theta - w_u) / sum_u n_u = theta - the weighted average model,
so `server_optimizer = "average"` (fedavg's default: SGD with step 1) sets theta to the weighted
average (McMahan et al.'s FedAvg) and Adam gives FedAdam. Averaging the changes, not the
models, keeps a parameter that no client moved (a frozen embedding) at exactly 0, where Adam
would scale the rounding of an average of equal models up to a full step. An epoch is the task
family's `steps_per_epoch` steps; on federated data `federated.batch_size` B > 0 makes it a pass
over the client's data in mini-batches of B (McMahan et al., Algorithm 1, ClientUpdate: "for
each local epoch i from 1 to E, for batch b in B: w <- w - eta grad l(w; b)"), so a client
takes ceil(n_u / B) steps an epoch. n_u is the task's
`example_counts`: the client's examples of the round (equal for the synthetic task families),
its whole data set's size for federated data. At evaluation FedAvg scores the server model
unadapted, FedAvg(Meta) (`federated.finetune_at_test`) after fine-tuning on the support set
with the learner's inner steps of size `federated.finetune_lr` (0: learner.inner_lr).

Every rank holds the server model and the server optimizer's state (one row) and applies the
same reduced update, so they stay identical; the one reduction of a round is an all-reduce of
the rank's weighted sums. Only the sampled clients of a rank compute. Every agent's launch model
is the server model, so the engine evaluates the server model adapted on each agent's tasks.

A virtual clock (slides 003, "FedAvg Algorithm": the server waits to receive all local updates
back) makes the synchronous baseline of PersA-FL: a job of client k takes d_k virtual time units
(`client_durations`, [asynchrony] speed keys), so round t lasts max over U_t of d_u.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dmeta import rng
from dmeta.algorithms.base import (
    Algorithm,
    CommTimer,
    Context,
    RoundReport,
    TopologyRecord,
    build_optimizer,
    task_draw,
)
from dmeta.config import AsynchronyConfig, Config, OptimizerConfig
from dmeta.errors import DmetaError
from dmeta.exchange import AgentLayout
from dmeta.tasks import TaskBatch


def sample_clients(
    seed: int,
    round_: int | torch.Tensor,
    num_clients: int,
    count: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """U_t of Algorithm 1, line 5: `count` of clients 0..num_clients-1 without replacement,
    ascending. The clients with the `count` smallest of num_clients uniform keys drawn under the
    key agent 0 at iteration `round_` (stream STREAM_CLIENTS): a function of (seed, round) only.
    `round_` may be the 0-d counter tensor of a replayed round (`rng.blocks`)."""
    key = torch.zeros(1, dtype=torch.int64, device=device)
    keys = rng.uniform(seed, key, rng.STREAM_CLIENTS, round_, (num_clients,), dtype=torch.float64)
    chosen = torch.argsort(keys[0], stable=True)[:count]
    return torch.sort(chosen).values


def client_durations(seed: int, num_clients: int, settings: AsynchronyConfig) -> np.ndarray:
    """d_k [num_clients] float64: the virtual time every job of client k takes, drawn once per
    client from `settings.speed_distribution`: 1, exponential with mean 1, lognormal
    exp(shape Z) (Z by Box-Muller), or Pareto with minimum 1 and tail index shape,
    (1 - u)^(-1/shape). From two exact uniforms of (seed, k, stream STREAM_SPEED, iteration 0)
    through Python's scalar maths, not vectorised kernels, whose last bit can depend on the
    array's length: every rank and layout gets the same bits, so the same schedule."""
    clients = torch.arange(num_clients)
    units = rng.uniform(seed, clients, rng.STREAM_SPEED, 0, (2,), dtype=torch.float64).tolist()
    shape, name = settings.speed_shape, settings.speed_distribution

    def duration(u: float, v: float) -> float:
        if name == "exponential":
            return -math.log1p(-u)
        if name == "lognormal":
            return math.exp(shape * math.sqrt(-2.0 * math.log1p(-u)) * math.cos(2 * math.pi * v))
        if name == "pareto":
            return math.pow(1.0 - u, -1.0 / shape)
        return 1.0

    return np.array([duration(u, v) for u, v in units], dtype=np.float64)


def server_optimizer(config: Config, averages_models: bool) -> OptimizerConfig:
    """The server's optimizer (Algorithm 1, line 9) from `federated.server_optimizer`: `auto`
    is `average` for FedAvg (McMahan et al.'s server, the clients' weighted average model) and
    Adam for the meta-gradient strategies (the paper's implementation); `average` is SGD with
    step 1 on FedAvg's average change (server_lr unread), meaningless on meta-gradients.
    Adam's betas and eps come from [optimizer]."""
    settings = config.federated
    name = settings.server_optimizer
    if name == "auto":
        name = "average" if averages_models else "adam"
    if name == "average" and not averages_models:
        raise DmetaError(
            f"federated.server_optimizer = 'average' is FedAvg's server (the clients' weighted "
            f"average model); strategy = {config.strategy!r} returns meta-gradients: use "
            "'adam' or 'sgd' with federated.server_lr"
        )
    name, lr = ("sgd", 1.0) if name == "average" else (name, settings.server_lr)
    optimizer = config.optimizer
    return OptimizerConfig(name, lr, optimizer.beta1, optimizer.beta2, optimizer.eps)


def weighted_sums(rows: torch.Tensor, losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[P + 2]: sum_u w_u rows_u, sum_u w_u and sum_u w_u losses_u, what a rank contributes to
    the server's all-reduce (`Federated._server_step` reads it back)."""
    weighted_loss = weights @ losses.to(weights.dtype)
    return torch.cat([weights @ rows, weights.sum()[None], weighted_loss[None]])


@dataclass
class FederatedPlan:
    """The checked server settings."""

    num_clients: int
    clients_per_round: int


class Federated(Algorithm):
    """A server model trained by sampled clients; subclasses say what a client returns."""

    config_sections = ("federated", "asynchrony")
    shared_model = True
    # Whether a client returns a model change (FedAvg), which the server may average, or a
    # meta-gradient (`server_optimizer`).
    averages_models = False

    series = {
        "time/virtual": (
            False,
            "virtual time units",
            "the virtual clock after the row's round: each round lasts as long as its slowest "
            "sampled client's job (asynchrony.speed_distribution)",
        ),
        "comm/bytes_up": (
            False,
            "bytes",
            "bytes the sampled clients sent the server since the previous row",
        ),
        "comm/bytes_down": (
            False,
            "bytes",
            "bytes the server sent the sampled clients since the previous row",
        ),
        "federated/participations": (True, "1", "rounds in which the client was sampled so far"),
    }

    @classmethod
    def plan(cls, config: Config, layout: AgentLayout) -> FederatedPlan:
        settings = config.federated
        if not 1 <= settings.clients_per_round <= config.agents:
            raise DmetaError(
                f"federated.clients_per_round = {settings.clients_per_round} must lie in "
                f"[1, agents = {config.agents}]"
            )
        if not settings.client_lr > 0:
            raise DmetaError(f"federated.client_lr = {settings.client_lr} must be positive")
        cls.check_server(config)
        if not settings.finetune_lr >= 0:
            raise DmetaError(
                f"federated.finetune_lr = {settings.finetune_lr} must be positive, or 0 for "
                "learner.inner_lr"
            )
        if settings.finetune_lr and not (config.strategy == "fedavg" and settings.finetune_at_test):
            raise DmetaError(
                f"federated.finetune_lr = {settings.finetune_lr} is FedAvg(Meta)'s fine-tuning "
                "step: it needs strategy = 'fedavg' with federated.finetune_at_test = true "
                "(FedMeta adapts with learner.inner_lr)"
            )
        if settings.local_epochs < 1:
            raise DmetaError(f"federated.local_epochs = {settings.local_epochs} must be at least 1")
        if settings.batch_size < 0:
            raise DmetaError(
                f"federated.batch_size = {settings.batch_size} must be 0 (a client's data as "
                "one batch) or a positive mini-batch size"
            )
        if settings.batch_size and not (
            config.strategy == "fedavg" and config.problem == "federated"
        ):
            raise DmetaError(
                f"federated.batch_size = {settings.batch_size} cuts FedAvg's client epochs on "
                "federated data into mini-batches: it needs strategy = 'fedavg' with problem "
                "= 'federated' (set it to 0; problem = 'noniid' has noniid.batch_size)"
            )
        return FederatedPlan(config.agents, settings.clients_per_round)

    @classmethod
    def check_server(cls, config: Config) -> None:
        """DmetaError unless the server's settings hold: a positive server_lr, a server
        optimizer that fits what the clients return, one server step a round."""
        if not config.federated.server_lr > 0:
            raise DmetaError(f"federated.server_lr = {config.federated.server_lr} must be positive")
        server_optimizer(config, cls.averages_models)  # refuses 'average' on meta-gradients
        if config.learner.local_steps != 1:
            epochs = " (FedAvg's client epochs are federated.local_epochs)"
            raise DmetaError(
                f"strategy = {config.strategy!r} takes one server step per round: set "
                f"learner.local_steps = 1{epochs if cls.averages_models else ''}"
            )

    def __init__(self, context: Context, plan: FederatedPlan, initial_models: torch.Tensor) -> None:
        self.context = context
        self.plan_ = plan
        config = context.config
        self.optimizer = build_optimizer(server_optimizer(config, self.averages_models))
        # Algorithm 1, line 3: theta starts as client 0's launch model, drawn on every rank.
        self.server = initial_models[:1].clone()
        self.optimizer_state = self.optimizer.init_state(self.server)
        self.participations = torch.zeros(
            len(context.agents), dtype=torch.int64, device=context.device
        )
        # Bytes (up, down) since the previous logged row and the virtual clock: device
        # tensors, which a replayed round (`device_round`) advances.
        device = context.device
        self.unlogged_bytes = torch.zeros(2, dtype=torch.float64, device=device)
        durations = client_durations(config.seed, config.agents, config.asynchrony)
        self.durations = torch.as_tensor(durations, device=device)  # d_k of every client
        self.virtual_time = torch.zeros(1, dtype=torch.float64, device=device)

    def state_rows(self) -> dict[str, torch.Tensor]:
        return {"participations": self.participations}

    def state_shared(self) -> dict[str, torch.Tensor]:
        optimizer = {f"server_optimizer/{k}": v for k, v in self.optimizer_state.items()}
        clock = {"unlogged_bytes": self.unlogged_bytes, "virtual_time": self.virtual_time}
        return {"server_model": self.server[0]} | clock | optimizer

    def load_state(self, rows: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]) -> None:
        self.participations = rows["participations"].clone()
        self.server = shared["server_model"][None].clone()
        self.unlogged_bytes = shared["unlogged_bytes"].clone()
        self.virtual_time = shared["virtual_time"].clone()
        prefix = "server_optimizer/"
        self.optimizer_state = {
            name[len(prefix) :]: value.clone()
            for name, value in shared.items()
            if name.startswith(prefix)
        }

    def models(self) -> torch.Tensor:
        """Every client's launch model is the server model theta."""
        return self.server.expand(len(self.context.agents), -1)

    def row_values(self) -> dict[str, torch.Tensor | float]:
        up, down = self.unlogged_bytes.tolist()
        self.unlogged_bytes.zero_()
        return {
            "time/virtual": float(self.virtual_time[0]),
            "comm/bytes_up": up,
            "comm/bytes_down": down,
            "federated/participations": self.participations,
        }

    @abstractmethod
    def client_updates(
        self, t: int, clients: torch.Tensor, launch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the sampled `clients` (global ids) of this rank return from `launch` [n, P]:
        (rows to average [n, P], loss summed over their steps [n], example counts n_u [n])."""

    def round(self, t: int) -> RoundReport:
        """Algorithm 1, lines 5-9: sample, let this rank's sampled clients compute, reduce once,
        step the server optimizer."""
        context = self.context
        sampled = self._sample(t)
        local = self._sampled_here(sampled)
        sums = self._client_sums(t, torch.nonzero(local).flatten())
        timer = CommTimer(context.device)
        with timer, torch.no_grad():
            # All ranks synchronise here: one all-reduce of the ranks' weighted sums.
            total = context.exchange.allreduce_sum(sums.detach())
        gradient, loss = self._server_step(total)
        return self._report(local, loss, gradient, timer.seconds)

    def device_round(self) -> Callable[[torch.Tensor], RoundReport] | None:
        """`round` on one rank, as device work alone: the rank holds every client (agent k is
        row k) and its own sums are the all-reduce's; the server model and its optimizer's
        state are updated in their own memory (a replay's)."""
        if self.context.exchange.size != 1:
            return None

        def device_round(t: torch.Tensor) -> RoundReport:
            server, state = self.server, self.optimizer_state
            try:
                sampled = self._sample(t)
                local = self._sampled_here(sampled)
                gradient, loss = self._server_step(self._client_sums(t, sampled).detach())
                server.copy_(self.server)
                for name, value in self.optimizer_state.items():
                    state[name].copy_(value)
            finally:  # also after a failed capture, which ran nothing
                self.server, self.optimizer_state = server, state
            return self._report(local, loss, gradient, 0.0)

        return device_round

    def _sample(self, t: int | torch.Tensor) -> torch.Tensor:
        """U_t (line 5); the synchronous virtual clock waits for its slowest client."""
        plan = self.plan_
        device = self.context.device
        sampled = sample_clients(
            self.context.config.seed, t, plan.num_clients, plan.clients_per_round, device
        )
        self.virtual_time += self.durations[sampled].max()
        return sampled

    def _sampled_here(self, sampled: torch.Tensor) -> torch.Tensor:
        """[local agents] bool: which of this rank's agents are in the sample."""
        # Both are unique; not told so, isin takes a unique() that reads its size back (a host
        # sync, which a CUDA graph capture refuses) from about 27 sampled clients of 900.
        return torch.isin(self.context.agents, sampled, assume_unique=True)

    def _client_sums(self, t: int | torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[P + 2]: this rank's sampled clients (local `rows`) compute (lines 6-8); the sum of
        their returned rows weighted by n_u, the sum of n_u, and of n_u times their loss."""
        self.participations[rows] += 1
        if not len(rows):
            return self.server.new_zeros(self.server.shape[1] + 2)
        launch = self.server.expand(len(rows), -1)
        returned, losses, counts = self.client_updates(t, self.context.agents[rows], launch)
        return weighted_sums(returned, losses, counts.to(returned.dtype))

    def _server_step(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Line 9: the server's optimizer steps with the clients' weighted average update.
        Returns that average and the clients' weighted mean loss."""
        size = self.server.shape[1]
        gradient, count, loss = total[:size] / total[size], total[size], total[size + 1]
        self.server, self.optimizer_state = self.optimizer.step(
            self.server, gradient[None], self.optimizer_state
        )
        return gradient, loss / count

    def _report(
        self, local: torch.Tensor, loss: torch.Tensor, gradient: torch.Tensor, seconds: float
    ) -> RoundReport:
        """The round's report: the server's mean client loss and gradient norm for every agent,
        and each sampled client's row down and row up as its bytes."""
        # The server sends theta and gets a row of that shape back.
        row_bytes = self.row_bytes()
        self.unlogged_bytes += self.plan_.clients_per_round * row_bytes
        ones = torch.ones(len(local), dtype=torch.float64, device=self.context.device)
        return RoundReport(
            loss_sum=ones * loss,
            steps=self.steps_per_round(),  # the clients' losses are summed over their steps
            gradient_norm=ones * torch.linalg.vector_norm(gradient),
            comm_bytes=local.to(torch.float64) * 2 * row_bytes,
            comm_seconds=seconds,
        )

    def row_bytes(self) -> int:
        """Bytes of the server row that travels to or from a client: theta with Meta-SGD's step
        sizes, less what no step moves (a frozen embedding and its step sizes), which the
        clients hold (LEAF counts trainable variables alone)."""
        copies = 2 if self.context.learner.learned_inner_lr else 1
        frozen = self.context.frozen_parameters * copies
        return (self.server.shape[1] - frozen) * self.server.element_size()

    def steps_per_round(self) -> int:
        """Client steps whose losses a round reports."""
        return 1

    @classmethod
    def topology(cls, plan: FederatedPlan) -> TopologyRecord:
        attributes = {
            "num_agents": plan.num_clients,
            "kind": "server",
            "clients_per_round": plan.clients_per_round,
            "schedule": "client sampling",
            "description": "a star: a server and its clients, clients_per_round of them "
            "sampled each round; no edges stored",
        }
        return TopologyRecord(np.zeros((0, 2), dtype=np.int64), np.zeros(0), attributes)


class FedMeta(Federated):
    """Clients return the learner's meta-gradient at theta (Algorithm 1, lines 12-18)."""

    def client_updates(
        self, t: int, clients: torch.Tensor, launch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tasks = self.context.task.sample(clients, t, self.context.config.learner.tasks_per_agent)
        return self.meta_updates(clients, launch, tasks)

    def meta_updates(
        self, clients: torch.Tensor, launch: torch.Tensor, tasks: TaskBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The meta-gradients of `clients` from `launch` [n, P] on their `tasks`, their query
        losses [n] and example counts n_u [n]."""
        gradients, losses = self.context.meta_gradients(launch, tasks)
        return gradients, losses, self.context.task.example_counts(clients, tasks)


class FedAvg(Federated):
    """Clients return their change theta - w_u after `local_epochs` epochs of SGD on the plain
    loss (in mini-batches with `federated.batch_size`); the server steps with the weighted
    average change, theta minus the clients' weighted average model."""

    averages_models = True

    @classmethod
    def plan(cls, config: Config, layout: AgentLayout) -> FederatedPlan:
        if config.learner.name == "metasgd":
            raise DmetaError(
                "strategy = 'fedavg' trains no inner step sizes: use another learner.name (the "
                "learner only adapts at evaluation)"
            )
        return super().plan(config, layout)

    def __init__(self, context: Context, plan: FederatedPlan, initial_models: torch.Tensor) -> None:
        super().__init__(context, plan, initial_models)
        learner = context.learner
        # No inner step: the gradient of the plain (query-set) loss.
        self.plain = learner.plain()
        # FedAvg trains without the learner's inner step; the learner only adapts the server
        # model at evaluation (FedAvg(Meta)'s fine-tuning, and the stationarity estimate's
        # meta-gradient): federated.finetune_lr > 0 sets its step there.
        finetune_lr = context.config.federated.finetune_lr
        if context.config.federated.finetune_at_test and finetune_lr > 0:
            learner.inner_lr = finetune_lr

    def client_updates(
        self, t: int, clients: torch.Tensor, launch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """McMahan et al.'s ClientUpdate (Algorithm 1) of the sampled `clients` from `launch`:
        an SGD step of size client_lr on each of `_batches` in turn. Returns the changes
        launch - w_u, each client's loss summed over its reported steps and n_u."""
        models = launch
        loss_sum = torch.zeros(len(clients), dtype=torch.float64, device=self.context.device)
        for batch in self._batches(t, clients):
            gradients, losses = self.plain.meta_gradients(models, batch)
            models = models - self.context.config.federated.client_lr * gradients
            loss_sum += losses.detach().to(torch.float64)
        counts = self.context.task.example_counts(clients, batch)
        batch_size = self.context.config.federated.batch_size
        if batch_size:  # an epoch of mini-batches reports its mean batch loss as one step
            loss_sum /= torch.ceil(counts / batch_size)
        return launch - models, loss_sum, counts

    def _batches(self, t: int, clients: torch.Tensor) -> Iterator[TaskBatch]:
        """A round's batches: `steps_per_round` draws of the task's `training_data`, or with
        federated.batch_size = B > 0 (federated data) each of the `local_epochs` epochs'
        mini-batches, client u's ceil(n_u / B) batches in the order the task's `minibatches`
        draws for (round t, epoch). With mini-batches the clients step together, as many steps
        as the largest sampled client needs (in a device round, t a tensor: the largest
        training client); a client's later batches are padding alone, whose loss and gradient
        are 0, so it stays where it is."""
        context = self.context
        settings = context.config.federated
        if settings.batch_size:
            epochs = settings.local_epochs
            for epoch in range(epochs):
                draw = task_draw(t, epochs, epoch)
                yield from context.task.minibatches(clients, draw, settings.batch_size)
            return
        steps = self.steps_per_round()
        for step in range(steps):
            # Task draws numbered by client step, as in the diffusion strategies' local steps.
            yield context.task.training_data(
                clients, task_draw(t, steps, step), context.config.learner.tasks_per_agent
            )

    def evaluation_steps(self, steps: int) -> int:
        """FedAvg(Meta) fine-tunes on a held-out client's support set before scoring it
        (`federated.finetune_at_test`, steps of `federated.finetune_lr`); plain FedAvg scores
        the server model as it is (Sec. 4.1)."""
        return steps if self.context.config.federated.finetune_at_test else 0

    def steps_per_round(self) -> int:
        """`federated.local_epochs` local epochs, each the task family's `steps_per_epoch`
        (with mini-batches each client's epoch reports its mean batch loss as one step)."""
        return self.context.config.federated.local_epochs * self.context.task.steps_per_epoch()
