"""The combination step alone: dense A^T phi against the sparse (CSR) product dmeta uses.

    python benchmarks/bench_combine.py [--agents 40 160 640 2560] [--parameters 1761]
                                       [--topology ring] [--threads 1]

Times `dmeta.combine.Combination` on [K, parameters] float32 rows with Metropolis weights on
the given graph, forced dense and forced sparse, and checks that both give the same rows.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import command_line, machine, print_table

from dmeta import topology
from dmeta.combine import Combination
from dmeta.config import GraphConfig


def seconds(operator: torch.Tensor, states: torch.Tensor) -> float:
    """Mean seconds of operator @ states over enough repeats to last about a second."""
    operator @ states
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0 or repeats < 3:
        operator @ states
        repeats += 1
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[40, 160, 640, 2560])
    parser.add_argument("--parameters", type=int, default=1761)
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# bench_combine: {machine()}")
    print(command_line(__file__, argv))
    rows = []
    for agents in args.agents:
        graph = topology.build_graph(GraphConfig(topology=args.topology), agents)
        weights = torch.as_tensor(topology.combination_matrix(graph, "metropolis"))
        weights = weights.to(torch.float32)
        states = torch.randn(agents, args.parameters)
        chosen = Combination(weights).transposed
        dense = weights.T.contiguous()
        sparse = chosen if chosen.layout == torch.sparse_csr else None
        if sparse is None:
            rows.append([str(agents), f"{1e3 * seconds(dense, states):.3f}", "-", "-", "dense"])
            continue
        torch.testing.assert_close(sparse @ states, dense @ states, rtol=1e-5, atol=1e-6)
        dense_time, sparse_time = seconds(dense, states), seconds(sparse, states)
        rows.append(
            [
                str(agents),
                f"{1e3 * dense_time:.3f}",
                f"{1e3 * sparse_time:.3f}",
                f"{dense_time / sparse_time:.1f}x",
                "sparse",
            ]
        )
    print_table(["agents", "dense ms", "sparse ms", "speed-up", "dmeta uses"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
