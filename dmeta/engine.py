"""The engine: the loop of rounds, logging, evaluation, checkpoints and signals.

It runs whatever algorithm the plan names (dmeta/algorithms/) and knows none by name: it
asks the algorithm for a round, for the models to evaluate and for its declared state, and owns
the rest: the metrics window between logged rows, the evaluation of a row (validation, the
centroid, Theorem 1's disagreement, Theorem 2's stationarity), the run file, checkpoints and
the agreement of all ranks on signals.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmeta import hostmemory, rng
from dmeta.algorithms.base import Algorithm, Context, RoundReport, synchronize
from dmeta.checkpoint import Snapshot, checkpoint_path, load_checkpoint, save_checkpoint
from dmeta.config import config_digest, is_import_path
from dmeta.cudagraph import WARMUP_ROUNDS, GraphedRounds
from dmeta.errors import AgreedError, DmetaError, agree
from dmeta.exchange import Exchange, LocalExchange, MPIExchange
from dmeta.federated_data import weighted_ci95
from dmeta.fewshot import confidence_interval_95
from dmeta.mlp_maml import ClosedFormMAML
from dmeta.output import SERIES, RowSchema, RunWriter, open_writer
from dmeta.problems import check_batch
from dmeta.runner import DTYPES, RunPlan, build_learner, build_model, build_task, run_attributes
from dmeta.tasks import TaskBatch, score_series


def disagreement(launch_models: torch.Tensor, centroid: torch.Tensor) -> torch.Tensor:
    """||w_k - w_c||^2 per agent (Theorem 1), with w_c the network centroid (1/K) sum_k w_k."""
    return ((launch_models - centroid) ** 2).sum(dim=1)


def _units(name: str) -> str:
    """The units of the loss or of a task's score `name`."""
    return SERIES["metrics/val_loss"][1] if name == "loss" else "score units"


def own_test_series(scores: dict[str, Any]) -> dict[str, tuple[bool, str, str]]:
    """The series of each agent's own test tasks (`TaskFamily.own_test_set`): /metrics/test_loss
    and /metrics/test_<score> [T, K]."""
    return {
        f"metrics/test_{name}": (
            True,
            _units(name),
            f"test {name} after adaptation on the agent's own fixed test tasks, mean over them",
        )
        for name in ("loss", *scores)
    }


def own_task_series(scores: dict[str, Any]) -> dict[str, tuple[bool, str, str]]:
    """The validation series (/metrics/val_loss, /centroid/val_loss and those of the task's
    scores) described as `validation.own_tasks` computes them."""
    series = {}
    for name in ("loss", *scores):
        units = _units(name)
        series[f"metrics/val_{name}"] = (
            True,
            units,
            f"validation {name} after adaptation on the agent's own fixed validation tasks "
            "(validation.own_tasks)",
        )
        series[f"centroid/val_{name}"] = (
            False,
            units,
            f"validation {name} of the centroid w_c after adaptation on each agent's own "
            "validation tasks, mean over the agents",
        )
    return series


