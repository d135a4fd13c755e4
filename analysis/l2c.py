"""L2C's "what to show" on non-IID data (issue 17, item 6; Li et al., CVPR 2022, Sec. 4):
the learned mixing weights (Fig. 4), personalised test accuracy against the baselines with the
bytes sent (Table 2-3, pruning), and weight against shared classes (Fig. 7).

Usage (from the repository root), one table (and figure with --out) per command:

    python analysis/l2c.py weights RUN.h5 [...] [--rounds 1 5 10 20] [--out FIG.png]
    python analysis/l2c.py compare RUN.h5 [...] [--out FIG.png]
    python analysis/l2c.py shared RUN.h5 [...] [--round R] [--out FIG.png]
    python analysis/l2c.py encoder RUN.h5 [...]

- weights (l2c or meta_l2c runs of problem = "noniid"): W[t] with W[i, j] = w_ij of
  /mixing/weights against the edges j -> i of /topology/edges. A node's task mates are the
  nodes holding the same classes (/tasks/node_classes; Fig. 4: three nodes a task). Per logged
  round: the fraction of a node's weight on its task (itself included; uniform weights give
  mates / K), its mean and minimum over nodes, and how many nodes have their largest weights
  on other nodes exactly on their task mates. The figure: heatmaps of W at --rounds and the
  fraction against rounds.
- compare (any strategies): /metrics/test_accuracy of the last row (each node's model on the
  test images of its classes): mean, standard deviation and minimum over nodes and the mean of
  the worst 10% of nodes (Table 3), and the megabytes a node sent over the run along edges
  (one model row per edge and round, after round T0 only along the edges pruning keeps, twice
  that for meta-L2C's update and change;
  D-PSGD every edge every round; FedAvg the recorded /comm/bytes_up + /comm/bytes_down; local
  training none; /comm/bytes itself counts only bytes between ranks). The figure: mean test
  accuracy against rounds, the range over nodes shaded.
- shared (l2c or meta_l2c): w_ij against the number of classes nodes i and j share (Fig. 7),
  mean and standard deviation over the pairs i != j, at the row of round --round (default: the
  last row before pruning, else the last).
- encoder (meta_l2c, any problem): per logged round, the encoder's norm after it (/l2c/encoder),
  the terms of its Adam step (eq. 6): the norms of the nodes' mean validation gradient |g| and
  of the weight decay |d|, the share of the parameters with |g| > |d| (/l2c/gradient_norm,
  /l2c/decay_norm, /l2c/gradient_share), and how far the weights are from uniform: w_ij times
  node i's in-degree (1 for uniform weights; self included), its standard deviation and maximum
  over the edges.
Reads HDF5 only: no torch, no mpi4py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from functools import partial

import numpy as np
from runfile import RunFileError, expand_paths, open_hdf5, table_lines

PROG = "l2c"
LEARNED = ("l2c", "meta_l2c")
NAMES = {
    "l2c": "L2C",
    "meta_l2c": "meta-L2C",
    "noncooperative": "local",
    "atc": "D-PSGD",
    "cta": "D-PSGD (CTA)",
    "fedavg": "FedAvg",
}


@dataclass
class NodeRun:
    """What the analysis needs of one run file."""

    path: str
    config: dict
    strategy: str
    iteration: np.ndarray  # [T]
    test_accuracy: np.ndarray | None  # [T, K]
    classes: np.ndarray | None  # [K, N]
    edges: np.ndarray | None  # [E, 2]: (source j, destination i)
    weights: np.ndarray | None  # [T, E]: w_ij after the row's round
    row_bytes: int  # bytes of one model row
    federated_bytes: float  # FedAvg's recorded bytes up and down (0 for the others)
    encoder: np.ndarray | None = None  # [T, N]: meta-L2C's encoder after the row's round
    encoder_steps: np.ndarray | None = None  # [T, 3]: |g|, |d|, share |g| > |d| of its step

    @property
    def agents(self) -> int:
        return int(self.config["agents"])

    @property
    def label(self) -> str:
        config, name = self.config, NAMES.get(self.strategy, self.strategy)
        if self.strategy == "fedavg":
            name += f" ({config['federated']['clients_per_round']}/{self.agents} clients)"
        settings = config.get("l2c", {})
        if self.strategy in LEARNED and settings.get("prune_count", 0) > 0:
            name += f", prune {settings['prune_count']} at T0 = {settings['prune_round']}"
        if self.strategy == "meta_l2c" and settings.get("pretrained"):
            name += ", pretrained"
        return name


def _dataset(file, name: str) -> np.ndarray | None:
    return file[name][()] if name in file else None


def read_run(path: str) -> NodeRun:
    """One run file; RunFileError naming the file and what is missing."""
    try:
        with open_hdf5(path) as file:  # also while a run writes it
            config = json.loads(file.attrs["config"])
            params = file["params/final"] if "params/final" in file else file["params/initial"]
            sent = sum(
                float(np.sum(file[name][()]))
                for name in ("comm/bytes_up", "comm/bytes_down")
                if name in file
            )
            return NodeRun(
                path,
                config,
                str(config["strategy"]),
                file["time/iteration"][()],
                _dataset(file, "metrics/test_accuracy"),
                _dataset(file, "tasks/node_classes"),
                _dataset(file, "topology/edges"),
                _dataset(file, "mixing/weights"),
                int(params.shape[1] * params.dtype.itemsize),
                sent,
                _dataset(file, "l2c/encoder"),
                np.stack([file[name][()] for name in STEP_TERMS], axis=1)
                if all(name in file for name in STEP_TERMS)
                else None,
            )
    except (OSError, KeyError, json.JSONDecodeError) as error:
        raise RunFileError(f"{path}: not a dmeta run file ({error})") from None


STEP_TERMS = ("l2c/gradient_norm", "l2c/decay_norm", "l2c/gradient_share")

DATASETS = {
    "test_accuracy": "/metrics/test_accuracy",
    "classes": "/tasks/node_classes",
    "edges": "/topology/edges",
    "weights": "/mixing/weights",
}


def require(run: NodeRun, *what: str) -> None:
    """RunFileError unless `run` holds each of `what` (NodeRun fields of DATASETS)."""
    for name in what:
        if getattr(run, name) is None:
            raise RunFileError(
                f"{run.path}: holds no {DATASETS[name]} (strategy {run.strategy!r}; an l2c or "
                "meta_l2c run of problem = 'noniid' has it)"
            )


def weight_matrices(run: NodeRun) -> np.ndarray:
    """[T, K, K]: W[t, i, j] = w_ij, the weight node i gives node j after row t's round."""
    require(run, "weights", "edges")
    matrices = np.zeros((len(run.iteration), run.agents, run.agents))
    matrices[:, run.edges[:, 1], run.edges[:, 0]] = run.weights
    return matrices


