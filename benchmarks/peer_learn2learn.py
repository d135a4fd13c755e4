"""learn2learn's MAML on the workload of benchmarks/peers.py, in a Python where it imports.

    python benchmarks/peer_learn2learn.py WORKLOAD.npz [--threads 1] [--gradients OUT.npy]

Reads the launch models and tasks that peers.py wrote. Per agent, the 1-40-40-1 network as an
`nn.Sequential` wrapped in `l2l.algorithms.MAML` (second order); per task `clone()`, `adapt()` on
the support loss, and the backward of the query loss over the number of tasks: the agent's
meta-gradient. Prints JSON with the seconds of one call over all agents (enough calls to fill
0.3 s), or writes the meta-gradients [K, M] with --gradients. Imports neither dmeta nor mpi4py.
"""

from __future__ import annotations

import argparse
import json
import time

import learn2learn as l2l
import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((prediction - target) ** 2).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gradients")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = np.load(args.workload)
    theta = torch.from_numpy(data["theta"])
    sx, sy, qx, qy = (torch.from_numpy(data[name]) for name in ("sx", "sy", "qx", "qy"))
    models = []
    for row in theta:
        net = nn.Sequential(
            nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
        ).to(theta.dtype)
        vector_to_parameters(row.clone(), net.parameters())
        models.append(l2l.algorithms.MAML(net, lr=float(data["inner_lr"]), first_order=False))
    tasks = sx.shape[1]

    def gradients() -> torch.Tensor:
        rows = []
        for k, maml in enumerate(models):
            maml.zero_grad()
            for t in range(tasks):
                learner = maml.clone()
                learner.adapt(mse(learner(sx[k, t]), sy[k, t]))
                (mse(learner(qx[k, t]), qy[k, t]) / tasks).backward()
            rows.append(parameters_to_vector([p.grad for p in maml.parameters()]))
        return torch.stack(rows)

    if args.gradients:
        np.save(args.gradients, gradients().detach().numpy())
        print(json.dumps({"written": args.gradients}))
        return
    gradients()  # warm-up
    calls, began = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - began < 0.3:
        gradients()
        calls += 1
    print(json.dumps({"seconds": (time.perf_counter() - began) / calls}))


if __name__ == "__main__":
    main()
