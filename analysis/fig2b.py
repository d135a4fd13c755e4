"""Fig. 2b of the Dif-MAML paper: few-shot accuracy against iteration, and at the end, per strategy.

Usage (from the repository root):

    python analysis/fig2b.py RUN.h5 [RUN.h5 ...] [--out FIG.png] [--title TEXT] [--check]
                             [--tolerance PTS] [--margin PTS]

Runs are grouped by their few-shot setting (data set, N-way, K-shot); each group gets a column:
above, one line per strategy of the validation accuracy during training averaged over agents,
shaded from the minimum to the maximum over agents; below, the final meta-test accuracy the
claims are about (mean with its 95% interval over tasks, a tick per agent). The table gives each
run's final meta-test accuracy (mean over agents and tasks, with the 95% confidence interval over
tasks) and, per setting, Dif-MAML's distance to the centralized and non-cooperative runs. With
--check the exit status is 1 unless, in every setting, Dif-MAML is within --tolerance points of
centralized and at least --margin points above non-cooperative. Reads HDF5 only.
"""

from __future__ import annotations

import argparse
import sys

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from runfile import Run, RunFileError, figure_path, load_runs, table_lines

PROG = "fig2b"

LABELS = {
    "atc": "Dif-MAML (ATC)",
    "cta": "Dif-MAML (CTA)",
    "centralized": "Centralized",
    "noncooperative": "Non-cooperative",
}
DIFFUSION = ("atc", "cta")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN.h5", help="run files or glob patterns")
    parser.add_argument("--out", help="PNG to write (default: fig2b.png next to the first run)")
    parser.add_argument("--title", default="", help="figure title")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the claims hold")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=2.0,
        metavar="PTS",
        help="largest allowed |Dif-MAML - centralized|, in accuracy points (default 2)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=3.0,
        metavar="PTS",
        help="smallest allowed Dif-MAML - non-cooperative, in accuracy points (default 3)",
    )
    return parser.parse_args(argv)


def setting(run: Run) -> str:
    """The few-shot setting of a run, e.g. "omniglot 5-way 1-shot"."""
    fewshot = run.config.get("fewshot", {})
    dataset, ways, shots = (fewshot.get(key, "?") for key in ("dataset", "ways", "shots"))
    return f"{dataset} {ways}-way {shots}-shot"