def task_mates(classes: np.ndarray) -> np.ndarray:
    """[K, K] bool: nodes i and j hold the same classes (i = j included)."""
    ordered = np.sort(classes, axis=1)
    return (ordered[:, None, :] == ordered[None, :, :]).all(axis=2)


def shared_classes(classes: np.ndarray) -> np.ndarray:
    """[K, K]: how many classes nodes i and j share."""
    held = np.zeros((len(classes), int(classes.max()) + 1), dtype=int)
    np.put_along_axis(held, classes, 1, axis=1)
    return held @ held.T


def mates_on_top(matrix: np.ndarray, mates: np.ndarray) -> np.ndarray:
    """[K] bool: every weight node i gives a task mate exceeds every weight it gives a node of
    another task (its largest weights on other nodes are its mates'; ties count as not)."""
    others = ~np.eye(len(matrix), dtype=bool)
    lowest_mate = np.where(mates & others, matrix, np.inf).min(axis=1)
    highest_other = np.where(~mates, matrix, -np.inf).max(axis=1)
    return lowest_mate > highest_other


def weights_table(run: NodeRun) -> list[str]:
    """Per logged round: the weight on a node's own task (mean and minimum over nodes), the
    nodes whose largest weights are their task mates, and the mean self-weight."""
    require(run, "classes")
    matrices, mates = weight_matrices(run), task_mates(run.classes)
    rows = []
    for t, matrix in enumerate(matrices):
        fraction = (matrix * mates).sum(axis=1)
        on_top = mates_on_top(matrix, mates)
        rows.append(
            [
                str(run.iteration[t]),
                f"{fraction.mean():.3f}",
                f"{fraction.min():.3f}",
                f"{on_top.sum()}/{len(on_top)}",
                f"{np.diag(matrix).mean():.3f}",
            ]
        )
    header = ["round", "on own task (mean)", "(min)", "largest on mates", "self"]
    return [f"{run.label}: {run.path}", *table_lines(header, rows)]


