"""The combination step alone: dense A^T phi against the exchange's mix dmeta uses.

    python benchmarks/bench_combine.py [--agents 40 160 640 2560] [--parameters 1761]
                                       [--topology ring] [--threads 1]

Times, on [K, parameters] float32 rows with Metropolis weights on the given graph, the dense
product A^T phi (K x K) and the in-process exchange's mix (one CSR product over the E edges
without gradients: E x parameters multiply-adds), and checks that both give the same rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from common import command_line, machine, print_table

from dmeta import topology
from dmeta.algorithms.diffusion import matrix_edges
from dmeta.config import GraphConfig
from dmeta.exchange import LocalExchange


def seconds(operation: Callable[[], torch.Tensor]) -> float:
    """Mean seconds of `operation()` over enough repeats to last about a second."""
    operation()
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0 or repeats < 3:
        operation()
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
        matrix = topology.combination_matrix(graph, "metropolis")
        sources, destinations, weights = matrix_edges(matrix)
        states = torch.randn(agents, args.parameters)
        dense = torch.zeros(agents, agents)
        dense[sources, destinations] = torch.as_tensor(weights, dtype=torch.float32)
        dense_t = dense.T.contiguous()
        exchange = LocalExchange(agents)
        route = exchange.route(sources, destinations)
        edge_weights = route.weights(weights, states)
        torch.testing.assert_close(
            exchange.mix(states, route, edge_weights), dense_t @ states, rtol=1e-5, atol=1e-5
        )
        dense_time = seconds(lambda: dense_t @ states)  # noqa: B023 (timed here, in the loop)
        mix_time = seconds(lambda: exchange.mix(states, route, edge_weights))  # noqa: B023
        rows.append(
            [
                str(agents),
                str(len(sources)),
                f"{1e3 * dense_time:.3f}",
                f"{1e3 * mix_time:.3f}",
                f"{dense_time / mix_time:.2f}x",
            ]
        )
    print_table(["agents", "edges", "dense ms", "mix ms", "dense / mix"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
