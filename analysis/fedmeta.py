"""FedMeta's communication claim (Chen et al., Sec. 4.2, Fig. 2 and Table 2): validation-client
accuracy against rounds and against cumulative bytes, and the bytes each run needs to reach a
target accuracy, with the ratio to FedAvg's.

Usage (from the repository root):

    python analysis/fedmeta.py RUN.h5 [RUN.h5 ...] [--target ACC] [--reference RUN.h5]
                               [--out FIG.png]

A run's bytes are the cumulative sum of /comm/bytes_up + /comm/bytes_down; its accuracy is
/centroid/val_accuracy (the server model on the validation clients). The target is --target,
or FedAvg's final validation accuracy: the paper's "reaches FedAvg's accuracy with less
communication". FedAvg is --reference RUN.h5 (a file, or a pattern that matches one: a sweep's
member), else the first fedavg run without fine-tuning
or mini-batches, else without fine-tuning, else any fedavg run. The table also
gives each run's rounds, the round at which it reaches the target (the first logged row at or
above it), the example-weighted test accuracy (/final/test_accuracy's network_mean and
network_ci95) and its difference to FedAvg's, client by client on the same test clients, with
a 95% interval (paired: tighter than comparing the two runs' intervals; only between runs of
one support fraction, whose query sets are the same). Runs of several support fractions also
get the paper's Table 2 layout: test accuracy, a line per method, a column per fraction.
Reads HDF5 only: no torch, no mpi4py.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np
from runfile import RunFileError, expand_paths, open_hdf5, table_lines

PROG = "fedmeta"


@dataclass
class FederatedRun:
    """What the analysis needs of one federated run file."""

    path: str
    label: str
    method: str  # the label without the support fraction
    support_fraction: float
    is_fedavg: bool
    reference_rank: int  # `reference_rank`: the lowest fedavg run is FedAvg by default
    rounds: np.ndarray
    accuracy: np.ndarray
    cumulative_bytes: np.ndarray
    test_mean: float
    test_ci95: float
    # Per test client: query accuracy, query examples (its weight) and source index; empty
    # where the run has no final evaluation.
    test_values: np.ndarray
    test_weights: np.ndarray
    test_clients: np.ndarray


def averages_models(federated: dict) -> bool:
    """Whether a fedavg server averages the clients' models (FedAvg) rather than stepping Adam
    or SGD with another step on their average change (FedAdam, ...)."""
    server = federated.get("server_optimizer", "auto")
    return server in ("auto", "average") or (server == "sgd" and federated["server_lr"] == 1)


def reference_rank(federated: dict) -> int:
    """How a fedavg run ranks as the reference: 0 without fine-tuning or mini-batches, 1 with
    mini-batches, 2 with fine-tuning (FedAvg(Meta))."""
    if federated.get("finetune_at_test"):
        return 2
    return 1 if federated.get("batch_size") else 0


def label_of(config: dict) -> str:
    """The method (`method_of`) with the support fraction."""
    return f"{method_of(config)}, p = {config['federated'].get('support_fraction')}"


def method_of(config: dict) -> str:
    """FedMeta (learner), FedAvg or FedAvg(Meta) (with its fine-tuning steps x step size; with
    its clients' mini-batch size where federated.batch_size > 0; with the server's optimizer
    and step where it does not average the models)."""
    federated = config["federated"]
    if config["strategy"] == "fedavg":
        name = "FedAvg"
        if federated.get("finetune_at_test"):
            learner = config.get("learner", {})
            # Its step: federated.finetune_lr, 0 (or absent, in older run files) the learner's.
            steps = learner.get("inner_steps")
            lr = federated.get("finetune_lr") or learner.get("inner_lr")
            name = f"FedAvg(Meta) (fine-tune {steps} x {lr})"
        if federated.get("batch_size"):  # 0 or absent (older run files): full batch
            name += f" (mini-batches of {federated['batch_size']})"
        if not averages_models(federated):
            name += f" (server {federated['server_optimizer']} {federated['server_lr']})"
    else:
        name = f"FedMeta ({config['learner']['name']})"
    return name


def read_run(path: str) -> FederatedRun:
    """One run file; RunFileError naming the file and what is missing."""
    try:
        with open_hdf5(path) as file:  # also while a run writes it
            config = json.loads(file.attrs["config"])
            if config.get("strategy") not in ("fedmeta", "fedavg"):
                raise RunFileError(f"{path}: strategy {config.get('strategy')!r} is not federated")
            sent = file["comm/bytes_up"][()] + file["comm/bytes_down"][()]
            final = file["final/test_accuracy"] if "final/test_accuracy" in file else None
            split = ("tasks/clients_test", "tasks/examples_test", "tasks/support_test")
            if final is not None and all(name in file for name in split):
                clients, examples, support = (file[name][()] for name in split)
                values = final[()]
            else:
                clients = examples = support = values = np.zeros(0)
            return FederatedRun(
                path,
                label_of(config),
                method_of(config),
                float(config["federated"]["support_fraction"]),
                config["strategy"] == "fedavg",
                reference_rank(config["federated"]),
                file["time/iteration"][()],
                file["centroid/val_accuracy"][()],
                np.cumsum(sent),
                float(final.attrs["network_mean"]) if final is not None else np.nan,
                float(final.attrs["network_ci95"]) if final is not None else np.nan,
                values,
                (examples - support).astype(np.float64),
                clients,
            )
    except (OSError, KeyError) as error:
        raise RunFileError(f"{path}: not a federated run file with accuracy ({error})") from None


def bytes_to_reach(run: FederatedRun, target: float) -> float:
    """Cumulative bytes at the first logged row whose accuracy reaches `target` (NaN: never)."""
    reached = np.flatnonzero(run.accuracy >= target)
    return float(run.cumulative_bytes[reached[0]]) if len(reached) else np.nan


def reference_run(runs: list[FederatedRun]) -> FederatedRun | None:
    """The FedAvg run the others are measured against: the first fedavg run of the lowest
    `reference_rank` (None without one)."""
    fedavg = [run for run in runs if run.is_fedavg]
    return min(fedavg, key=lambda run: run.reference_rank, default=None)


def default_target(reference: FederatedRun | None) -> float:
    """FedAvg's final validation accuracy (of `reference`, `reference_run`'s by default)."""
    if reference is None:
        raise RunFileError("no fedavg run to take the target from; give --target")
    return float(reference.accuracy[-1])


def paired_difference(run: FederatedRun, reference: FederatedRun | None) -> tuple[float, float]:
    """The run's test accuracy minus the reference's, client by client on the same test
    clients, query-example weighted, with the normal 95% half-width of that weighted mean (the
    clients as sampled units: the interval of /final/test_accuracy, on the differences).
    (NaN, NaN) unless both runs scored the same test clients on the same query sets (the same
    support fraction)."""
    if (
        reference is None
        or len(run.test_clients) < 2
        or not np.array_equal(run.test_clients, reference.test_clients)
        or run.support_fraction != reference.support_fraction
    ):
        return np.nan, np.nan
    difference = run.test_values - reference.test_values
    w = run.test_weights / run.test_weights.sum()
    mean = float(w @ difference)
    n = len(difference)
    spread = n / (n - 1) * np.sum(w**2 * (difference - mean) ** 2)
    return mean, float(1.96 * np.sqrt(spread))


def round_to_reach(run: FederatedRun, target: float) -> float:
    """The round of the first logged row whose accuracy reaches `target` (NaN: never)."""
    reached = np.flatnonzero(run.accuracy >= target)
    return float(run.rounds[reached[0]]) if len(reached) else np.nan


def table(runs: list[FederatedRun], target: float, fedavg: FederatedRun | None) -> list[str]:
    """One line per run: rounds, final accuracies, bytes (and the round) to the target and the
    ratio of FedAvg's bytes (the run `fedavg`'s) to the run's."""
    reference = bytes_to_reach(fedavg, target) if fedavg is not None else np.nan
    rows = []
    for run in runs:
        needed = bytes_to_reach(run, target)
        gain, gain_ci95 = paired_difference(run, fedavg)
        rows.append(
            [
                run.label,
                f"{run.rounds[-1]:g}",
                f"{run.accuracy[-1]:.4f}",
                f"{run.test_mean:.4f} +- {run.test_ci95:.4f}",
                f"{gain:+.4f} +- {gain_ci95:.4f}",
                f"{needed:.4g}",
                f"{round_to_reach(run, target):g}",
                f"{reference / needed:.2f}" if needed > 0 else "nan",
            ]
        )
    header = [
        "run", "rounds", "final val acc", "test acc (95%)", "test acc - FedAvg's (95%)",
        f"bytes to {target:.4f}", "at round", "FedAvg/run",
    ]  # fmt: skip
    return table_lines(header, rows)


