"""PersA-FL (slides 003, Part I): personalised asynchronous federated learning with bounded
staleness, simulated on a virtual clock (no sleeping).

The agents are the clients. The server is FedBuff's buffered asynchronous server (Nguyen et al.,
"Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022) with the slides'
bounded delay tau and multi-step MAML personalisation:

- A job of client k takes d_k virtual time units, drawn once per client from
  `asynchrony.speed_distribution` (federated.client_durations). At time 0 the server sends its
  model (version 0) to `asynchrony.concurrency` clients.
- Events happen at instants, the finish times of jobs. At an instant the server takes the
  arriving updates in client order: an update computed at version v that arrives while the
  server is at version V has staleness tau = V - v; it is dropped if tau > `max_staleness`, or
  else joins the buffer. When the buffer holds `buffer_size` updates the server steps (version
  V + 1) and empties it. After the instant's arrivals the server sends its current model to idle
  clients until `concurrency` are busy: those with the smallest of K uniform keys drawn under
  (seed, instant number) on FedMeta's client-sampling stream.
- A client's update (PersA-FL client) is the learner's meta-gradient at the version it
  downloaded, after `learner.inner_steps` = u inner steps (the slides' multi-step MAML,
  personalisation budget u), on its tasks drawn with the number of the instant it was sent the
  model: FedMeta's client rule.
- The server steps its optimizer ([federated] server_optimizer, server_lr) with
  sum_i w_i g_i / sum_i w_i over the buffer, w_i = n_i / (1 + tau_i): the staleness weight
  normalised over the buffer, times the client's example count n_i as in FedMeta (equal for the
  synthetic task families).

Round t of the engine is one server step: the events after the (t-1)-th buffer flush up to the
t-th. Its accepted updates all arrive while the server is at version t - 1, so they need the
versions t - 1 - max_staleness .. t - 1: every rank keeps those max_staleness + 1 server models
(shared state, checkpointed). The schedule is a pure function of the seed and the durations
(`Schedule`), so every rank computes it alone; only the clients of a rank whose accepted updates
arrive in round t compute, and the round's one reduction is an all-reduce of the weighted sums.
A resumed run replays the schedule (no model computation) to the checkpoint's version.

With concurrency = buffer_size = M, max_staleness = 0 and constant speeds every instant is one
round with FedMeta's clients and tasks (clients_per_round = M) and FedMeta's update (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dmeta import rng
from dmeta.algorithms.base import CommTimer, Context, RoundReport, TopologyRecord
from dmeta.algorithms.federated import FederatedPlan, FedMeta, weighted_sums
from dmeta.config import AsynchronyConfig, Config
from dmeta.errors import DmetaError
from dmeta.exchange import AgentLayout
from dmeta.tasks import TaskBatch

F64 = torch.float64


@dataclass(frozen=True)
class Update:
    """A client's update as the server accepts it."""

    client: int
    version: int  # the server version the client downloaded
    draw: int  # the instant it was sent the model: its task draw
    staleness: int  # server version at arrival minus `version`


@dataclass
class Flush:
    """What happened from one server step to the next: the buffer it aggregates, its virtual
    time, and the clients that uploaded (dropped updates included) and downloaded meanwhile."""

    updates: list[Update]
    time: float
    uploads: list[int]
    downloads: list[int]


