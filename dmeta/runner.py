"""The runner: checks a run and builds its parts (task, learner), before the engine runs it.

A run has two phases. `plan_run` does everything that can fail on bad input (config ranges,
the algorithm's graph and weights, rank layout, device) without communicating, so the entry
point can agree on errors across ranks before any collective starts. `dmeta.engine.execute`
then runs the plan's algorithm.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dmeta
from dmeta import mlp_maml, problems
from dmeta.algorithms import algorithm_class
from dmeta.algorithms.base import Algorithm
from dmeta.config import Config, LearnerConfig, build_options, is_import_path
from dmeta.errors import DmetaError
from dmeta.exchange import AgentLayout
from dmeta.federated_data import FederatedDataTask
from dmeta.fewshot import FewShotTask, check_sources
from dmeta.meta import MAML, Reptile
from dmeta.models import FlatModel
from dmeta.noniid import NonIIDTask
from dmeta.output import parallel_hdf5_available, utc_now
from dmeta.tasks import LinearRepresentationTask, SineTask, TaskFamily

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class RunPlan:
    """Everything a rank needs to start, checked; built identically on every rank."""

    config: Config
    backend: str
    layout: AgentLayout
    rank: int
    algorithm: type[Algorithm]
    algorithm_plan: Any  # what algorithm.plan checked: e.g. the graph schedule
    device: torch.device
    threads: int
    compile: bool = False  # runtime.compile, "auto" resolved (`resolve_compile`)
    cuda_graph: bool = False  # runtime.cuda_graph on a CUDA device: try to capture rounds
    agents_at_once: int = 0  # runtime.agents_at_once, "auto" resolved


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


def default_threads(
    node_cpus: int, local_size: int, environ: Mapping[str, str] = os.environ
) -> int:
    """Torch threads per rank for `runtime.threads = 0`: the CPUs that the node's ranks may run
    on (the union of their affinities: each rank's own when srun binds tasks to CPUs) shared
    evenly among them, and under SLURM at most the CPUs per task (SLURM_CPUS_PER_TASK): a node
    that the job shares with others, without a cpuset, shows every core."""
    threads = max(1, node_cpus // local_size)
    per_task = environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        threads = min(threads, int(per_task))
    return threads


def plan_run(
    config: Config,
    size: int,
    rank: int,
    local_rank: int,
    local_size: int,
    node_cpus: int | None = None,
) -> RunPlan:
    """Check the run and decide its layout; raises DmetaError on bad input, communicates not.
    `node_cpus` counts the CPUs the node's ranks may run on (default: this process's)."""
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
    algorithm = algorithm_class(config.strategy)
    algorithm_plan = algorithm.plan(config, layout)
    device = choose_device(config.runtime.device, local_rank)
    if node_cpus is None:
        node_cpus = len(os.sched_getaffinity(0))
    threads = config.runtime.threads or default_threads(node_cpus, local_size)
    compiled = resolve_compile(config, algorithm, device)
    graphed = config.runtime.cuda_graph != "false" and device.type == "cuda"
    if config.runtime.cuda_graph == "true" and not graphed:
        raise DmetaError(
            f"runtime.cuda_graph = true needs a CUDA device (runtime.device = "
            f"{config.runtime.device!r} gives {device}): use runtime.cuda_graph=auto or false"
        )
    return RunPlan(
        config, backend, layout, rank, algorithm, algorithm_plan, device, threads, compiled,
        graphed, resolve_agents_at_once(config.runtime.agents_at_once, device),
    )  # fmt: skip


def resolve_agents_at_once(setting: int | str, device: torch.device) -> int:
    """runtime.agents_at_once, "auto" resolved: chunks of 64 agents on the CPU (its caches),
    all of a rank's agents at once on a GPU (its launches)."""
    if setting == "auto":
        return 0 if device.type == "cuda" else 64
    return int(setting)


