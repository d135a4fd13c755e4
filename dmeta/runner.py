"""The runner: wires config, tasks, learner, optimizer, combination backend and output.

A run has two phases. `plan_run` does everything that can fail on bad input (config ranges,
graph, combination matrix, rank layout, device) without communicating, so the entry point can
agree on errors across ranks before any collective starts. `execute` then runs Algorithm 1.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dmeta
from dmeta import rng, topology
from dmeta.checkpoint import Snapshot, checkpoint_path, load_checkpoint, save_checkpoint
from dmeta.combine import disagreement
from dmeta.comm import (
    AgentLayout,
    AllreduceCombiner,
    Collectives,
    MatrixCombiner,
    MPICollectives,
    NeighborCombiner,
    SerialCollectives,
)
from dmeta.config import Config, LearnerConfig
from dmeta.errors import DmetaError
from dmeta.fewshot import FewShotTask, check_sources, confidence_interval_95
from dmeta.meta import MAML, Reptile
from dmeta.models import FlatModel
from dmeta.output import RowSchema, open_writer, parallel_hdf5_available
from dmeta.tasks import LinearRepresentationTask, SineTask, TaskBatch, TaskFamily

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class RunPlan:
    """Everything a rank needs to start, checked; built identically on every rank."""

    config: Config
    backend: str
    layout: AgentLayout
    rank: int
    matrix: np.ndarray
    report: topology.MatrixReport
    device: torch.device
    threads: int


def strategy_matrix(config: Config) -> np.ndarray:
    """The combination matrix a strategy applies: A of the graph, J/K, or the identity."""
    num_agents = config.agents
    if config.strategy == "centralized":
        return np.full((num_agents, num_agents), 1.0 / num_agents)
    if config.strategy == "noncooperative":
        return np.eye(num_agents)
    graph = topology.build_graph(config.graph, num_agents)
    matrix = topology.combination_matrix(graph, config.graph.rule, config.graph.matrix_path)
    topology.validate_combination_matrix(matrix, require_connected=True)
    return matrix


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU, so that host clocks time it; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_device(requested: str, local_rank: int) -> torch.device:
    """`auto` or `cuda`: GPU local_rank % GPU count (`auto` falls back to the CPU)."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DmetaError(
            f"runtime.device = {requested!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DmetaError(f"runtime.device = {requested!r} but CUDA is not available here")
        if device.index is None:  # plain "cuda": spread the ranks of a node over its GPUs
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DmetaError(
                f"runtime.device = {requested!r} but only {torch.cuda.device_count()} GPUs "
                "are visible"
            )
    elif device.type != "cpu":
        raise DmetaError(
            f"runtime.device = {requested!r} is not supported; use auto, cpu, cuda or cuda:N"
        )
    return device