def plot_weights(runs: list[NodeRun], rounds: list[int], out: str) -> None:
    """Per run: heatmaps of W at `rounds` (the nearest logged ones) and the fraction of
    weight on the own task against rounds (mean, and the range over nodes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.1 * (len(rounds) + 1), 3.0 * len(runs)), layout="constrained")
    axes = np.atleast_2d(figure.subplots(len(runs), len(rounds) + 1, squeeze=False))
    for row, run in zip(axes, runs, strict=True):
        matrices, mates = weight_matrices(run), task_mates(run.classes)
        top = float(matrices[1:].max()) if len(matrices) > 1 else 1.0
        for axis, wanted in zip(row[:-1], rounds, strict=True):
            t = int(np.argmin(np.abs(run.iteration - wanted)))
            image = axis.imshow(matrices[t], vmin=0, vmax=top, cmap="viridis")
            axis.set_title(f"{run.label}: round {run.iteration[t]}", fontsize=8)
            axis.set_xlabel("node j")
            axis.set_ylabel("node i")
        figure.colorbar(image, ax=row[-2], shrink=0.8, label="w_ij")
        fraction = (matrices * mates).sum(axis=2)
        axis = row[-1]
        axis.plot(run.iteration, fraction.mean(axis=1), label="mean over nodes")
        axis.fill_between(run.iteration, fraction.min(axis=1), fraction.max(axis=1), alpha=0.3)
        uniform = mates.sum(axis=1).mean() / run.agents
        axis.axhline(uniform, color="grey", linestyle=":", label="uniform weights")
        axis.set_xlabel("round")
        axis.set_ylabel("weight on own task (self incl.)")
        axis.set_ylim(0, 1)
        axis.legend(fontsize=7)
    FigureCanvasAgg(figure).print_figure(out, dpi=110)


def bytes_per_node(run: NodeRun) -> float:
    """Bytes a node sent over the run along edges (module docstring), mean over nodes. L2C and
    meta-L2C send along every in-edge up to round T0 (`l2c.prune_round`) and along the
    max(in-degree - K0, 0) kept ones of each node after it (K0 = `l2c.prune_count`)."""
    rounds = int(run.config["iterations"])
    if run.strategy == "noncooperative":
        return 0.0
    if run.strategy == "fedavg":
        return run.federated_bytes / run.agents
    require(run, "edges")
    crossing = run.edges[run.edges[:, 0] != run.edges[:, 1]]
    if run.strategy not in LEARNED:
        return rounds * len(crossing) * run.row_bytes / run.agents
    settings = run.config["l2c"]
    kept = len(crossing)
    full = rounds
    if settings["prune_count"] > 0 and settings["prune_round"] < rounds:
        in_degree = np.bincount(crossing[:, 1], minlength=run.agents)
        kept = int(np.maximum(in_degree - settings["prune_count"], 0).sum())
        full = settings["prune_round"]
    sends = full * len(crossing) + (rounds - full) * kept
    per_edge = run.row_bytes * (2 if run.strategy == "meta_l2c" else 1)
    return sends * per_edge / run.agents


def worst_share(values: np.ndarray, share: float = 0.1) -> float:
    """Mean of the lowest ceil(share K) values (the paper's "worst 10%")."""
    count = max(1, math.ceil(share * len(values)))
    return float(np.sort(values)[:count].mean())


def compare_table(runs: list[NodeRun]) -> list[str]:
    """One line per run: the last row's test accuracy over nodes and the bytes sent."""
    rows = []
    for run in runs:
        require(run, "test_accuracy")
        final = run.test_accuracy[-1]
        rows.append(
            [
                run.label,
                str(run.iteration[-1]),
                f"{final.mean():.4f}",
                f"{final.std():.4f}",
                f"{worst_share(final):.4f}",
                f"{final.min():.4f}",
                f"{bytes_per_node(run) / 1e6:.2f}",
            ]
        )
    header = ["run", "rounds", "test acc mean", "std", "worst 10%", "min", "MB sent/node"]
    return table_lines(header, rows)


def plot_compare(runs: list[NodeRun], out: str) -> None:
    """Mean test accuracy over nodes against rounds, the range over nodes shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.2), layout="constrained")
    axis = figure.subplots()
    for run in runs:
        accuracy = run.test_accuracy
        (line,) = axis.plot(run.iteration, accuracy.mean(axis=1), label=run.label)
        low, high = accuracy.min(axis=1), accuracy.max(axis=1)
        axis.fill_between(run.iteration, low, high, color=line.get_color(), alpha=0.12)
    axis.set_xlabel("round")
    axis.set_ylabel("test accuracy on the node's classes")
    axis.set_ylim(0, 1.02)
    axis.legend(fontsize=8, loc="lower right")
    FigureCanvasAgg(figure).print_figure(out, dpi=110)


def default_round(run: NodeRun) -> int:
    """The last logged round before pruning (pruning happens after round T0), else the last."""
    settings = run.config.get("l2c", {})
    if settings.get("prune_count", 0) > 0:
        before = run.iteration[run.iteration < settings["prune_round"]]
        if len(before):
            return int(before[-1])
    return int(run.iteration[-1])


def shared_rows(
    run: NodeRun, wanted: int | None
) -> tuple[int, list[tuple[int, int, float, float]]]:
    """(the round used, [(shared classes, pairs, mean w_ij, std w_ij)]) over pairs i != j."""
    require(run, "classes")
    t = int(np.argmin(np.abs(run.iteration - (default_round(run) if wanted is None else wanted))))
    matrix = weight_matrices(run)[t]
    shared = shared_classes(run.classes)
    off = ~np.eye(run.agents, dtype=bool)
    rows = []
    for count in np.unique(shared[off]):
        values = matrix[off & (shared == count)]
        rows.append((int(count), len(values), float(values.mean()), float(values.std())))
    return int(run.iteration[t]), rows


def shared_table(run: NodeRun, wanted: int | None) -> list[str]:
    used, rows = shared_rows(run, wanted)
    lines = [
        [str(c), str(n), f"{m:.4f}", f"{s:.4f}", f"{m * run.agents:.2f}"] for c, n, m, s in rows
    ]
    header = ["shared classes", "pairs", "mean w_ij", "std", "mean w_ij x K"]
    return [f"{run.label}, round {used}: {run.path}", *table_lines(header, lines)]


def plot_shared(runs: list[NodeRun], wanted: int | None, out: str) -> None:
    """Mean w_ij (one standard deviation as error bars) against shared classes, per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(5.5, 4), layout="constrained")
    axis = figure.subplots()
    for index, run in enumerate(runs):
        used, rows = shared_rows(run, wanted)
        counts = np.array([r[0] for r in rows]) + 0.08 * index
        axis.errorbar(
            counts,
            [r[2] for r in rows],
            yerr=[r[3] for r in rows],
            marker="o",
            capsize=4,
            label=f"{run.label} (round {used})",
        )
    axis.axhline(1 / runs[0].agents, color="grey", linestyle=":", label="uniform 1/K")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("classes shared by nodes i and j")
    axis.set_ylabel("mixing weight w_ij")
    axis.legend(fontsize=8)
    FigureCanvasAgg(figure).print_figure(out, dpi=110)