class Schedule:
    """The asynchronous server's events (module docstring): a pure function of the seed, the
    client durations and the settings, so every rank steps its own copy identically.

    State: the clock, the server version, the instants so far, the busy clients' (finish time,
    version, draw), the clients arriving at the current instant not yet taken (a flush can
    come mid-instant), the buffer, and the cumulative staleness histogram and drops.
    """

    def __init__(self, seed: int, durations: np.ndarray, settings: AsynchronyConfig) -> None:
        self.seed = seed
        self.durations = durations
        self.settings = settings
        self.time = 0.0
        self.version = 0
        self.instants = 0
        self.busy: dict[int, tuple[float, int, int]] = {}
        self.arriving: list[int] = []
        self.buffer: list[Update] = []
        self.histogram = np.zeros(settings.max_staleness + 1, dtype=np.int64)
        self.dropped = 0
        self._uploads: list[int] = []
        self._downloads: list[int] = []
        self._dispatch()

    def _dispatch(self) -> None:
        """The end of an instant: the current version goes to the idle clients with the
        smallest keys of this instant's draw until `concurrency` clients are busy."""
        self.instants += 1
        free = self.settings.concurrency - len(self.busy)
        key = torch.zeros(1, dtype=torch.int64)
        count = len(self.durations)
        keys = rng.uniform(self.seed, key, rng.STREAM_CLIENTS, self.instants, (count,), dtype=F64)
        order = torch.argsort(keys[0], stable=True).tolist()
        chosen = sorted([client for client in order if client not in self.busy][:free])
        for client in chosen:
            finish = self.time + float(self.durations[client])
            self.busy[client] = (finish, self.version, self.instants)
        self._downloads += chosen

    def _arrive(self, client: int) -> None:
        """Client `client`'s update reaches the server: dropped when too stale, else buffered."""
        _, version, draw = self.busy.pop(client)
        self._uploads.append(client)
        staleness = self.version - version
        if staleness > self.settings.max_staleness:
            self.dropped += 1
            return
        self.histogram[staleness] += 1
        self.buffer.append(Update(client, version, draw, staleness))

    def step(self) -> Flush:
        """The events up to the next server step (buffer flush), which this performs."""
        while True:
            if not self.arriving:
                self.time = min(finish for finish, _, _ in self.busy.values())
                self.arriving = sorted(
                    client for client, (finish, _, _) in self.busy.items() if finish == self.time
                )
            self._arrive(self.arriving.pop(0))
            full = len(self.buffer) == self.settings.buffer_size
            if full:
                self.version += 1
            if not self.arriving:
                self._dispatch()
            if full:
                flush = Flush(self.buffer, self.time, self._uploads, self._downloads)
                self.buffer, self._uploads, self._downloads = [], [], []
                return flush


@dataclass
class PersAFLPlan(FederatedPlan):
    """The checked server settings; clients_per_round is the concurrency."""

    settings: AsynchronyConfig