def plan_run(config: Config, size: int, rank: int, local_rank: int, local_size: int) -> RunPlan:
    """Check the run and decide its layout; raises DmetaError on bad input, communicates not."""
    backend = config.runtime.backend
    if backend == "auto":
        backend = "mpi" if size > 1 else "local"
    if backend == "local" and size > 1:
        raise DmetaError(
            f"runtime.backend = 'local' holds every agent in one process, but {size} ranks were "
            "launched: use runtime.backend=mpi (or auto), or run without mpiexec"
        )
    if config.output.writer == "parallel":
        if not parallel_hdf5_available():
            raise DmetaError(
                "output.writer = 'parallel' needs h5py built with MPI (h5py.get_config().mpi is "
                "False here; see the README's parallel HDF5 section) or use output.writer=serial"
            )
        if backend != "mpi":
            raise DmetaError(
                "output.writer = 'parallel' needs the mpi backend: launch with mpiexec and "
                "runtime.backend=mpi (or auto with more than one rank)"
            )
    if config.problem == "fewshot":
        check_sources(config.fewshot)
    layout = AgentLayout(config.agents, size)
    matrix = strategy_matrix(config)
    report = topology.describe(matrix)
    device = choose_device(config.runtime.device, local_rank)
    threads = config.runtime.threads or max(1, len(os.sched_getaffinity(0)) // local_size)
    return RunPlan(config, backend, layout, rank, matrix, report, device, threads)


def build_combiner(plan: RunPlan, comm: Any, collectives: Collectives, dtype: torch.dtype):
    """The combination step of the plan's strategy and backend (None: no combination)."""
    strategy = plan.config.strategy
    if strategy == "noncooperative":
        return None
    if strategy == "centralized":
        return AllreduceCombiner(collectives, plan.config.agents)
    if plan.backend == "local":
        return MatrixCombiner(plan.matrix, dtype, plan.device)
    return NeighborCombiner(comm, plan.matrix, plan.layout, dtype, plan.device)


def build_task(config: Config, dtype: torch.dtype, device: torch.device) -> TaskFamily:
    """The task family of `problem`, seeded by the run."""
    if config.problem == "linear_representation":
        return LinearRepresentationTask(config.linear, config.agents, config.seed, dtype, device)
    if config.problem == "fewshot":
        return FewShotTask(config.fewshot, config.agents, config.seed, dtype, device)
    return SineTask(config.task, config.agents, config.seed, dtype, device)


def build_learner(settings: LearnerConfig, model: FlatModel, task: TaskFamily) -> MAML:
    """The meta-learner `learner.name` on `model` and `task` (see dmeta/meta.py)."""
    name = settings.name
    forward, loss = task.learner_functions(model)
    if name == "reptile":
        return Reptile(forward, loss, settings.inner_lr, settings.inner_steps)
    return MAML(
        forward,
        loss,
        settings.inner_lr,
        0 if name == "arm" else settings.inner_steps,
        first_order=name in ("fomaml", "foanil"),
        inner_mask=model.head_mask() if name in ("anil", "foanil") else None,
        learned_inner_lr=name == "metasgd",
    )


def build_optimizer(plan: RunPlan, launch_models: torch.Tensor) -> torch.optim.Optimizer:
    """The outer update of eq. (6a). Element-wise, so each agent's row keeps its own state."""
    settings = plan.config.optimizer
    if settings.name == "sgd":
        return torch.optim.SGD([launch_models], lr=settings.lr)
    return torch.optim.Adam(
        [launch_models], lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps
    )


def git_commit() -> str:
    """The commit of the dmeta source tree, or "" outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(dmeta.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def run_attributes(
    plan: RunPlan, size: int, hosts: list[str], devices: list[str]
) -> dict[str, Any]:
    """Root attributes of the run file: the config, versions, and where each rank ran."""
    import h5py

    attributes = {
        "config": plan.config.to_json(),
        "dmeta_version": dmeta.__version__,
        "git_commit": git_commit(),
        "torch_version": str(torch.__version__),
        "numpy_version": np.__version__,
        "h5py_version": h5py.__version__,
        "hdf5_version": h5py.version.hdf5_version,
        "world_size": size,
        "seed": plan.config.seed,
        "strategy": plan.config.strategy,
        "backend": plan.backend,
        "hosts_per_rank": hosts,
        "devices_per_rank": devices,
        "agent_counts_per_rank": plan.layout.counts,
        "agent_offsets_per_rank": plan.layout.offsets,
        "stationarity_tasks_per_agent": plan.config.validation.stationarity_tasks,
        "stationarity_tasks_total": plan.config.validation.stationarity_tasks * plan.config.agents,
        "writer": plan.config.output.writer,
    }
    if plan.backend == "mpi":
        import mpi4py
        from mpi4py import MPI

        attributes["mpi4py_version"] = mpi4py.__version__
        # Open MPI pads its version string with NUL bytes, which HDF5 strings cannot hold.
        library = MPI.Get_library_version().replace("\x00", "")
        attributes["mpi_library"] = library.strip().splitlines()[0].strip()
    return attributes


class Progress:
    """Rank 0's progress: a bar on a terminal, one line per logged row otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="it", dynamic_ncols=True)

    def advance(self, iterations: int = 1) -> None:
        if self.bar is not None and iterations:
            self.bar.update(iterations)

    def row(
        self, iteration: int, mean_train: float, mean_validation: float, scalars: dict[str, float]
    ) -> None:
        """One line: network means over agents and the centroid's metrics."""
        if not self.enabled:
            return
        train_text = "-" if math.isnan(mean_train) else f"{mean_train:.4f}"
        line = (
            f"iteration {iteration:>7d}  train {train_text:>7}  val {mean_validation:.4f}  "
            f"centroid val {scalars['centroid/val_loss']:.4f}  "
            + (
                f"centroid acc {scalars['centroid/val_accuracy']:.3f}  "
                if "centroid/val_accuracy" in scalars
                else ""
            )
            + f"disagreement {scalars['centroid/disagreement']:.3e}  "
            f"stationarity {scalars['centroid/stationarity']:.3e}"
        )
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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

    def add(self, losses: torch.Tensor, gradients: torch.Tensor) -> None:
        """One iteration's meta-training losses [agents] and meta-gradients [agents, M]."""
        self.train_sum += losses.detach().to(torch.float64)
        self.gradient_norm = torch.linalg.vector_norm(gradients, dim=1).to(torch.float64)
        self.steps += 1

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
        """Continue a window saved by `rows` after `steps` iterations."""
        for name, values in rows.items():
            setattr(self, name, torch.as_tensor(values, device=self.device))
        self.steps = steps


def optimizer_snapshot(
    optimizer: torch.optim.Optimizer, parameter: torch.Tensor
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The outer optimizer's state: per-agent rows (Adam's moments) and shared scalars (step)."""
    rows, shared = {}, {}
    for name, value in optimizer.state.get(parameter, {}).items():
        # A copy: the live state keeps changing after the snapshot is taken.
        array = value.detach().cpu().numpy().copy() if torch.is_tensor(value) else np.array(value)
        if array.ndim and array.shape[0] == parameter.shape[0]:
            rows[name] = array
        else:
            shared[name] = array
    return rows, shared


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    parameter: torch.Tensor,
    rows: dict[str, np.ndarray],
    shared: dict[str, np.ndarray],
) -> None:
    """Put the state saved by `optimizer_snapshot` back, on the parameter's device."""
    state = {name: torch.tensor(array, device=parameter.device) for name, array in rows.items()}
    # Scalars such as Adam's step stay where torch keeps them (on the CPU).
    state |= {name: torch.tensor(array) for name, array in shared.items()}
    if state:
        optimizer.state[parameter] = state


def execute(
    plan: RunPlan,
    comm: Any,
    out_path: Path,
    show_progress: bool = True,
    resume: bool = False,
    stop_requested: Any = None,
) -> int | None:
    """Run Algorithm 1 (Dif-MAML) or a baseline and write the run file.

    `comm` is the MPI communicator of the run, or None for the local backend. With `resume`,
    continue from the checkpoint next to `out_path` (checked by `check_checkpoint`).
    `stop_requested()` says whether this process received SIGTERM or SIGUSR1; the ranks agree
    on it every `checkpoint.poll_every` iterations, then checkpoint and stop. Returns None when
    the run completed, or the iteration after which it stopped with a checkpoint.
    """
    config = plan.config
    torch.set_num_threads(plan.threads)
    if plan.device.type == "cuda":
        torch.cuda.set_device(plan.device)
    dtype = DTYPES[config.runtime.dtype]
    device = plan.device
    if comm is None:
        collectives: Collectives = SerialCollectives(config.agents)
        size = 1
    else:
        collectives = MPICollectives(comm, plan.layout)
        size = comm.Get_size()
    rank = collectives.rank
    agent_ids = plan.layout.agents(rank)
    agents = torch.as_tensor(agent_ids, device=device)

    task = build_task(config, dtype, device)
    model = task.build_model(config.model)
    learner = build_learner(config.learner, model, task)
    # Only the training step is compiled: its shapes never change, so it compiles once.
    step_gradients = (
        torch.compile(learner.meta_gradients) if config.runtime.compile else learner.meta_gradients
    )
    validation_tasks = task.validation_set(config.validation)
    validation_steps = config.validation.inner_steps or config.learner.inner_steps
    scores = tuple(task.scores.values())
    tasks_at_once = config.validation.tasks_at_once
    stationarity_tasks = task.sample(
        agents, 0, config.validation.stationarity_tasks, stream=rng.STREAM_STATIONARITY
    )
    # Population mode with fixed heads draws all of an agent's heads, whatever was asked.
    half = stationarity_tasks.support_x.shape[1] // 2
    stationarity_halves = [
        TaskBatch(*(part[:, :half] for part in stationarity_tasks)),
        TaskBatch(*(part[:, half:] for part in stationarity_tasks)),
    ]
    combiner = build_combiner(plan, comm, collectives, dtype)

    launch_models = learner.initial_state(
        task.initial_parameters(model, agents, config.model.same_init, dtype)
    )
    launch_models.requires_grad_(True)
    optimizer = build_optimizer(plan, launch_models)
    window = RowWindow(len(agents), device)
    checkpoint = checkpoint_path(out_path)
    first_iteration, resumed_rows = 1, None
    if resume:
        snapshot = load_checkpoint(checkpoint, agent_ids)
        with torch.no_grad():
            launch_models.copy_(torch.as_tensor(snapshot.launch_models, device=device))
        restore_optimizer(
            optimizer, launch_models, snapshot.optimizer_rows, snapshot.optimizer_shared
        )
        window.restore(snapshot.window_rows, snapshot.window_steps)
        first_iteration, resumed_rows = snapshot.iteration + 1, snapshot.rows

    # All ranks synchronise here: every rank learns where the others run, for the run file.
    hosts = collectives.allgather_object(platform.node())
    devices = collectives.allgather_object(str(device))
    attributes = collectives.allgather_object(
        run_attributes(plan, size, hosts, devices) if rank == 0 else None
    )[0]
    if not resume and rank == 0:
        # A checkpoint of an earlier run must never be taken for one of this run.
        checkpoint.unlink(missing_ok=True)
    writer = open_writer(
        config.output.writer,
        out_path,
        comm,
        collectives,
        plan.layout,
        attributes,
        config.output.flush_every,
        RowSchema(task.series),
        resumed_rows,
    )
    try:
        if not resume:
            writer.write_global(
                "topology/A",
                plan.matrix,
                lambda2=plan.report.lambda2,
                doubly_stochastic=plan.report.doubly_stochastic,
                units="1",
                description="a[l, k]: weight agent k gives agent l; columns sum to one",
            )
            for name, array in task.arrays().items():
                writer.write_global(name, array.cpu().numpy())
            writer.write_agents(
                "params/initial",
                launch_models.detach().cpu().numpy(),
                units="parameter units",
                description="launch models w_{k,0}, one flattened row per agent",
            )
        progress = Progress(config.iterations, enabled=rank == 0 and show_progress)
        progress.advance(first_iteration - 1)
        model_bytes = launch_models.shape[1] * launch_models.element_size()
        start = last_checkpoint = time.perf_counter()

        def combine_in_place() -> None:
            synchronize(device)  # host clocks must not time queued GPU work as communication
            began = time.perf_counter()
            with torch.no_grad():
                launch_models.copy_(combiner(launch_models.detach()))
            synchronize(device)
            window.comm_seconds += time.perf_counter() - began
            window.comm_bytes += combiner.bytes_per_agent(model_bytes)

        def log_row(iteration: int) -> None:
            synchronize(device)
            began = time.perf_counter() - start
            models = launch_models.detach()
            # All ranks synchronise here (1 of 2): the centroid, one all-reduce.
            centroid = collectives.allreduce_sum(models.sum(dim=0)) / config.agents
            # Every rank sees the same centroid, so all stop together on a diverged run.
            if not torch.isfinite(centroid).all():
                raise DmetaError(
                    f"the run diverged by iteration {iteration} (non-finite launch models); "
                    "lower optimizer.lr or learner.inner_lr"
                )
            with torch.no_grad():
                # [agents, 1 + scores]: the loss, then the task's scores (e.g. accuracy).
                evaluation = learner.evaluate(
                    models, validation_tasks, validation_steps, scores, tasks_at_once
                ).mean(dim=1)
            validation = evaluation[:, 0]
            spread = disagreement(models, centroid)
            train = window.mean_train_loss()
            expanded = centroid.expand(len(agents), -1)
            first_half, _ = learner.meta_gradients(expanded, stationarity_halves[0])
            second_half, _ = learner.meta_gradients(expanded, stationarity_halves[1])
            # All ranks synchronise here (2 of 2): network sums of both half-gradients and of
            # the per-agent metrics the progress line and /centroid/disagreement need.
            sums = collectives.allreduce_sum(
                torch.cat(
                    [
                        first_half.sum(dim=0).to(torch.float64),
                        second_half.sum(dim=0).to(torch.float64),
                        torch.stack([spread.sum(), train.sum(), validation.sum()]).to(
                            torch.float64
                        ),
                    ]
                )
            )
            num_params = centroid.shape[0]
            gradient_a = sums[:num_params] / config.agents
            gradient_b = sums[num_params : 2 * num_params] / config.agents
            mean_disagreement, mean_train, mean_validation = (
                sums[2 * num_params :] / config.agents
            ).tolist()
            scalars = {
                "centroid/disagreement": mean_disagreement,
                "centroid/stationarity": float(gradient_a @ gradient_b),
                "centroid/stationarity_noise": float((gradient_a - gradient_b).square().sum() / 4),
            }
            if rank == 0:
                with torch.no_grad():
                    centroid_evaluation = learner.evaluate(
                        centroid[None], validation_tasks, validation_steps, scores, tasks_at_once
                    ).mean(dim=1)[0]
                wall = time.perf_counter() - start
                scalars |= {
                    "time/wall": wall,
                    "time/comm": window.comm_seconds,
                    "time/compute": began - window.started - window.comm_seconds,
                    "time/log": wall - began,
                    "centroid/val_loss": float(centroid_evaluation[0]),
                }
                scalars |= {
                    f"centroid/val_{name}": float(value)
                    for name, value in zip(task.scores, centroid_evaluation[1:], strict=True)
                }
                progress.row(iteration, mean_train, mean_validation, scalars)
            else:
                scalars |= dict.fromkeys(
                    (
                        "time/wall",
                        "time/comm",
                        "time/compute",
                        "time/log",
                        "centroid/val_loss",
                        *(f"centroid/val_{name}" for name in task.scores),
                    ),
                    math.nan,
                )
            task_rows, task_scalars = task.row_metrics(models, centroid)
            scalars |= task_scalars
            per_agent = {
                **task_rows,
                "metrics/train_loss": train,
                "metrics/val_loss": validation,
                **{
                    f"metrics/val_{name}": evaluation[:, 1 + j]
                    for j, name in enumerate(task.scores)
                },
                "metrics/disagreement": spread,
                "metrics/grad_norm": window.gradient_norm,
                "comm/bytes": window.comm_bytes,
            }
            writer.append(iteration, scalars, {k: v.cpu().numpy() for k, v in per_agent.items()})
            window.reset(time.perf_counter() - start)

        def save(iteration: int) -> None:
            # All ranks synchronise here: the run file is flushed to the rows the checkpoint
            # counts, then every rank sends its agents' rows to rank 0.
            writer.flush()
            rows, shared = optimizer_snapshot(optimizer, launch_models)
            snapshot = Snapshot(
                iteration=iteration,
                rows=writer.rows,
                launch_models=launch_models.detach().cpu().numpy(),
                optimizer_rows=rows,
                optimizer_shared=shared,
                window_rows=window.rows(),
                window_steps=window.steps,
            )
            save_checkpoint(checkpoint, snapshot, collectives, config)

        def poll() -> tuple[bool, bool]:
            """(stop, clock due): the ranks agree on signals and on rank 0's clock."""
            minutes = (time.perf_counter() - last_checkpoint) / 60
            clock = rank == 0 and 0 < config.checkpoint.every_minutes <= minutes
            signal = bool(stop_requested and stop_requested())
            # All ranks synchronise here, every poll_every iterations: one 2-number all-reduce.
            flags = collectives.allreduce_sum(torch.tensor([float(signal), float(clock)]))
            return bool(flags[0] > 0), bool(flags[1] > 0)

        if not resume:
            log_row(0)
        local_steps = config.learner.local_steps
        for iteration in range(first_iteration, config.iterations + 1):
            if config.strategy == "cta" and combiner is not None:
                combine_in_place()
            for step in range(local_steps):
                # Task draws are numbered by outer step, so local_steps = 1 is Algorithm 1.
                draw = (iteration - 1) * local_steps + step + 1
                tasks = task.sample(agents, draw, config.learner.tasks_per_agent)
                gradients, losses = step_gradients(launch_models.detach(), tasks)
                launch_models.grad = gradients
                optimizer.step()  # launch_models now holds the intermediate states phi_{k,i}
                window.add(losses, gradients)
            if config.strategy != "cta" and combiner is not None:
                combine_in_place()
            progress.advance()
            if (
                iteration % config.log_every == 0
                or iteration <= config.log_every_iteration_until
                or iteration == config.iterations
            ):
                log_row(iteration)
            every = config.checkpoint.every_iterations
            due, stop = every > 0 and iteration % every == 0, False
            if iteration % config.checkpoint.poll_every == 0:
                stop, clock = poll()
                due = due or clock
            if iteration == config.iterations:
                # A run without a final evaluation completes now; one with it saves first,
                # so that a failure or a stop during the evaluation loses no training.
                due, stop = task.final_evaluation, stop and task.final_evaluation
            if stop or due:
                save(iteration)
                last_checkpoint = time.perf_counter()
            if stop:
                progress.close()
                writer.close()
                return iteration
        progress.close()
        if task.final_evaluation:
            with torch.no_grad():
                # [agents, tests, 1 + scores], evaluated one group of tasks at a time.
                outcome = torch.cat(
                    [
                        learner.evaluate(launch_models.detach(), batch, validation_steps, scores)
                        for batch in task.test_batches(tasks_at_once)
                    ],
                    dim=1,
                ).to(torch.float64)
            # All ranks synchronise here: per-task sums over agents for the network's interval.
            network = collectives.allreduce_sum(outcome.sum(dim=0)) / config.agents
            for j, name in enumerate(("loss", *task.scores)):
                per_task = outcome[..., j]
                writer.write_agents(
                    f"final/test_{name}",
                    per_task.mean(dim=1).cpu().numpy(),
                    units="1" if name != "loss" else "loss units",
                    description=(
                        f"query {name} after {validation_steps} inner steps, mean over "
                        f"{per_task.shape[1]} fixed meta-test tasks, one value per agent"
                    ),
                    network_mean=float(network[:, j].mean()),
                    network_ci95=float(confidence_interval_95(network[:, j])),
                )
                writer.write_agents(
                    f"final/test_{name}_ci95",
                    confidence_interval_95(per_task).cpu().numpy(),
                    units="1" if name != "loss" else "loss units",
                    description=(
                        f"half-width of the 95% normal confidence interval of final/test_{name}"
                    ),
                )
        writer.write_agents(
            "params/final",
            launch_models.detach().cpu().numpy(),
            units="parameter units",
            description="launch models after the last iteration, one flattened row per agent",
        )
        writer.finish()
        if rank == 0:
            checkpoint.unlink(missing_ok=True)
    except BaseException:
        writer.abandon()
        raise
    return None