class Progress:
    """Rank 0's progress: a bar on a terminal; otherwise a line with the iteration, the rate and
    the time left every `seconds` (0: never), and one line per logged row either way."""

    def __init__(self, total: int, enabled: bool, seconds: float = 0.0) -> None:
        self.bar = None
        self.enabled = enabled
        self.total = total
        self.seconds = seconds
        self.done = 0
        self.started = self.last = time.perf_counter()
        self.first = 0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="it", dynamic_ncols=True)

    def advance(self, iterations: int = 1) -> None:
        if self.bar is not None and iterations:
            self.bar.update(iterations)
        self.done += iterations
        if not self.enabled or self.bar is not None or self.seconds <= 0:
            return
        now = time.perf_counter()
        if now - self.last >= self.seconds and self.done > self.first:
            self.last = now
            rate = (self.done - self.first) / (now - self.started)
            left = (self.total - self.done) / rate
            remaining = f"{left:.0f} s" if left < 120 else f"{left / 60:.1f} min"
            print(
                f"progress: {self.done}/{self.total} iterations "
                f"({100 * self.done / self.total:.0f}%), {rate:.3g} it/s, {remaining} left",
                file=sys.stderr,
                flush=True,
            )

    def start_at(self, iterations: int) -> None:
        """A resumed run: `iterations` were done before; the rate counts from here."""
        self.advance(iterations)
        self.first = self.done
        self.started = self.last = time.perf_counter()

    def row(
        self, iteration: int, mean_train: float, mean_validation: float, scalars: dict[str, float]
    ) -> None:
        """One line: network means over agents and the centroid's metrics."""
        if not self.enabled:
            return
        train_text = "-" if math.isnan(mean_train) else f"{mean_train:.4f}"
        accuracy = scalars.get("centroid/val_accuracy")
        line = (
            f"iteration {iteration:>7d}  train {train_text:>7}  val {mean_validation:.4f}  "
            f"centroid val {scalars['centroid/val_loss']:.4f}  "
            + (f"centroid acc {accuracy:.3f}  " if accuracy is not None else "")
            + f"disagreement {scalars['centroid/disagreement']:.3e}  "
            f"stationarity {scalars['centroid/stationarity']:.3e}"
        )
        self.say(line)

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (a one-off: compiling) out of the rate and the time left."""
        self.started += seconds

    def say(self, line: str) -> None:
        """One line of rank 0's output, above the bar where there is one."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _quiet_inductor() -> Iterator[None]:
    """Hide the DeprecationWarning of torch's inductor, which uses its own deprecated
    torch.jit API when it is imported (by torch.compile or by a compiled step's first call)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "`torch.jit.script_method` is deprecated", DeprecationWarning
        )
        yield


class CompiledStep:
    """A training step under torch.compile that remembers how long its first call took: the
    compilation (plus one step). On a GPU the compiled step is also captured as a CUDA graph
    and replayed ("reduce-overhead"): a small network's step is otherwise hundreds of kernel
    launches. Where whole rounds are captured (`within_captured_rounds`) it is compiled
    alone and captured with them.

    `name` says what it is in messages. `whole`: the step changes state (a round, a local
    training), so it compiles as one program or not at all (fullgraph): pieces of it between
    graph breaks must not have run when a later piece fails and the fallback runs it eagerly
    again. Shapes are static (`dynamic=False`): a fixed-shape step compiles once per run, and
    torch's guess that numbers which differ between runs in one process (a seed) are dynamic
    made inductor emit code that does not compile."""

    def __init__(
        self,
        step: Any,
        device: torch.device,
        fallback: bool,
        name: str = "training step's meta-gradients",
        whole: bool = False,
    ) -> None:
        self.eager = step
        self.name = name
        self.whole = whole
        self._compile("reduce-overhead" if device.type == "cuda" else None)
        # runtime.compile = auto: a compilation that fails (no working compiler toolchain)
        # leaves the run eager, with a warning; an explicit true lets the failure through.
        self.fallback = fallback
        self.failed = False
        self.seconds: float | None = None

    def _compile(self, mode: str | None) -> None:
        with _quiet_inductor():
            self.step = torch.compile(self.eager, mode=mode, fullgraph=self.whole, dynamic=False)

    def within_captured_rounds(self) -> None:
        """Compile without a CUDA graph of its own (before the first call): the step runs
        inside rounds captured whole (runtime.cuda_graph), and graphs do not nest."""
        self._compile(None)

    def __call__(self, *args: Any) -> Any:
        if self.seconds is not None or self.failed:
            return self.step(*args)
        began = time.perf_counter()
        try:
            with _quiet_inductor():  # the first call compiles
                result = self.step(*args)
        except Exception as error:
            if not self.fallback:
                raise
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            warnings.warn(
                f"compiling the {self.name} failed ({type(error).__name__}: {first_line}); "
                "runtime.compile = auto runs it eagerly (set runtime.compile=false to skip "
                "the attempt)",
                stacklevel=2,
            )
            self.step, self.failed = self.eager, True
            return self.step(*args)
        self.seconds = time.perf_counter() - began
        return result


class CompiledRounds:
    """round(t) of an algorithm's `device_round` compiled whole (runtime.compile on the CPU):
    the CPU's counterpart of `GraphedRounds`. A small network's eager round is a few hundred
    operator calls, each costing more than its arithmetic; compiled, the round is one program.
    t arrives as a counter tensor, so one compilation serves every round and the random draws
    are those of an eager round (`dmeta.rng.blocks`)."""

    def __init__(self, device_round: Any, device: torch.device, fallback: bool) -> None:
        self.counter = torch.zeros((), dtype=torch.int64, device=device)
        self.step = CompiledStep(device_round, device, fallback, "training round", whole=True)

    def __call__(self, t: int) -> RoundReport:
        rng.set_counter(self.counter, t)
        return self.step(self.counter)


class RowWindow:
    """What a rank accumulates between two logged rows."""

    def __init__(self, num_local: int, device: torch.device) -> None:
        self.num_local = num_local
        self.device = device
        self.reset(0.0)

    def reset(self, now: float) -> None:
        self.train_sum = torch.zeros(self.num_local, dtype=torch.float64, device=self.device)
        self.gradient_norm = torch.full_like(self.train_sum, math.nan)
        self.comm_bytes = torch.zeros_like(self.train_sum)
        self.steps = 0
        self.comm_seconds = 0.0
        self.started = now

    def add(self, report: RoundReport) -> None:
        """One round's losses, meta-gradient norms, bytes and communication time."""
        self.train_sum += report.loss_sum
        self.gradient_norm = report.gradient_norm
        self.comm_bytes += report.comm_bytes
        self.comm_seconds += report.comm_seconds
        self.steps += report.steps

    def mean_train_loss(self) -> torch.Tensor:
        """Mean meta-training loss per agent over the window (NaN for an empty window)."""
        if not self.steps:
            return torch.full_like(self.train_sum, math.nan)
        return self.train_sum / self.steps

    def rows(self) -> dict[str, np.ndarray]:
        """The per-agent accumulators, for a checkpoint."""
        names = ("train_sum", "gradient_norm", "comm_bytes")
        return {name: getattr(self, name).cpu().numpy() for name in names}

    def restore(self, rows: dict[str, np.ndarray], steps: int) -> None:
        """Continue a window saved by `rows` after `steps` outer steps."""
        for name, values in rows.items():
            setattr(self, name, torch.as_tensor(values, device=self.device))
        self.steps = steps


