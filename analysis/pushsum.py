"""PARS-Push's "what to show" (issue 16, item 6; slides 003, Part II): exact averaging under
losses and delays, robustness to asynchrony, and the personalisation budget u.

Usage (from the repository root), one figure and one table per command:

    python analysis/pushsum.py consensus RUN.h5 [...] [--threshold E] [--out FIG.png]
    python analysis/pushsum.py asynchrony RUN.h5 [...] [--last N] [--target L] [--out FIG.png]
    python analysis/pushsum.py budget RUN.h5 [...] [--last N] [--out FIG.png]

- consensus: runs without a gradient step (learner.local_steps = 0). The network mean of
  /pushsum/consensus_error (||z_k - x_bar||^2 / ||x_bar||^2) against rounds, log scale; the
  table gives the first logged round where every agent's error is below --threshold (1e-20),
  the final mean error, and max_k ||z_k(T) - mean_l x_l(0)|| / ||mean_l x_l(0)|| computed from
  /params/final and /params/initial alone (the claim "z converges to the exact average"
  without the logged series).
- asynchrony: the validation loss (mean over agents of /metrics/val_loss: each agent's z after
  u adaptation steps) against rounds and against the messages sent so far (cumulative
  /comm/messages, lost ones included); the table gives each run's final loss (mean of the last
  --last rows), its messages, and the rounds and messages it needs to reach --target (default:
  the worst final loss of the runs given, which every run reaches).
- budget: the final validation loss against u = learner.inner_steps (each run evaluated after
  its own u steps), with the loss against rounds beside it; one row per u, over seeds.

Runs are grouped by their setting (wake probability, maximum delay, loss probability, u); the
seeds of a setting share a colour. Figures go to --out, else next to the first run. Reads HDF5
only: no torch, no mpi4py.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
from runfile import Run, RunFileError, figure_path, load_runs, open_hdf5, table_lines

PROG = "pushsum"
ERROR = "pushsum/consensus_error"


@dataclass(frozen=True)
class Setting:
    """What a push-sum run varies: asynchrony and the personalisation budget."""

    wake: float
    delay: int
    loss: float
    budget: int

    def label(self, with_budget: bool = True) -> str:
        text = f"wake {self.wake:g}, delay <= {self.delay}, loss {self.loss:g}"
        return f"{text}, u = {self.budget}" if with_budget else text


def setting_of(run: Run) -> Setting:
    """The run's asynchrony keys and learner.inner_steps; RunFileError for another strategy."""
    if run.strategy != "pushsum":
        raise RunFileError(f"{run.path}: strategy {run.strategy!r} is not pushsum")
    asynchrony = run.config.get("asynchrony", {})
    learner = run.config.get("learner", {})
    return Setting(
        float(asynchrony.get("wake_probability", 1.0)),
        int(asynchrony.get("max_delay", 1)),
        float(asynchrony.get("loss_probability", 0.0)),
        int(learner.get("inner_steps", 1)),
    )


def seed_of(run: Run) -> int:
    return int(run.config.get("seed", 0))


def groups(runs: list[Run]) -> dict[Setting, list[Run]]:
    """The runs by setting, the most synchronous first (wake down, then loss and delay up),
    then by u; the seeds of a setting in the order given."""
    grouped: dict[Setting, list[Run]] = {}
    for run in runs:
        grouped.setdefault(setting_of(run), []).append(run)
    order = sorted(grouped, key=lambda s: (-s.wake, s.loss, s.delay, s.budget))
    return {setting: grouped[setting] for setting in order}


def cumulative_messages(run: Run) -> np.ndarray:
    """Messages sent from round 1 to each logged row [T]."""
    return np.cumsum(run.series["comm/messages"])


def network_loss(run: Run) -> np.ndarray:
    """The validation loss averaged over agents [T]."""
    return run.metric("val_loss").mean(axis=1)


def final_loss(run: Run, last: int) -> float:
    """Mean of the network loss over the last `last` rows."""
    return float(network_loss(run)[-last:].mean())


def first_reached(values: np.ndarray, target: float) -> int | None:
    """Index of the first row at or below target (None: never)."""
    reached = np.flatnonzero(values <= target)
    return int(reached[0]) if len(reached) else None


