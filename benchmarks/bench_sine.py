"""Meta-iterations per second on the paper's 40-agent sine experiment: dmeta against a loop.

    python benchmarks/bench_sine.py [--iterations N] [--reference-iterations N] [--threads N]

dmeta runs jobs/sine_diffusion.toml (40 agents, 5 tasks of 10 shots each, second-order MAML,
Dif-MAML ATC) in-process, timed by the run file's /time/compute and /time/comm (the iterations
alone, without the logged rows). The reference (benchmarks/reference_loop.py) is the same
algorithm as a Python loop over agents and tasks, started from the same launch models and fed
the same tasks; the script first checks that both give the same meta-gradients.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import torch
from common import command_line, machine, print_table
from reference_loop import ReferenceDifMAML
from torch import nn

from dmeta.config import Config, load_config
from dmeta.engine import execute
from dmeta.hostmemory import keep_freed_memory
from dmeta.meta import MAML
from dmeta.runner import build_learner, build_task, plan_run, resolve_agents_at_once
from dmeta.tasks import TaskBatch

JOB = Path(__file__).resolve().parents[1] / "jobs" / "sine_diffusion.toml"


def reference_modules(flat: torch.Tensor, hidden: list[int]) -> list[nn.Module]:
    """One nn.Sequential per row of `flat`, holding that row's parameters."""
    modules = []
    for row in flat:
        widths = [1, *hidden, 1]
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
        module = nn.Sequential(*layers[:-1]).to(flat.dtype)
        torch.nn.utils.vector_to_parameters(row.clone(), module.parameters())
        modules.append(module)
    return modules


def workload(
    overrides: list[str], dtype: torch.dtype
) -> tuple[Config, MAML, torch.Tensor, TaskBatch]:
    """The job's first iteration on the CPU: (config, dmeta's learner, the launch models
    [K, M], the tasks of draw 1 [K, tasks, shots, 1]). The process keeps its freed memory as
    a run does (`runtime.keep_freed_memory`)."""
    config = load_config(JOB, overrides)
    if config.runtime.keep_freed_memory:
        keep_freed_memory()
    cpu = torch.device("cpu")
    task = build_task(config, dtype, cpu)
    model = task.build_model(config.model)
    runtime = config.runtime
    chunk = resolve_agents_at_once(runtime.agents_at_once, cpu)
    learner = build_learner(config.learner, model, task, chunk, runtime.closed_form)
    agents = torch.arange(config.agents)
    theta = model.initial_parameters(config.seed, agents, False, dtype)
    return config, learner, theta, task.sample(agents, 1, config.learner.tasks_per_agent)


def check_gradients(overrides: list[str]) -> float:
    """Largest |dmeta - reference| meta-gradient entry at the launch models, in float64."""
    config, learner, theta, tasks = workload([*overrides, "runtime.dtype=float64"], torch.float64)
    ours, _ = learner.meta_gradients(theta, tasks)
    reference = ReferenceDifMAML(
        reference_modules(theta, config.model.hidden),
        torch.eye(config.agents).numpy(),
        config.learner.inner_lr,
        config.optimizer.lr,
    )
    worst = 0.0
    for k, module in enumerate(reference.modules):
        gradient = reference.meta_gradient(module, *(part[k] for part in tasks))
        flat = torch.nn.utils.parameters_to_vector(gradient)
        worst = max(worst, float((flat - ours[k]).abs().max()))
    return worst


def time_dmeta(overrides: list[str], iterations: int) -> tuple[float, float]:
    """(seconds of the first iteration, seconds per later iteration) of dmeta's local backend,
    from the run file's compute and comm times (logged rows excluded)."""
    config = load_config(
        JOB,
        [
            *overrides,
            f"iterations={iterations}",
            f"log_every={iterations}",
            "log_every_iteration_until=1",  # a row after the first iteration: compilation
        ],
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.h5"
        execute(plan_run(config, 1, 0, 0, 1), None, path, show_progress=False)
        with h5py.File(path) as run:
            seconds = run["time/compute"][()] + run["time/comm"][()]
    return float(seconds[1]), float(seconds[-1]) / (iterations - 1)


def time_reference(overrides: list[str], iterations: int) -> float:
    """Seconds per iteration of the loop, on the run's tasks and graph."""
    config = load_config(JOB, overrides)
    plan = plan_run(config, 1, 0, 0, 1)
    task = build_task(config, torch.float32, torch.device("cpu"))
    model = task.build_model(config.model)
    agents = torch.arange(config.agents)
    theta = model.initial_parameters(config.seed, agents, False, torch.float32)
    reference = ReferenceDifMAML(
        reference_modules(theta, config.model.hidden),
        plan.algorithm_plan.schedule.matrix_at(1).toarray(),  # the loop's dense A, K = 40
        config.learner.inner_lr,
        config.optimizer.lr,
    )
    batches = [task.sample(agents, i, config.learner.tasks_per_agent) for i in range(iterations)]
    reference.step(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        reference.step(batch)
    return (time.perf_counter() - start) / iterations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300, help="dmeta iterations timed")
    parser.add_argument("--reference-iterations", type=int, default=10, help="loop iterations")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the runtime.compile row (for commits before that option)",
    )
    args = parser.parse_args(argv)
    overrides = [f"runtime.threads={args.threads}", "runtime.device=cpu"]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_sine: {machine()}")
    print(command_line(__file__, argv))
    difference = check_gradients(overrides)
    print(f"# max |meta-gradient dmeta - loop| over 40 agents (float64): {difference:.2e}")
    if difference > 1e-10:
        print("bench_sine: the reference loop disagrees with dmeta", file=sys.stderr)
        return 1
    first, ours = time_dmeta([*overrides, "runtime.compile=false"], args.iterations)
    loop = time_reference(overrides, args.reference_iterations)
    rows = [
        ["python loop + autograd.grad", "-", f"{1e3 * loop:.1f}", f"{1 / loop:.1f}", "1.0x"],
        [
            "dmeta (vmap, local backend)",
            f"{first:.2f}",
            f"{1e3 * ours:.2f}",
            f"{1 / ours:.1f}",
            f"{loop / ours:.1f}x",
        ],
    ]
    if not args.no_compile:
        first_compiled, compiled = time_dmeta([*overrides, "runtime.compile=true"], args.iterations)
        rows.append(
            [
                "dmeta, runtime.compile=true",
                f"{first_compiled:.2f}",
                f"{1e3 * compiled:.2f}",
                f"{1 / compiled:.1f}",
                f"{loop / compiled:.1f}x",
            ]
        )
    print_table(
        ["implementation", "first iteration s", "ms / iteration", "iterations / s", "speed-up"],
        rows,
    )
    print("# speed-up: loop time / dmeta time per iteration after the first (which compiles)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