def encoder_table(run: NodeRun) -> list[str]:
    """Per logged round of a meta_l2c run: the encoder's norm, its step's terms |g|, |d| and
    the share |g| > |d|, and the standard deviation and maximum of w_ij x in-degree(i)."""
    if run.encoder is None or run.encoder_steps is None:
        raise RunFileError(
            f"{run.path}: holds no /l2c/encoder with /l2c/gradient_norm, /l2c/decay_norm and "
            f"/l2c/gradient_share (strategy {run.strategy!r}; a strategy = 'meta_l2c' run has "
            "them)"
        )
    require(run, "weights", "edges")
    scaled = run.weights * np.bincount(run.edges[:, 1], minlength=run.agents)[run.edges[:, 1]]
    norms = np.linalg.norm(run.encoder, axis=1)
    lines = [
        [str(t), f"{n:.3g}", f"{g:.3g}", f"{d:.3g}", f"{share:.4f}", f"{s:.4f}", f"{m:.3f}"]
        for t, n, (g, d, share), s, m in zip(
            run.iteration, norms, run.encoder_steps, scaled.std(axis=1), scaled.max(axis=1),
            strict=True,
        )
    ]  # fmt: skip
    header = ["round", "|alpha|", "|g|", "|d|", "|g| > |d|", "std w x deg", "max w x deg"]
    return [f"{run.label}: {run.path}", *table_lines(header, lines)]


def main(argv: list[str] | None = None) -> int:
    """Print the table (and draw the figure with --out); 2 on a bad input file."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    weights = commands.add_parser("weights", help="mixing weights against tasks (Fig. 4)")
    weights.add_argument("runs", nargs="+")
    weights.add_argument("--rounds", type=int, nargs="+", default=[1, 5, 10, 20])
    weights.add_argument("--out", default=None)
    compare = commands.add_parser("compare", help="test accuracy and bytes (Table 2-3)")
    compare.add_argument("runs", nargs="+")
    compare.add_argument("--out", default=None)
    shared = commands.add_parser("shared", help="weight against shared classes (Fig. 7)")
    shared.add_argument("runs", nargs="+")
    shared.add_argument("--round", type=int, default=None)
    shared.add_argument("--out", default=None)
    encoder = commands.add_parser("encoder", help="meta-L2C's encoder steps against uniform")
    encoder.add_argument("runs", nargs="+")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(path) for path in expand_paths(args.runs)]
        if args.command == "weights":
            lines = [line for run in runs for line in [*weights_table(run), ""]]
            draw = partial(plot_weights, runs, args.rounds)
        elif args.command == "compare":
            lines = compare_table(runs)
            draw = partial(plot_compare, runs)
        elif args.command == "shared":
            lines = [line for run in runs for line in [*shared_table(run, args.round), ""]]
            draw = partial(plot_shared, runs, args.round)
        else:
            lines = [line for run in runs for line in [*encoder_table(run), ""]]
            draw = None
        print("\n".join(lines).rstrip())
        if draw is not None and args.out:
            draw(args.out)
            print(f"figure: {args.out}")
    except RunFileError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