def support_table(runs: list[FederatedRun]) -> list[str]:
    """The paper's Table 2 layout: a line per method, a column per support fraction, the test
    accuracy with its 95% interval (the last run of a method and fraction; "-" where none)."""
    fractions = sorted({run.support_fraction for run in runs})
    methods = list(dict.fromkeys(run.method for run in runs))
    cells = {(run.method, run.support_fraction): run for run in runs}
    rows = [
        [method]
        + [
            f"{cells[method, p].test_mean:.4f} +- {cells[method, p].test_ci95:.4f}"
            if (method, p) in cells
            else "-"
            for p in fractions
        ]
        for method in methods
    ]
    return table_lines(["test acc (95%)", *(f"p = {p:g}" for p in fractions)], rows)


def plot(runs: list[FederatedRun], target: float, out: str) -> None:
    """Accuracy against rounds and against cumulative bytes, the target as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The legend goes below the panels (two runs a line), where it hides no curve.
    legend_lines = (len(runs) + 1) // 2
    legend_height = 0.3 * legend_lines + 0.2
    figure = Figure(figsize=(10, 4 + legend_height))
    rounds, sent = figure.subplots(1, 2)
    for run in runs:
        rounds.plot(run.rounds, run.accuracy, label=run.label)
        sent.plot(run.cumulative_bytes, run.accuracy, label=run.label)
    for axis, name in ((rounds, "round"), (sent, "cumulative bytes (up + down)")):
        axis.axhline(target, color="grey", linestyle=":")
        axis.set_xlabel(name)
        axis.set_ylabel("validation-client accuracy")
    figure.legend(*rounds.get_legend_handles_labels(), loc="lower center", ncol=2,
                  fontsize="small", frameon=False)  # fmt: skip
    figure.tight_layout(rect=(0, legend_height / (4 + legend_height), 1, 1))
    FigureCanvasAgg(figure).print_figure(out)


def main(argv: list[str] | None = None) -> int:
    """Print the table (and draw the figure with --out); 2 on a bad input file."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--target", type=float, default=None)
    parser.add_argument(
        "--reference",
        default=None,
        help="the FedAvg run to measure against (a file or a glob pattern that matches one)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        runs = [read_run(path) for path in expand_paths(args.runs)]
        if args.reference is None:
            reference = reference_run(runs)
        else:
            matches = expand_paths([args.reference])
            if len(matches) != 1:
                raise RunFileError(
                    f"--reference {args.reference} matches {len(matches)} files: name one run"
                )
            reference = read_run(matches[0])
            if not reference.is_fedavg:
                raise RunFileError(f"--reference {args.reference} is not a fedavg run")
            runs = [run for run in runs if run.path != reference.path] + [reference]
        target = default_target(reference) if args.target is None else args.target
    except RunFileError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(table(runs, target, reference)))
    if len({run.support_fraction for run in runs}) > 1:
        print("\n" + "\n".join(support_table(runs)))
    if args.out:
        plot(runs, target, args.out)
        print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