def groups(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by setting, in the order settings first appear; RunFileError when a setting has two
    runs of one strategy (which of them to compare would be a guess)."""
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        members = grouped.setdefault(setting(run), [])
        twin = next((other for other in members if other.strategy == run.strategy), None)
        if twin is not None:
            raise RunFileError(
                f"{run.path} and {twin.path} are both {run.strategy} runs of {setting(run)}; "
                "give one run per strategy and setting"
            )
        members.append(run)
    return grouped


def plot(grouped: dict[str, list[Run]], out: str, title: str) -> None:
    """One column per setting: the validation accuracy during training (mean over agents, band
    min..max over agents) above the final meta-test accuracy that the claims are about (mean
    with its 95% interval over tasks, and each strategy's range over agents)."""
    figure = Figure(figsize=(5.2 * len(grouped), 7.4), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(2, len(grouped), squeeze=False, height_ratios=(3, 2))
    for column, (name, members) in enumerate(grouped.items()):
        curves, finals = panels[0, column], panels[1, column]
        for position, run in enumerate(members):
            label = LABELS.get(run.strategy, run.strategy)
            accuracy = 100 * run.metric("val_accuracy")
            (line,) = curves.plot(run.iteration, accuracy.mean(axis=1), label=label)
            color = line.get_color()
            curves.fill_between(
                run.iteration, accuracy.min(axis=1), accuracy.max(axis=1), color=color, alpha=0.2
            )
            final = run.finals["test_accuracy"]
            finals.errorbar(
                [100 * final.network_mean], [position], xerr=[100 * final.network_ci95],
                fmt="o", color=color, capsize=4,
            )  # fmt: skip
            finals.plot(100 * final.values, [position] * len(final.values), "|", color=color)
        curves.set_title(name)
        curves.set_xlabel("iteration")
        curves.set_ylabel("validation accuracy, %\n(mean over agents, band: min..max)")
        curves.grid(True, alpha=0.3)
        curves.legend(loc="lower right")
        finals.set_yticks(range(len(members)))
        finals.set_yticklabels([LABELS.get(run.strategy, run.strategy) for run in members])
        finals.invert_yaxis()
        finals.set_xlabel("final meta-test accuracy, % (mean, 95% CI; |: agents)")
        finals.grid(True, axis="x", alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.savefig(out, dpi=150)


def comparisons(grouped: dict[str, list[Run]]) -> list[tuple[str, str, float, float]]:
    """(setting, baseline strategy, Dif-MAML - baseline, combined 95% half-width), in points,
    for every setting with a diffusion run and that baseline."""
    found = []
    for name, members in grouped.items():
        by_strategy = {run.strategy: run.finals["test_accuracy"] for run in members}
        diffusion = next((by_strategy[s] for s in DIFFUSION if s in by_strategy), None)
        if diffusion is None:
            continue
        for baseline in ("centralized", "noncooperative"):
            if baseline in by_strategy:
                other = by_strategy[baseline]
                difference = 100 * (diffusion.network_mean - other.network_mean)
                # Independent test sets would add variances; both runs use the same tasks, so
                # this is an upper bound on the interval of the difference.
                width = 100 * (diffusion.network_ci95**2 + other.network_ci95**2) ** 0.5
                found.append((name, baseline, difference, width))
    return found


def table(grouped: dict[str, list[Run]]) -> str:
    """Final accuracies per run, then Dif-MAML's differences to the baselines."""
    header = [
        "setting",
        "strategy",
        "meta-test accuracy % (95% CI)",
        "agents min..max %",
        "last val acc %",
        "file",
    ]
    rows = []
    for name, members in grouped.items():
        for run in members:
            final = run.finals["test_accuracy"]
            rows.append(
                [
                    name,
                    LABELS.get(run.strategy, run.strategy),
                    f"{100 * final.network_mean:.2f} +- {100 * final.network_ci95:.2f}",
                    f"{100 * final.values.min():.2f}..{100 * final.values.max():.2f}",
                    f"{100 * run.metric('val_accuracy')[-1].mean():.2f}",
                    run.path,
                ]
            )
    lines = table_lines(header, rows)
    for name, baseline, difference, width in comparisons(grouped):
        lines.append(
            f"{name}: Dif-MAML - {LABELS[baseline]} = {difference:+.2f} points (+- {width:.2f})"
        )
    return "\n".join(lines)


def check(grouped: dict[str, list[Run]], tolerance: float, margin: float) -> list[str]:
    """The claims that fail: one line each (empty when all hold)."""
    failures = []
    found = comparisons(grouped)
    for name, members in grouped.items():
        present = {run.strategy for run in members}
        missing = [
            LABELS[strategy]
            for strategy in ("atc", "centralized", "noncooperative")
            if strategy not in present and not (strategy == "atc" and "cta" in present)
        ]
        if missing:
            failures.append(f"{name}: no {' and no '.join(missing)} run to compare")
    for name, baseline, difference, _ in found:
        if baseline == "centralized" and abs(difference) > tolerance:
            failures.append(
                f"{name}: Dif-MAML is {difference:+.2f} points from centralized "
                f"(allowed +-{tolerance:g})"
            )
        if baseline == "noncooperative" and difference < margin:
            failures.append(
                f"{name}: Dif-MAML is {difference:+.2f} points above non-cooperative "
                f"(needs at least {margin:g})"
            )
    return failures


def main(argv: list[str] | None = None) -> int:
    """Plot Fig. 2b and print the table; 2 on a bad input file, 1 if --check fails."""
    args = parse_args(argv)
    try:
        runs = load_runs(args.runs, metrics=("val_accuracy",), finals=("test_accuracy",))
        grouped = groups(runs)
    except RunFileError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    out = figure_path(args.out, runs, "fig2b.png")
    try:
        plot(grouped, out, args.title)
    except OSError as error:
        print(f"{PROG}: error: cannot write {out}: {error}", file=sys.stderr)
        return 2
    print(table(grouped))
    print(out)
    if args.check:
        failures = check(grouped, args.tolerance, args.margin)
        for failure in failures:
            print(f"{PROG}: claim fails: {failure}", file=sys.stderr)
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
