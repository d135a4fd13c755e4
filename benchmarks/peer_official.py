"""The official Dif-MAML code's training loop timed at its own setting, in a TensorFlow Python.

    python benchmarks/peer_official.py CHECKOUT [--iterations 10 60] [--threads 1]

CHECKOUT is a clone of https://github.com/mertkayaalp/Diffusion-Multi-Agent-Meta-Learning (the
paper's code, not shipped with dmeta). Its `Regression/train_sine_model.py` is imported as it is
and its `maml_train` (ATC, eager TensorFlow in float64: a Python loop over the agents, nested
gradient tapes and a model copy per agent, Keras Adam, then the neighbourhood average) is run
on data made by its own `generate_train_dataset`, as the script's `__main__` makes it: 6 agents,
one sine task of 10 shots each per iteration, the 6-agent graph written in that `__main__`. The
two calls of `--iterations` (fewest first) are timed and their difference divided by the
difference in iterations, so what a call costs once (Adam's slots, the closing plot) cancels.
Prints JSON: seconds per iteration, agents, tasks per agent. Imports neither dmeta nor torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# The graph of train_sine_model.py's __main__: self-loops and these undirected edges.
EDGES = [(0, 2), (1, 2), (2, 3), (2, 4), (3, 4), (4, 5)]
AGENTS = 6


def adjacency():  # noqa: ANN201 (numpy is imported late, after the thread settings)
    import numpy as np

    matrix = np.eye(AGENTS)
    for a, b in EDGES:
        matrix[a][b] = matrix[b][a] = 1
    return matrix


def training_data(official, tf, iterations: int) -> list:  # noqa: ANN001
    """train_dataset of the __main__: per agent and iteration [[x_in, y_in], [x_out, y_out]]."""
    generators = official.generate_train_dataset(num_agents=AGENTS, K=10, train_size=iterations)
    return [
        [[[tf.convert_to_tensor(part) for part in g.batch()] for _ in range(2)] for g in agent]
        for agent in generators
    ]


def seconds(official, tf, iterations: int) -> float:  # noqa: ANN001
    """Wall seconds of one maml_train call over `iterations` iterations (fresh models)."""
    data = training_data(official, tf, iterations)
    models = [official.SineModel() for _ in range(AGENTS)]
    began = time.perf_counter()
    official.maml_train(
        models, AGENTS, data, [], strategy="ATC", epochs=1,
        log_steps=10**9, test_steps=10**9,
    )  # fmt: skip
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path)
    parser.add_argument("--iterations", type=int, nargs=2, default=[10, 60])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("MPLBACKEND", "Agg")  # maml_train draws and saves its loss curve
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Keras 2, which the code was written for (tf_keras), rather than TensorFlow's Keras 3.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    sys.path.insert(0, str(args.checkout / "Regression"))
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)  # the loss curve it saves lands here
        official = importlib.import_module("train_sine_model")
        official.adj_mat = adjacency()  # a global of its __main__, read by distribute_weights
        few, many = sorted(args.iterations)
        spent = seconds(official, tf, many) - seconds(official, tf, few)
    per_iteration = spent / (many - few)
    print(json.dumps({"seconds_per_iteration": per_iteration, "agents": AGENTS, "tasks": 1}))


if __name__ == "__main__":
    main()