def stationarity_scalars(gradients: torch.Tensor) -> dict[str, float]:
    """Theorem 2's estimate from the network meta-gradients of the two task halves
    [halves, size]: g_a . g_b (unbiased for ||grad J(w_c)||^2) and ||g_a - g_b||^2 / 4 (its
    noise); one row is both halves, none (estimate off) gives NaN."""
    if len(gradients) == 0:
        return dict.fromkeys(("centroid/stationarity", "centroid/stationarity_noise"), math.nan)
    first, second = gradients[0], gradients[-1]
    return {
        "centroid/stationarity": float(first @ second),
        "centroid/stationarity_noise": float((first - second).square().sum() / 4),
    }


def _numpy_rows(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    # A copy: the live state keeps changing after the snapshot is taken.
    return {name: value.detach().cpu().numpy().copy() for name, value in tensors.items()}


def build_exchange(plan: RunPlan, comm: Any) -> Exchange:
    """The exchange of the plan's backend: in-process, or MPI over (a duplicate of) `comm`."""
    if comm is None:
        return LocalExchange(plan.config.agents, plan.device)
    return MPIExchange(comm, plan.layout, plan.device)


class Engine:
    """One run of the plan's algorithm on this rank (see `execute`)."""

    def __init__(self, plan: RunPlan, exchange: Exchange, out_path: Path) -> None:
        config = self.config = plan.config
        self.plan = plan
        self.exchange = exchange
        self.device = plan.device
        self.rank = exchange.rank
        self.out_path = out_path
        dtype = DTYPES[config.runtime.dtype]
        self.agents = torch.as_tensor(plan.layout.agents(self.rank), device=self.device)
        self.task = build_task(config, dtype, self.device)
        model = build_model(self.task, config)
        runtime = config.runtime
        self.learner = build_learner(
            config.learner, model, self.task, plan.agents_at_once, runtime.closed_form
        )
        context = Context(
            config, self.task, self.learner, exchange, self.agents, self.device, dtype,
            self.learner.meta_gradients, model.frozen_size,
        )  # fmt: skip
        # A shared model starts as agent 0's launch model, which every rank draws alike.
        starting = self.agents[:1] * 0 if plan.algorithm.shared_model else self.agents
        initial = self.learner.initial_state(
            self.task.initial_parameters(model, starting, config.model.same_init, dtype)
        )
        self.algorithm: Algorithm = plan.algorithm(context, plan.algorithm_plan, initial)
        self.graphed = self._graphed_rounds()
        self.compiled_rounds: CompiledRounds | None = None
        self.compiled_part = ""  # what runtime.compile compiled (`_compile`)
        self.compiled = self._compile(context) if plan.compile else None
        # Each agent's own validation tasks [local agents, tasks, ...], or None: every agent is
        # scored on the shared validation tasks (and weights).
        self.own_tasks = self._own_validation_tasks()
        if self.own_tasks is None:
            self.validation_tasks = self.task.validation_set(config.validation)
            self.validation_weights = self.task.validation_weights()
        # Each agent's own test tasks, scored at every logged row (None: the family has none).
        self.own_test = self.task.own_test_set(self.agents)
        if self.own_test is not None and is_import_path(config.problem):
            check_batch(self.own_test, (len(self.agents), None), f"{config.problem} own_test_set")
        self.validation_steps = self.algorithm.evaluation_steps(
            config.validation.inner_steps or config.learner.inner_steps
        )
        self.stationarity_halves = self._stationarity_halves()
        self.window = RowWindow(len(self.agents), self.device)
        self.checkpoint = checkpoint_path(out_path)
        self.writer: RunWriter | None = None
        self.summary: list[str] = []  # lines rank 0 prints when the run completes
        self.start = time.perf_counter()

    def _graphed_rounds(self) -> GraphedRounds | None:
        """The algorithm's rounds replayed from a CUDA graph where runtime.cuda_graph asks and
        the round can be captured; None: plain rounds."""
        capturable = self.plan.cuda_graph and self.task.draws_by_counter
        device_round = self.algorithm.device_round() if capturable else None
        setting = self.config.runtime.cuda_graph
        if device_round is None:
            if setting == "true":
                raise DmetaError(
                    f"runtime.cuda_graph = true, but this run cannot capture its round "
                    f"(strategy {self.config.strategy!r} sends rows between ranks, changes its "
                    f"graph or varies its shapes, or problem {self.config.problem!r} draws its "
                    "tasks with host work): use runtime.cuda_graph=auto or false"
                )
            return None
        return GraphedRounds(device_round, self.device, fallback=setting == "auto")

    def _compile(self, context: Context) -> CompiledStep:
        """runtime.compile, the largest part that compiles to one program of fixed shapes
        (`compiled_part`). On the CPU: the whole round where the algorithm has it as device
        work (`device_round`: task draws, meta-gradients, the outer step and the mix;
        `CompiledRounds`), else its local training where it offers that (`compile_training`:
        the round's exchange stays eager); elsewhere, and on a GPU, the training step's
        meta-gradients."""
        fallback = self.config.runtime.compile == "auto"
        cpu = self.graphed is None and self.device.type == "cpu"
        device_round = None
        if cpu and self.task.draws_by_counter:
            device_round = self.algorithm.device_round()
        if device_round is not None:
            self.compiled_part = "round"
            self.compiled_rounds = CompiledRounds(device_round, self.device, fallback)
            return self.compiled_rounds.step
        compiler = functools.partial(
            CompiledStep, device=self.device, fallback=fallback, name="local training",
            whole=True,
        )  # fmt: skip
        training = self.algorithm.compile_training(compiler) if cpu else None
        if training is not None:
            self.compiled_part = "training"
            return training
        self.compiled_part = "meta_gradients"
        compiled = CompiledStep(context.meta_gradients, self.device, fallback)
        if self.graphed is not None:
            compiled.within_captured_rounds()
        context.meta_gradients = compiled
        return compiled

    def _own_validation_tasks(self) -> TaskBatch | None:
        """This rank's agents' own validation tasks with `validation.own_tasks` (None without);
        DmetaError where the task family draws none."""
        config = self.config
        if not config.validation.own_tasks:
            return None
        tasks = self.task.own_validation_set(self.agents, config.validation)
        if tasks is None:
            raise DmetaError(
                f"validation.own_tasks = true, but problem = {config.problem!r} has no "
                "validation tasks of each agent's own (TaskFamily.own_validation_set): set "
                "validation.own_tasks = false"
            )
        if is_import_path(config.problem):
            check_batch(tasks, (len(self.agents), None), f"{config.problem} own_validation_set")
        return tasks

    def _stationarity_halves(self) -> list[TaskBatch]:
        """The two task halves of the stationarity estimate (Theorem 2); one where both halves
        are the same task, none where validation.stationarity_tasks = 0 turns it off."""
        config = self.config
        if config.validation.stationarity_tasks == 0:
            return []
        # Drawn at a counter given by the run's config, so the runs of a sweep have
        # independent stationarity sets and their noise averages out across the sweep.
        stationarity = self.task.sample(
            self.agents,
            config_digest(config),
            config.validation.stationarity_tasks,
            stream=rng.STREAM_STATIONARITY,
        )
        if is_import_path(config.problem):  # a family of one's own: its batches' shapes
            if self.own_tasks is None:
                check_batch(self.validation_tasks, (None,), f"{config.problem} validation_set")
            check_batch(stationarity, (len(self.agents), None), f"{config.problem} sample")
        # Population mode with fixed heads draws all of an agent's heads, whatever was asked.
        # A family with one fixed task per agent (federated data) has an exact meta-gradient:
        # that task is both halves, and the estimate is ||grad J||^2 itself.
        half = stationarity.support_x.shape[1] // 2
        if not half:
            return [stationarity]
        return [
            TaskBatch(*(part[:, :half] for part in stationarity)),
            TaskBatch(*(part[:, half:] for part in stationarity)),
        ]

    def resume(self) -> tuple[int, int]:
        """Put the checkpoint's state back; returns (first iteration, rows in the run file)."""
        snapshot = load_checkpoint(self.checkpoint, self.plan.layout.agents(self.rank))
        rows = {
            name: torch.as_tensor(value, device=self.device)
            for name, value in snapshot.agent_rows.items()
        }
        shared = {
            name: torch.as_tensor(value, device=self.device)
            for name, value in snapshot.shared.items()
        }
        self.algorithm.load_state(rows, shared)
        self.window.restore(snapshot.window_rows, snapshot.window_steps)
        return snapshot.iteration + 1, snapshot.rows

    def open(self, comm: Any, resumed_rows: int | None) -> None:
        """Open the run file (collective); a new run also writes its fixed datasets."""
        exchange = self.exchange
        # All ranks synchronise here: every rank learns where the others run, for the run file.
        hosts = exchange.allgather_object(platform.node())
        devices = exchange.allgather_object(str(self.device))
        attributes = exchange.allgather_object(
            run_attributes(self.plan, exchange.size, hosts, devices) if self.rank == 0 else None
        )[0]
        # Which code took the training meta-gradients (runtime.closed_form).
        closed = isinstance(self.learner, ClosedFormMAML)
        attributes["meta_gradients"] = "closed_form" if closed else "torch.func"
        if resumed_rows is None and self.rank == 0:
            # A checkpoint of an earlier run must never be taken for one of this run.
            self.checkpoint.unlink(missing_ok=True)
        series = score_series(self.task.scores) | self.task.series
        if self.own_tasks is not None:
            series |= own_task_series(self.task.scores)
        if self.own_test is not None:
            series |= own_test_series(self.task.scores)
        series |= self.plan.algorithm.row_series(self.plan.algorithm_plan)
        self.writer = open_writer(
            self.config.output.writer, self.out_path, comm, exchange, self.plan.layout,
            attributes, self.config.output.flush_every, RowSchema(series), resumed_rows,
        )  # fmt: skip
        if resumed_rows is None:
            self._write_header()
        self.writer.live()

    def _write_header(self) -> None:
        record = self.plan.algorithm.topology(self.plan.algorithm_plan)
        if record is not None:
            self.writer.write_global(
                "topology/edges", record.edges, units="1", description="(l, k) agent ids"
            )
            self.writer.write_global(
                "topology/weights", record.weights, units="1", description="a[l, k] of each edge"
            )
            self.writer.set_attributes("topology", **record.attributes)
        weights = "uniform" if self.algorithm.centroid_weights() is None else "perron"
        for name in ("centroid/disagreement", "centroid/stationarity", "metrics/disagreement"):
            # Which network average w_c these series use (Theorem 1's centroid).
            self.writer.set_attributes(name, centroid_weights=weights)
        for name, array in self.task.arrays().items():
            self.writer.write_global(name, array.cpu().numpy())
        self._write_models("params/initial", "launch models w_{k,0}")

    def _write_models(self, name: str, what: str) -> None:
        """The launch models as /`name`: one flattened row per agent, or the one row of a shared
        model (every agent's; attribute shared = True), never K copies of it."""
        models = self.algorithm.models().detach()
        if self.algorithm.shared_model:
            self.writer.write_global(
                name,
                models[:1].cpu().numpy(),
                units="parameter units",
                description=f"{what}: the shared (server) model, every agent's, one row",
                shared=True,
            )
            return
        self.writer.write_agents(
            name,
            models.cpu().numpy(),
            units="parameter units",
            description=f"{what}, one flattened row per agent",
            shared=False,
        )

    def _weighted(self, rows: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """This rank's share of the network average sum_k p_k rows_k (p_k = 1/K by default)."""
        if weights is None:
            return rows.sum(dim=0) / self.config.agents
        return (weights.to(rows.dtype)[:, None] * rows).sum(dim=0)

    def _centroid(self, models: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """The network centroid w_c = sum_k p_k w_k (Theorem 1); a shared model is its own."""
        if self.algorithm.shared_model:
            return models[0]  # the same on every rank
        # All ranks synchronise here (on a logged row: 1 of 2): the centroid, one all-reduce.
        return self.exchange.allreduce_sum(self._weighted(models, weights))

    def _centroid_gradients(
        self, centroid: torch.Tensor, weights: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """This rank's share of the averaged meta-gradients at the centroid, for both
        stationarity halves (Theorem 2; the aggregate cost weighs agent k by p_k)."""
        expanded = centroid.expand(len(self.agents), -1)
        return [
            self._weighted(self.learner.meta_gradients(expanded, half)[0], weights).to(
                torch.float64
            )
            for half in self.stationarity_halves
        ]

    def _evaluate(self, models: torch.Tensor) -> torch.Tensor:
        """[agents or 1, 1 + scores]: validation loss, then the task's scores, averaged over the
        tasks (weighted by the task's validation weights); a shared model is evaluated once.
        With own tasks, models [local agents, P]: row k on agent k's own tasks."""
        if self.own_tasks is not None:
            return self._evaluate_own(models, self.own_tasks)
        count = len(models)
        scores = tuple(self.task.scores.values())
        at_once = self.config.validation.tasks_at_once
        if self.algorithm.shared_model:
            models = models[:1]
        with torch.no_grad():
            outcome = self.learner.evaluate(
                models, self.validation_tasks, self.validation_steps, scores, at_once
            )
        if self.validation_weights is None:
            means = outcome.mean(dim=1)
        else:
            means = torch.einsum("atj,t->aj", outcome, self.validation_weights.to(outcome))
        return means.expand(count, -1)

    def _evaluate_own(self, models: torch.Tensor, tasks: TaskBatch) -> torch.Tensor:
        """[local agents, 1 + scores]: row k scores agent k's model on its own `tasks`
        [local agents, tasks, ...] (validation or test), the mean over them."""
        with torch.no_grad():
            return self.learner.evaluate_own(
                models,
                tasks,
                self.validation_steps,
                tuple(self.task.scores.values()),
                self.config.validation.tasks_at_once,
            ).mean(dim=1)

    def _centroid_names(self) -> tuple[str, ...]:
        return ("centroid/val_loss", *(f"centroid/val_{name}" for name in self.task.scores))

    def _centroid_own_sums(self, centroid: torch.Tensor, evaluation: torch.Tensor) -> torch.Tensor:
        """This rank's share of the centroid's own-task validation: [1 + scores], the sum over
        its agents of the centroid's scores on each agent's own tasks (for a shared model, the
        agents' scores `evaluation` themselves); empty with the shared validation tasks, on
        which rank 0 alone scores the centroid."""
        if self.own_tasks is None:
            return torch.zeros(0, dtype=torch.float64, device=self.device)
        if not self.algorithm.shared_model:
            evaluation = self._evaluate(centroid.expand(len(self.agents), -1))
        return evaluation.sum(dim=0).to(torch.float64)

    def _rank0_scalars(
        self, centroid: torch.Tensor, began: float, evaluation: torch.Tensor
    ) -> dict[str, float]:
        """The scalars only rank 0 computes: clocks and, with the shared validation tasks, the
        centroid's validation (NaN on the other ranks, whose values the writer ignores). A
        shared model is its own centroid: its row of `evaluation` is the centroid's."""
        names = ("time/wall", "time/comm", "time/compute", "time/log")
        if self.own_tasks is None:
            names += self._centroid_names()
        if self.rank != 0:
            return dict.fromkeys(names, math.nan)
        own = self.own_tasks is not None
        if own:
            scores = []
        elif self.algorithm.shared_model:
            scores = evaluation[0].tolist()
        else:
            scores = self._evaluate(centroid[None])[0].tolist()
        wall = time.perf_counter() - self.start
        window = self.window
        values = [
            wall,
            window.comm_seconds,
            began - window.started - window.comm_seconds,
            wall - began,
            *scores,
        ]
        return dict(zip(names, values, strict=True))

    def log_row(self, iteration: int, progress: Progress) -> None:
        """Evaluate and append the row of `iteration` (a collective call)."""
        synchronize(self.device)
        began = time.perf_counter() - self.start
        models = self.algorithm.models().detach()
        num_agents = self.config.agents
        weights = self.algorithm.centroid_weights()
        centroid = self._centroid(models, weights)
        # Every rank sees the same centroid, so all stop together on a diverged run.
        if not torch.isfinite(centroid).all():
            raise AgreedError(
                f"the run diverged by iteration {iteration} (non-finite launch models); "
                "lower optimizer.lr or learner.inner_lr"
            )
        evaluation = self._evaluate(models)
        if self.algorithm.shared_model:  # no K x P difference of identical rows
            spread = disagreement(models[:1], centroid).expand(len(models))
        else:
            spread = disagreement(models, centroid)
        train = self.window.mean_train_loss()
        halves = self._centroid_gradients(centroid, weights)
        centroid_own = self._centroid_own_sums(centroid, evaluation)
        means = torch.stack([spread.sum(), train.sum(), evaluation[:, 0].sum()])
        # All ranks synchronise here (2 of 2): network sums of both half-gradients, of the
        # centroid's scores on every agent's own validation tasks (validation.own_tasks: each
        # rank scores the centroid on its agents' tasks) and of the per-agent metrics the
        # progress line and /centroid/disagreement need.
        sums = self.exchange.allreduce_sum(
            torch.cat([*halves, centroid_own, means.to(torch.float64)])
        )
        size = centroid.shape[0]
        gradients = sums[: len(halves) * size].view(len(halves), size)
        mean_spread, mean_train, mean_validation = (sums[-3:] / num_agents).tolist()
        scalars = {"centroid/disagreement": mean_spread} | stationarity_scalars(gradients)
        if self.own_tasks is not None:
            own = sums[len(halves) * size : -3] / num_agents
            scalars |= dict(zip(self._centroid_names(), own.tolist(), strict=True))
        scalars |= self._rank0_scalars(centroid, began, evaluation)
        progress.row(iteration, mean_train, mean_validation, scalars)
        task_rows, task_scalars = self.task.row_metrics(models, centroid)
        extra = self.algorithm.row_values()
        scalars |= task_scalars | {k: float(v) for k, v in extra.items() if not torch.is_tensor(v)}
        per_agent = {
            **task_rows,
            **{k: v for k, v in extra.items() if torch.is_tensor(v)},
            "metrics/train_loss": train,
            "metrics/val_loss": evaluation[:, 0],
            **{f"metrics/val_{n}": evaluation[:, 1 + j] for j, n in enumerate(self.task.scores)},
            "metrics/disagreement": spread,
            "metrics/grad_norm": self.window.gradient_norm,
            "comm/bytes": self.window.comm_bytes,
        }
        if self.own_test is not None:
            test = self._evaluate_own(models, self.own_test)
            names = ("loss", *self.task.scores)
            per_agent |= {f"metrics/test_{n}": test[:, j] for j, n in enumerate(names)}
        self.writer.append(iteration, scalars, {k: v.cpu().numpy() for k, v in per_agent.items()})
        self.window.reset(time.perf_counter() - self.start)

    def save(self, iteration: int) -> None:
        """Checkpoint after `iteration` (a collective call)."""
        # All ranks synchronise here: the run file is flushed to the rows the checkpoint
        # counts, then every rank sends its agents' rows to rank 0.
        self.writer.flush()
        snapshot = Snapshot(
            iteration=iteration,
            rows=self.writer.rows,
            agent_rows=_numpy_rows(self.algorithm.state_rows()),
            shared=_numpy_rows(self.algorithm.state_shared()),
            window_rows=self.window.rows(),
            window_steps=self.window.steps,
        )
        save_checkpoint(self.checkpoint, snapshot, self.exchange, self.config)

    def poll(
        self, last_checkpoint: float, stop_requested: Any, iteration: int
    ) -> tuple[bool, bool]:
        """(stop, clock due): the ranks agree on signals, on rank 0's clock and on whether any
        launch model has diverged (AgreedError on every rank)."""
        minutes = (time.perf_counter() - last_checkpoint) / 60
        clock = self.rank == 0 and 0 < self.config.checkpoint.every_minutes <= minutes
        signal = bool(stop_requested and stop_requested())
        diverged = not bool(torch.isfinite(self.algorithm.models()).all())
        # All ranks synchronise here, every poll_every iterations: one 3-number all-reduce.
        flags = self.exchange.allreduce_sum(
            torch.tensor([float(signal), float(clock), float(diverged)])
        )
        if flags[2] > 0:
            raise AgreedError(
                f"the run diverged by iteration {iteration} (non-finite launch models); "
                "lower optimizer.lr or learner.inner_lr"
            )
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _logged(self, iteration: int) -> bool:
        config = self.config
        return (
            iteration % config.log_every == 0
            or iteration <= config.log_every_iteration_until
            or iteration == config.iterations
        )

    def loop(self, first: int, show_progress: bool, stop_requested: Any) -> int | None:
        """Rounds first..T with their rows and checkpoints; the iteration a stop came after,
        or None when every round ran."""
        config = self.config
        enabled = self.rank == 0 and show_progress
        progress = Progress(config.iterations, enabled, config.output.progress_seconds)
        progress.start_at(first - 1)
        if first == 1:
            self.log_row(0, progress)
        last_checkpoint = time.perf_counter()
        try:
            rounds = self.graphed or self.compiled_rounds or self.algorithm.round
            for iteration in range(first, config.iterations + 1):
                self.window.add(rounds(iteration))
                if iteration == first:
                    self._report_compile(progress)
                if iteration == first + WARMUP_ROUNDS and self.graphed is not None:
                    self._report_capture(progress)
                progress.advance()
                if self._logged(iteration):
                    self.log_row(iteration, progress)
                every = config.checkpoint.every_iterations
                due, stop = every > 0 and iteration % every == 0, False
                if iteration % config.checkpoint.poll_every == 0:
                    stop, clock = self.poll(last_checkpoint, stop_requested, iteration)
                    due = due or clock
                if iteration == config.iterations:
                    # A run without a final evaluation completes now; one with it saves first,
                    # so that a failure or a stop during the evaluation loses no training.
                    final = self.task.final_evaluation
                    due, stop = final, stop and final
                if stop or due:
                    self.save(iteration)
                    last_checkpoint = time.perf_counter()
                if stop:
                    return iteration
        finally:
            progress.close()
        return None

    def _report_compile(self, progress: Progress) -> None:
        """Rank 0 says how long compiling the training step took (its first call)."""
        if self.compiled is None or self.compiled.seconds is None:
            return
        setting = self.config.runtime
        reason = (
            f"runtime.compile = auto: {self.config.iterations} iterations >= compile_after "
            f"{setting.compile_after}"
            if setting.compile == "auto"
            else "runtime.compile = true"
        )
        progress.exclude(self.compiled.seconds)
        progress.say(
            f"dmeta: compiled the {self.compiled.name} in {self.compiled.seconds:.1f} s ({reason})"
        )

    def _report_capture(self, progress: Progress) -> None:
        """Rank 0 says how long capturing the round as a CUDA graph took."""
        seconds = self.graphed.capture_seconds
        if seconds is not None:
            progress.exclude(seconds)
            progress.say(f"dmeta: captured the training round as a CUDA graph in {seconds:.2f} s")

    def final_evaluation(self) -> None:
        """Meta-test scores per agent and the network's interval (a collective call)."""
        if self.task.final_per_task:
            self._final_per_task()
            return
        models = self.algorithm.models().detach()
        scores = tuple(self.task.scores.values())
        steps = self.validation_steps
        with torch.no_grad():
            # [agents, tests, 1 + scores], evaluated one group of tasks at a time.
            batches = self.task.test_batches(self.config.validation.tasks_at_once)
            outcome = torch.cat(
                [self.learner.evaluate(models, batch, steps, scores) for batch in batches], dim=1
            ).to(torch.float64)
        # All ranks synchronise here: per-task sums over agents for the network's interval.
        network = self.exchange.allreduce_sum(outcome.sum(dim=0)) / self.config.agents
        for j, name in enumerate(("loss", *self.task.scores)):
            per_task = outcome[..., j]
            units = "1" if name != "loss" else "loss units"
            self.summary.append(
                f"meta-test {name}: {float(network[:, j].mean()):.4f} +- "
                f"{float(confidence_interval_95(network[:, j])):.4f} (network mean over "
                f"{per_task.shape[1]} tasks, 95% interval)"
            )
            self.writer.write_agents(
                f"final/test_{name}",
                per_task.mean(dim=1).cpu().numpy(),
                units=units,
                description=(
                    f"query {name} after {steps} inner steps, mean over "
                    f"{per_task.shape[1]} fixed meta-test tasks, one value per agent"
                ),
                network_mean=float(network[:, j].mean()),
                network_ci95=float(confidence_interval_95(network[:, j])),
            )
            self.writer.write_agents(
                f"final/test_{name}_ci95",
                confidence_interval_95(per_task).cpu().numpy(),
                units=units,
                description=f"half-width of the 95% normal confidence interval of {name}",
            )

    def _final_per_task(self) -> None:
        """The centroid's (a shared model's) scores on each test task, one value per task, and
        their weighted network mean and 95% interval (a collective call)."""
        models = self.algorithm.models().detach()
        model = self._centroid(models, self.algorithm.centroid_weights()).to(models)
        outcome = None
        if self.rank == 0:  # rank 0 holds agent 0; the others receive its scores
            scores = tuple(self.task.scores.values())
            batches = self.task.test_batches(self.config.validation.tasks_at_once)
            with torch.no_grad():
                outcome = (
                    torch.cat(
                        [
                            self.learner.evaluate(
                                model[None], batch, self.validation_steps, scores
                            )[0]
                            for batch in batches
                        ]
                    )
                    .to(torch.float64)
                    .cpu()
                    .numpy()
                )
        # All ranks synchronise here: every rank writes the same datasets and attributes.
        outcome = self.exchange.allgather_object(outcome)[0]
        weights = self.task.test_weights()
        weights = (
            np.full(len(outcome), 1 / len(outcome)) if weights is None else weights.cpu().numpy()
        )
        for j, name in enumerate(("loss", *self.task.scores)):
            values = outcome[:, j]
            self.writer.write_global(
                f"final/test_{name}",
                values,
                units="1" if name != "loss" else "loss units",
                description=(
                    f"query {name} of each test task after {self.validation_steps} inner steps "
                    "on its support set, with the network centroid (the server model)"
                ),
                network_mean=float(weights @ values),
                network_ci95=weighted_ci95(values, weights),
            )

    def finish(self) -> None:
        """Final evaluation, final models, and the run file under its final name."""
        if self.task.final_evaluation:
            self.final_evaluation()
        self._write_models("params/final", "launch models after the last iteration")
        if self.compiled is not None:
            # All ranks synchronise here: the slowest rank's compilation (its first call); NaN
            # where a rank's compilation failed and it ran eagerly.
            times = self.exchange.allgather_object(self.compiled.seconds)
            seconds = math.nan if None in times else max(times)
            part = self.compiled_part
            self.writer.set_attributes("time", compile_seconds=seconds, compiled_part=part)
        # All ranks synchronise here (whatever their devices): "replayed" where every rank
        # that tried to capture its rounds succeeded.
        graphs = self.exchange.allgather_object(
            None if self.graphed is None else self.graphed.graph is not None
        )
        if any(graph is not None for graph in graphs):
            replayed = all(graph is not False for graph in graphs)
            self.writer.set_attributes("time", cuda_graph="replayed" if replayed else "eager")
        self.writer.finish()
        if self.rank == 0:
            self.checkpoint.unlink(missing_ok=True)


# What torch's CUDA calls and the host allocator say when an allocation fails.
_ALLOCATION_FAILED = ("can't allocate memory", "CUDA error: out of memory", "ALLOC_FAILED")


def _out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: a GPU's, or the host's."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(error, OSError):
        return error.errno == errno.ENOMEM
    return isinstance(error, RuntimeError) and any(s in str(error) for s in _ALLOCATION_FAILED)


def _memory_advice(plan: RunPlan, agents: int, error: BaseException) -> str:
    """One line: where memory ran out, and what to change."""
    at_once = min(plan.agents_at_once or agents, agents)
    gpu = isinstance(error, torch.OutOfMemoryError) or "CUDA" in str(error)
    where = plan.device if gpu else "the host"
    smaller = (
        f"set runtime.agents_at_once below {at_once}, or run on more ranks or GPUs"
        if at_once > 1
        else "run on more ranks or GPUs, or with fewer agents or a smaller model"
    )
    cause = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (
        f"out of memory on {where} with {agents} agents on this rank, {at_once} of them at "
        f"once: {smaller} ({cause})"
    )


def execute(
    plan: RunPlan,
    comm: Any,
    out_path: Path,
    show_progress: bool = True,
    resume: bool = False,
    stop_requested: Any = None,
) -> int | None:
    """Run the plan's algorithm and write the run file.

    `comm` is the MPI communicator of the run, or None for the local backend. With `resume`,
    continue from the checkpoint next to `out_path` (checked by `check_checkpoint`).
    `stop_requested()` says whether this process received SIGTERM or SIGUSR1; the ranks agree
    on it every `checkpoint.poll_every` iterations, then checkpoint and stop. Returns None when
    the run completed, or the iteration after which it stopped with a checkpoint.
    """
    torch.set_num_threads(plan.threads)
    if plan.config.runtime.keep_freed_memory:
        hostmemory.keep_freed_memory()
    if plan.device.type == "cuda":
        torch.cuda.set_device(plan.device)
    exchange = build_exchange(plan, comm)
    failure = None
    try:  # no collective in here: a rank that fails (e.g. unreadable data) still agrees below
        engine = Engine(plan, exchange, Path(out_path))
        first, rows = engine.resume() if resume else (1, None)
    except DmetaError as error:
        failure = str(error)
    except Exception as error:  # building the run's state may need more memory than there is
        if not _out_of_memory(error):
            raise
        failure = _memory_advice(plan, exchange.num_local, error)
    # All ranks synchronise here: any rank's error in building the run stops every rank.
    agree(exchange.allgather_object(failure))
    if resume and show_progress and exchange.rank == 0:
        print(f"dmeta: resuming from iteration {first - 1}", file=sys.stderr, flush=True)
    engine.open(comm, rows)
    try:
        stopped = engine.loop(first, show_progress, stop_requested)
        if stopped is None:
            engine.finish()
            if engine.summary and show_progress and exchange.rank == 0:
                print(*engine.summary, sep="\n", file=sys.stderr, flush=True)
        else:
            engine.writer.close()
    except BaseException as error:
        engine.writer.abandon()
        if _out_of_memory(error):
            raise DmetaError(_memory_advice(plan, exchange.num_local, error)) from None
        raise
    # Not on failure: freeing communicators is collective, and the job is about to abort.
    exchange.close()
    return stopped