def resolve_compile(config: Config, algorithm: type[Algorithm], device: torch.device) -> bool:
    """Whether the run compiles its training step. `runtime.compile = "auto"` compiles a run of
    at least `runtime.compile_after` iterations whose algorithm calls the step with the same
    shapes every round (`Algorithm.fixed_shapes`), where torch's compiler can build: on the CPU
    it needs a C++ compiler (CXX, else g++ or c++ on PATH)."""
    setting = config.runtime.compile
    if setting != "auto":
        return setting == "true"
    if not algorithm.fixed_shapes or config.iterations < config.runtime.compile_after:
        return False
    if device.type == "cpu":
        compilers = [os.environ.get("CXX", ""), "g++", "c++"]
        return any(shutil.which(name) for name in compilers if name)
    return True


def build_task(config: Config, dtype: torch.dtype, device: torch.device) -> TaskFamily:
    """The task family of `problem`, seeded by the run."""
    if is_import_path(config.problem):
        family = problems.task_class(config.problem)
        items = [(key, value, False) for key, value in config.problem_options.items()]
        options = build_options(family, items, config.problem)
        with problems.user_code(f"{config.problem}(...)"):
            return family(options, config.agents, config.seed, dtype, device)
    if config.problem == "linear_representation":
        return LinearRepresentationTask(config.linear, config.agents, config.seed, dtype, device)
    if config.problem == "fewshot":
        return FewShotTask(config.fewshot, config.agents, config.seed, dtype, device)
    if config.problem == "federated":
        return FederatedDataTask(config.federated, config.agents, config.seed, dtype, device)
    if config.problem == "noniid":
        return NonIIDTask(config.noniid, config.agents, config.seed, dtype, device)
    return SineTask(config.task, config.agents, config.seed, dtype, device)


def build_model(task: TaskFamily, config: Config) -> FlatModel:
    """The task's model on [model]; a family given by import path is checked."""
    if is_import_path(config.problem):
        return problems.build_family_model(task, config.problem, config.model)
    return task.build_model(config.model)


def build_learner(
    settings: LearnerConfig,
    model: FlatModel,
    task: TaskFamily,
    agents_at_once: int = 0,
    closed_form: bool = False,
) -> MAML:
    """The meta-learner `learner.name` on `model` and `task` (see dmeta/meta.py), taking the
    meta-gradients of `agents_at_once` agents at a time (0: all; runtime.agents_at_once), in
    closed form where dmeta/mlp_maml.py covers the learner and model and `closed_form` is set
    (runtime.closed_form)."""
    name = settings.name
    forward, loss = task.learner_functions(model)
    if name == "reptile":
        return Reptile(forward, loss, settings.inner_lr, settings.inner_steps, agents_at_once)
    learner = MAML(
        forward,
        loss,
        settings.inner_lr,
        0 if name == "arm" else settings.inner_steps,
        first_order=name in ("fomaml", "foanil"),
        inner_mask=model.head_mask() if name in ("anil", "foanil") else None,
        learned_inner_lr=name == "metasgd",
        agents_at_once=agents_at_once,
    )
    return mlp_maml.closed_form(learner, model) if closed_form else learner


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
    """Root attributes of the run file: the config, versions, the command line, the start time
    and where each rank ran."""
    import h5py

    attributes = {
        "config": plan.config.to_json(),
        "command_line": shlex.join(sys.argv),
        "started_at": utc_now(),
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
        "compiled": plan.compile,
    }
    if is_import_path(plan.config.problem):
        attributes |= problems.source(plan.config.problem)
    if plan.backend == "mpi":
        import mpi4py
        from mpi4py import MPI

        attributes["mpi4py_version"] = mpi4py.__version__
        # Open MPI pads its version string with NUL bytes, which HDF5 strings cannot hold.
        library = MPI.Get_library_version().replace("\x00", "")
        attributes["mpi_library"] = library.strip().splitlines()[0].strip()
    return attributes