def launch_average_distance(path: str) -> float:
    """max_k ||z_k(T) - x_bar(0)|| / ||x_bar(0)||, x_bar(0) the mean of /params/initial."""
    try:
        with open_hdf5(path) as file:
            initial = np.asarray(file["params/initial"][()], dtype=float)
            final = np.asarray(file["params/final"][()], dtype=float)
    except (OSError, KeyError) as error:
        raise RunFileError(f"{path}: no /params/initial and /params/final ({error})") from None
    average = initial.mean(axis=0)
    return float(np.linalg.norm(final - average, axis=1).max() / np.linalg.norm(average))


def consensus_table(runs: list[Run], threshold: float) -> list[str]:
    rows = []
    for setting, members in groups(runs).items():
        for run in members:
            error = run.metric(ERROR)
            below = first_reached(error.max(axis=1), threshold)
            rows.append(
                [
                    setting.label(with_budget=False),
                    str(seed_of(run)),
                    "never" if below is None else str(int(run.iteration[below])),
                    f"{error[-1].mean():.2e}",
                    f"{launch_average_distance(run.path):.2e}",
                    f"{cumulative_messages(run)[-1]:.0f}",
                ]
            )
    header = [
        "setting", "seed", f"round all < {threshold:g}", "final mean error",
        "max ||z_k - x_bar(0)|| / ||x_bar(0)||", "messages",
    ]  # fmt: skip
    return table_lines(header, rows)


def asynchrony_target(runs: list[Run], last: int) -> float:
    """The worst final loss of the runs: one every run reaches."""
    return max(final_loss(run, last) for run in runs)


def asynchrony_table(runs: list[Run], last: int, target: float) -> list[str]:
    rows = []
    for setting, members in groups(runs).items():
        for run in members:
            reached = first_reached(network_loss(run), target)
            messages = cumulative_messages(run)
            rows.append(
                [
                    setting.label(),
                    str(seed_of(run)),
                    f"{final_loss(run, last):.4f}",
                    f"{messages[-1]:.0f}",
                    "never" if reached is None else str(int(run.iteration[reached])),
                    "never" if reached is None else f"{messages[reached]:.0f}",
                ]
            )
    rows_text = "last row" if last == 1 else f"last {last} rows"
    header = [
        "setting", "seed", f"final loss ({rows_text})", "messages",
        f"rounds to {target:.4f}", f"messages to {target:.4f}",
    ]  # fmt: skip
    return table_lines(header, rows)


def budget_table(runs: list[Run], last: int) -> list[str]:
    rows = []
    for setting, members in groups(runs).items():
        finals = np.array([final_loss(run, last) for run in members])
        rows.append(
            [
                str(setting.budget),
                setting.label(with_budget=False),
                str(len(members)),
                f"{finals.mean():.4f}",
                f"{finals.min():.4f} - {finals.max():.4f}",
            ]
        )
    rows_text = "last row" if last == 1 else f"last {last} rows"
    header = ["u", "setting", "seeds", f"final loss ({rows_text}), mean", "min - max"]
    return table_lines(header, rows)


def _figure(panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * panels, 4))
    axes = figure.subplots(1, panels, squeeze=False)[0]
    return figure, axes, FigureCanvasAgg


def _lines(axis, runs: list[Run], x_of, y_of, with_budget: bool = True) -> None:
    """One line per run, one colour and one legend entry per setting."""
    for index, (setting, members) in enumerate(groups(runs).items()):
        colour = f"C{index % 10}"
        for number, run in enumerate(members):
            label = setting.label(with_budget) if number == 0 else None
            axis.plot(x_of(run), y_of(run), color=colour, label=label, linewidth=1.2)


def plot_consensus(runs: list[Run], out: str) -> None:
    figure, (axis,), canvas = _figure(1)
    _lines(axis, runs, lambda r: r.iteration, lambda r: r.metric(ERROR).mean(axis=1), False)
    axis.set_yscale("log")
    axis.set_xlabel("round")
    axis.set_ylabel("mean_k ||z_k - x_bar||^2 / ||x_bar||^2")
    axis.set_title("push-sum alone: error to the exact average")
    axis.legend(fontsize="small")
    figure.tight_layout()
    canvas(figure).print_figure(out, dpi=120)


