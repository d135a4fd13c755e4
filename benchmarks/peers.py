"""Per agent-task meta-gradients: dmeta against what users have, side by side in one run.

    python benchmarks/peers.py [--agents 40] [--repeats 5] [--threads 1] [--dtype float32]
                               [--learn2learn PYTHON] [--no-compile]

The workload is one iteration's meta-gradients of jobs/sine_diffusion.toml: K agents x 5 sine
tasks of 10 shots, the 1-40-40-1 network, second-order MAML with one inner step. Each
implementation computes the K meta-gradients from the same launch models and tasks:
- `loop`: benchmarks/reference_loop.py, a Python loop over agents and tasks with
  `torch.autograd.grad(create_graph=True)`;
- `torch.func`: the torch.func MAML example's form, a Python loop over agents, each a
  `grad` of a `vmap` over its tasks of a `functional_call` loss;
- `learn2learn` (with `--learn2learn PYTHON`, a Python where learn2learn imports: see
  benchmarks/install_learn2learn.sh): `l2l.algorithms.MAML`, `clone()` and `adapt()` per task,
  run by benchmarks/peer_learn2learn.py in that interpreter;
- `dmeta`: the learner a run builds, all agents and tasks as one batch: for this MLP the
  closed form of dmeta/mlp_maml.py (`runtime.closed_form`, the default); `dmeta torch.func`:
  `MAML.meta_gradients`, torch.func's vmapped transforms (`runtime.closed_form=false`); each
  also under `torch.compile` (its compilation is excluded: it runs once before the timing).
Each is first checked against dmeta's meta-gradients in float64. Then every implementation is
timed once per round, rounds interleaved (`--repeats`), so a slow moment of the machine hits all
of them; the table shows min / median / max ms per agent-task over the rounds and dmeta's
speed-up over each (ratio of medians).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bench_sine
import numpy as np
import torch
from bench_sine import reference_modules
from common import command_line, machine, print_speedups
from reference_loop import ReferenceDifMAML
from torch.func import functional_call, grad, vmap

from dmeta.meta import MAML

WORKER = Path(__file__).with_name("peer_learn2learn.py")
Gradients = Callable[[], torch.Tensor]


def workload(
    agents: int, dtype: torch.dtype, closed_form: bool = True
) -> tuple[MAML, torch.Tensor, tuple, float]:
    """(dmeta learner, launch models [K, M], tasks [K, 5, 10, 1] x 4, inner step size); the
    learner in closed form (dmeta/mlp_maml.py) or torch.func's (`closed_form` False)."""
    config, learner, theta, tasks = bench_sine.workload(
        [f"agents={agents}", "runtime.device=cpu", f"runtime.closed_form={closed_form}"], dtype
    )
    return learner, theta, tuple(tasks), config.learner.inner_lr


def loop_gradients(theta: torch.Tensor, tasks: tuple, inner_lr: float) -> Gradients:
    modules = reference_modules(theta, [40, 40])
    reference = ReferenceDifMAML(modules, np.eye(len(modules)), inner_lr, 0.001)

    def run() -> torch.Tensor:
        rows = []
        for k, module in enumerate(modules):
            gradient = reference.meta_gradient(module, *(part[k] for part in tasks))
            rows.append(torch.nn.utils.parameters_to_vector(gradient))
        return torch.stack(rows)

    return run


def torch_func_gradients(theta: torch.Tensor, tasks: tuple, inner_lr: float) -> Gradients:
    """The torch.func MAML example's shape: per agent, grad of the mean over vmapped tasks."""
    net = reference_modules(theta[:1], [40, 40])[0]
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    agents = [
        {n: piece.view(s) for n, piece, s in zip(names, row.split(sizes), shapes, strict=True)}
        for row in theta
    ]

    def mse(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((functional_call(net, params, (x,)) - y) ** 2).mean()

    def task_loss(params: dict, sx, sy, qx, qy) -> torch.Tensor:
        inner = grad(mse)(params, sx, sy)
        adapted = {name: params[name] - inner_lr * inner[name] for name in params}
        return mse(adapted, qx, qy)

    def meta_loss(params: dict, sx, sy, qx, qy) -> torch.Tensor:
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy).mean()

    def run() -> torch.Tensor:
        rows = []
        for k, params in enumerate(agents):
            gradient = grad(meta_loss)(params, *(part[k] for part in tasks))
            rows.append(torch.cat([gradient[name].reshape(-1) for name in names]))
        return torch.stack(rows)

    return run