class PersAFL(FedMeta):
    """The asynchronous server of the module docstring, one buffer flush per round."""

    @classmethod
    def plan(cls, config: Config, layout: AgentLayout) -> PersAFLPlan:
        settings = config.asynchrony
        if settings.concurrency > config.agents:
            raise DmetaError(
                f"asynchrony.concurrency = {settings.concurrency} must lie in [1, agents = "
                f"{config.agents}]: a client trains one job at a time"
            )
        cls.check_server(config)
        if config.federated.batch_size:
            raise DmetaError(
                f"federated.batch_size = {config.federated.batch_size} cuts FedAvg's client "
                "epochs into mini-batches: strategy = 'persafl' does not read it, set it to 0"
            )
        return PersAFLPlan(config.agents, settings.concurrency, settings)

    @classmethod
    def row_series(cls, plan: PersAFLPlan) -> dict[str, tuple[bool, str, str]]:
        bins = {
            f"federated/staleness/{tau}": (
                False,
                "1",
                f"updates the server accepted with staleness {tau} (server versions between "
                "download and arrival) so far",
            )
            for tau in range(plan.settings.max_staleness + 1)
        }
        return {
            "time/virtual": (
                False,
                "virtual time units",
                "the virtual clock at the row's server step (its buffer flush)",
            ),
            "comm/bytes_up": (
                False,
                "bytes",
                "bytes the clients uploaded since the previous row, dropped updates included",
            ),
            "comm/bytes_down": (
                False,
                "bytes",
                "bytes the server sent the clients it started since the previous row",
            ),
            "federated/participations": (
                True,
                "1",
                "updates of the client the server accepted so far",
            ),
            "federated/dropped": (
                False,
                "1",
                "updates dropped so far for staleness above asynchrony.max_staleness",
            ),
        } | bins

    def __init__(self, context: Context, plan: PersAFLPlan, initial_models: torch.Tensor) -> None:
        super().__init__(context, plan, initial_models)
        self.schedule = self._new_schedule()
        # Server versions v - max_staleness .. v, version u in row u mod (max_staleness + 1).
        depth = plan.settings.max_staleness + 1
        self.versions = self.server.expand(depth, -1).clone()

    def _new_schedule(self) -> Schedule:
        """The schedule at time 0, from the seed and the clients' durations (host work)."""
        durations = self.durations.cpu().numpy()
        return Schedule(self.context.config.seed, durations, self.plan_.settings)

    def state_shared(self) -> dict[str, torch.Tensor]:
        version = torch.tensor([self.schedule.version], dtype=torch.int64)
        return super().state_shared() | {"server_versions": self.versions, "version": version}

    def load_state(self, rows: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]) -> None:
        """The saved models and optimizer; the schedule replayed to the saved version."""
        super().load_state(rows, shared)
        self.versions = shared["server_versions"].clone()
        self.schedule = self._new_schedule()
        for _ in range(int(shared["version"][0])):
            self.schedule.step()

    def row_values(self) -> dict[str, torch.Tensor | float]:
        histogram = {
            f"federated/staleness/{tau}": float(count)
            for tau, count in enumerate(self.schedule.histogram)
        }
        dropped = {"federated/dropped": float(self.schedule.dropped)}
        return super().row_values() | dropped | histogram

    def round(self, t: int) -> RoundReport:
        """Round t: the schedule's next buffer; this rank's clients in it compute their
        meta-gradients at their versions; one all-reduce; the server step."""
        context = self.context
        flush = self.schedule.step()
        first = int(context.agents[0])  # a rank's agents are a contiguous block
        local = [u for u in flush.updates if 0 <= u.client - first < len(context.agents)]
        size = self.server.shape[1]
        if local:
            sums = self._weighted_sums(local)
            rows = torch.as_tensor([u.client - first for u in local], device=context.device)
            self.participations.index_add_(0, rows, torch.ones_like(rows))
        else:
            sums = self.server.new_zeros(size + 2)
        timer = CommTimer(context.device)
        with timer, torch.no_grad():
            # All ranks synchronise here: one all-reduce of the ranks' weighted sums.
            total = context.exchange.allreduce_sum(sums.detach())
        average, loss = self._server_step(total)
        self.versions[self.schedule.version % len(self.versions)] = self.server[0]
        self.virtual_time.fill_(flush.time)
        return self._flush_report(flush, loss, average, timer.seconds)

    def device_round(self) -> None:
        """None: the schedule is host work, and a round's updates vary in number."""
        return None

    def _weighted_sums(self, updates: list[Update]) -> torch.Tensor:
        """[sum_i w_i g_i, sum_i w_i, sum_i w_i loss_i] over this rank's `updates`,
        w_i = n_i / (1 + tau_i): tasks drawn per dispatch instant, one meta-gradient call."""
        context = self.context
        ordered = sorted(updates, key=lambda u: (u.draw, u.client))
        per_client = context.config.learner.tasks_per_agent
        parts = []
        for draw in sorted({u.draw for u in ordered}):
            group = torch.as_tensor([u.client for u in ordered if u.draw == draw])
            parts.append(context.task.sample(group.to(context.device), draw, per_client))
        tasks = TaskBatch(*(torch.cat(column) for column in zip(*parts, strict=True)))
        clients = torch.as_tensor([u.client for u in ordered], device=context.device)
        launch = self.versions[[u.version % len(self.versions) for u in ordered]]
        gradients, losses, counts = self.meta_updates(clients, launch, tasks)
        staleness = torch.as_tensor([u.staleness for u in ordered], device=counts.device)
        return weighted_sums(gradients, losses, counts.to(gradients.dtype) / (1 + staleness))

    def _flush_report(
        self, flush: Flush, loss: torch.Tensor, gradient: torch.Tensor, seconds: float
    ) -> RoundReport:
        """The round's report: the buffer's weighted mean loss and the server's step direction
        for every agent, and each client's rows up and down since the previous round."""
        context = self.context
        row_bytes = self.row_bytes()
        moves = [len(flush.uploads), len(flush.downloads)]
        self.unlogged_bytes += torch.tensor(moves, dtype=F64, device=context.device) * row_bytes
        first, count = int(context.agents[0]), len(context.agents)
        clients = np.asarray(flush.uploads + flush.downloads, dtype=np.int64) - first
        mine = clients[(clients >= 0) & (clients < count)]
        rows = torch.as_tensor(np.bincount(mine, minlength=count), dtype=F64, device=context.device)
        ones = torch.ones(count, dtype=F64, device=context.device)
        return RoundReport(
            loss_sum=ones * float(loss),
            steps=1,
            gradient_norm=ones * float(torch.linalg.vector_norm(gradient)),
            comm_bytes=rows * row_bytes,
            comm_seconds=seconds,
        )

    @classmethod
    def topology(cls, plan: PersAFLPlan) -> TopologyRecord:
        settings = plan.settings
        attributes = {
            "num_agents": plan.num_clients,
            "kind": "server",
            "concurrency": settings.concurrency,
            "buffer_size": settings.buffer_size,
            "max_staleness": settings.max_staleness,
            "schedule": "asynchronous",
            "description": "a star: a server and its clients, concurrency of them training at "
            "once, a server step per buffer_size accepted updates; no edges stored",
        }
        return TopologyRecord(np.zeros((0, 2), dtype=np.int64), np.zeros(0), attributes)