def plot_asynchrony(runs: list[Run], target: float, out: str) -> None:
    figure, (rounds, messages), canvas = _figure(2)
    _lines(rounds, runs, lambda r: r.iteration, network_loss)
    _lines(messages, runs, cumulative_messages, network_loss)
    for axis, name in ((rounds, "round"), (messages, "messages sent (lost ones included)")):
        axis.axhline(target, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel(name)
        axis.set_ylabel("validation loss, mean over agents")
    messages.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    rounds.set_title("robustness to asynchrony: against rounds")
    messages.set_title("against messages")
    rounds.legend(fontsize="small")
    figure.tight_layout()
    canvas(figure).print_figure(out, dpi=120)


def plot_budget(runs: list[Run], last: int, out: str) -> None:
    figure, (rounds, finals), canvas = _figure(2)
    _lines(rounds, runs, lambda r: r.iteration, network_loss)
    rounds.set_xlabel("round")
    rounds.set_ylabel("validation loss after u steps, mean over agents")
    rounds.set_title("personalisation budget u: against rounds")
    rounds.legend(fontsize="small")
    # One line per asynchrony setting: the mean final loss over seeds at each u, the seeds as
    # points.
    curves: dict[str, dict[int, list[float]]] = {}
    for setting, members in groups(runs).items():
        curve = curves.setdefault(setting.label(with_budget=False), {})
        curve[setting.budget] = [final_loss(run, last) for run in members]
    for index, (label, curve) in enumerate(curves.items()):
        budgets = sorted(curve)
        for budget in budgets:
            finals.scatter([budget] * len(curve[budget]), curve[budget], color=f"C{index}", s=14)
        means = [np.mean(curve[budget]) for budget in budgets]
        finals.plot(budgets, means, color=f"C{index}", marker="o", label=label)
    finals.set_xlabel("u (learner.inner_steps, at training and evaluation)")
    finals.set_ylabel(f"final validation loss (last {last} rows)")
    finals.set_xticks(sorted({setting.budget for setting in groups(runs)}))
    finals.set_title("final loss against u")
    finals.legend(fontsize="small")
    figure.tight_layout()
    canvas(figure).print_figure(out, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    consensus = commands.add_parser("consensus", help="error to the exact average vs rounds")
    consensus.add_argument("--threshold", type=float, default=1e-20)
    asynchrony = commands.add_parser("asynchrony", help="loss vs rounds and vs messages")
    asynchrony.add_argument("--target", type=float, default=None)
    budget = commands.add_parser("budget", help="final loss vs the personalisation budget u")
    for command in (consensus, asynchrony, budget):
        command.add_argument("runs", nargs="+")
        command.add_argument("--out", default=None)
    for command in (asynchrony, budget):
        command.add_argument("--last", type=int, default=5, help="rows of the final loss")
    args = parser.parse_args(argv)
    if getattr(args, "last", 1) < 1:
        parser.error(f"--last {args.last} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Print the table and draw the figure of a command; 2 on a bad input file."""
    args = parse_args(argv)
    metrics = (ERROR,) if args.command == "consensus" else ("val_loss",)
    try:
        runs = load_runs(args.runs, metrics=metrics, series=("comm/messages",))
        for run in runs:
            setting_of(run)
        if args.command == "consensus":
            lines = consensus_table(runs, args.threshold)
        elif args.command == "asynchrony":
            target = asynchrony_target(runs, args.last) if args.target is None else args.target
            lines = asynchrony_table(runs, args.last, target)
        else:
            lines = budget_table(runs, args.last)
    except RunFileError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    out = figure_path(args.out, runs, f"pushsum_{args.command}.png")
    try:
        if args.command == "consensus":
            plot_consensus(runs, out)
        elif args.command == "asynchrony":
            plot_asynchrony(runs, target, out)
        else:
            plot_budget(runs, args.last, out)
    except OSError as error:
        print(f"{PROG}: error: cannot write {out}: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