def dmeta_gradients(learner, theta: torch.Tensor, tasks: tuple, compiled: bool) -> Gradients:
    step = torch.compile(learner.meta_gradients) if compiled else learner.meta_gradients
    step(theta, tasks)  # a compiled step compiles here, outside the timing
    return lambda: step(theta, tasks)[0]


def seconds_per_call(run: Gradients, budget: float = 0.3) -> float:
    """Mean seconds of `run` over enough calls to fill `budget` seconds (at least two)."""
    run()  # warm-up
    calls, began = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - began < budget:
        run()
        calls += 1
    return (time.perf_counter() - began) / calls


def timed(run: Gradients) -> Callable[[], float]:
    return lambda: seconds_per_call(run)


class Learn2Learn:
    """learn2learn in another interpreter, fed the same models and tasks through a file."""

    def __init__(
        self, python: str, theta: torch.Tensor, tasks: tuple, inner_lr: float, threads: int
    ):
        self.folder = tempfile.TemporaryDirectory()
        self.data = Path(self.folder.name) / "workload.npz"
        arrays = {"theta": theta.numpy(), "inner_lr": np.array(inner_lr)}
        arrays |= {
            name: part.numpy() for name, part in zip(("sx", "sy", "qx", "qy"), tasks, strict=True)
        }
        np.savez(self.data, **arrays)
        self.command = [python, str(WORKER), str(self.data), "--threads", str(threads)]

    def call(self, *options: str) -> dict:
        result = subprocess.run(
            [*self.command, *options], capture_output=True, text=True, check=False
        )
        if result.returncode:
            raise SystemExit(f"peers.py: learn2learn worker failed:\n{result.stderr.strip()}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def gradients(self) -> torch.Tensor:
        out = Path(self.folder.name) / "gradients.npy"
        self.call("--gradients", str(out))
        return torch.from_numpy(np.load(out))

    def seconds(self) -> float:
        return float(self.call()["seconds"])


def check(args: argparse.Namespace) -> dict[str, float]:
    """Largest |peer - dmeta| meta-gradient entry of each peer, in float64."""
    learner, theta, tasks, inner_lr = workload(args.agents, torch.float64)
    ours = learner.meta_gradients(theta, tasks)[0]
    peers = {
        "loop": loop_gradients(theta, tasks, inner_lr),
        "torch.func": torch_func_gradients(theta, tasks, inner_lr),
    }
    if args.learn2learn:
        peers["learn2learn"] = Learn2Learn(args.learn2learn, theta, tasks, inner_lr, 1).gradients
    return {name: float((run() - ours).abs().max()) for name, run in peers.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every one")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--learn2learn", metavar="PYTHON", help="a python with learn2learn")
    parser.add_argument("--no-compile", action="store_true", help="skip dmeta's compiled row")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# peers: {machine()}")
    print(command_line(__file__, argv))
    differences = check(args)
    print(
        "# max |meta-gradient peer - dmeta| (float64): "
        + ", ".join(f"{n} {d:.1e}" for n, d in differences.items())
    )
    if max(differences.values()) > 1e-10:
        print("peers.py: a peer disagrees with dmeta's meta-gradients", file=sys.stderr)
        return 1
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    learner, theta, tasks, inner_lr = workload(args.agents, dtype)
    timers: dict[str, Callable[[], float]] = {
        "python loop + autograd.grad": timed(loop_gradients(theta, tasks, inner_lr)),
        "torch.func, a loop over agents": timed(torch_func_gradients(theta, tasks, inner_lr)),
    }
    if args.learn2learn:
        peer = Learn2Learn(args.learn2learn, theta, tasks, inner_lr, args.threads)
        timers["learn2learn MAML (clone/adapt)"] = peer.seconds
    plain = workload(args.agents, dtype, closed_form=False)[0]
    for label, implementation in (("", learner), (" torch.func", plain)):
        timers[f"dmeta{label} eager"] = timed(dmeta_gradients(implementation, theta, tasks, False))
        if not args.no_compile:
            compiled = dmeta_gradients(implementation, theta, tasks, True)
            timers[f"dmeta{label} compiled"] = timed(compiled)
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.repeats):
        for name, timer in timers.items():
            samples[name].append(timer())
    print_speedups(samples, 1e3 / (args.agents * tasks[0].shape[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
