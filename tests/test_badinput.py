"""Every bad input and fault of issue 13 and DEVELOPERS' list, one table: each gives exactly one
`dmeta: error:` line naming the problem, the right exit status, no traceback, no file under the
final name, and leaves an earlier result untouched.

The cheap cases run in-process through `dmeta.cli.main`; only those about ranks run under
`mpiexec -n 2`. A full disk is tested by an injected write error and, where this machine lets
us mount one, a real tiny tmpfs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import SMALL

from dmeta import cli, tasks
from dmeta.checkpoint import check_checkpoint
from dmeta.config import load_config

ROOT = Path(__file__).parent.parent
JOB = ROOT / "jobs" / "sine_quick.toml"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "analysis"))
import fig1b  # noqa: E402
import theorem1  # noqa: E402

SETS = [item for o in SMALL for item in ("--set", o)]


def sets(*overrides: str) -> list[str]:
    return [item for o in overrides for item in ("--set", o)]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(err: str, prefix: str = "dmeta") -> str:
    """The single `<prefix>: error:` line of `err`; fails on a traceback or on several lines."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{prefix}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def main(capsys, *argv: str) -> tuple[int, str]:
    """`dmeta ARGV` in this process: (exit status, stderr)."""
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


# Each case: name -> function(tmp_path) returning the `dmeta` arguments (before --out).
def _file(name: str, data: bytes) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        (tmp / name).write_bytes(data)
        return ["run", tmp / name]

    return make


def _edges(text: str, agents: int) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        (tmp / "edges.txt").write_text(text)
        topology = ["graph.topology=edge_list", f"graph.edge_list_path={tmp / 'edges.txt'}"]
        return ["run", JOB, *SETS, *sets(f"agents={agents}", *topology)]

    return make


def _matrix(tmp: Path) -> list[str]:
    np.savetxt(tmp / "a.txt", np.array([[0.5, 0.5], [0.4, 0.5]]))
    return ["run", JOB, *sets("agents=2", "graph.rule=matrix", f"graph.matrix_path={tmp}/a.txt")]


def _omniglot(tmp: Path) -> list[str]:
    (tmp / "omniglot" / "Greek" / "character01").mkdir(parents=True)  # no images
    return ["run", JOB, *sets("problem=fewshot", f"fewshot.paths=[{tmp / 'omniglot'}]")]


def _run(*overrides: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["run", JOB, *SETS, *sets(*overrides)]


RUN_CASES = {
    "latin-1 config": (_file("latin.toml", "agents = 5 # é\n".encode("latin-1")), "not UTF-8"),
    "binary config": (_file("binary.toml", bytes(range(256))), "not UTF-8"),
    "empty config": (_file("empty.toml", b""), "sets no keys"),
    "invalid TOML": (_file("bad.toml", b"agents = = 3\n"), "not valid TOML"),
    "quoted number": (_file("quoted.toml", b'iterations = "40"\n'), "remove the quotes"),
    "config is a folder": (lambda tmp: ["run", tmp], "is a folder"),
    "missing config": (lambda tmp: ["run", tmp / "none.toml"], "does not exist"),
    "unknown key": (_run("agentz=3"), "unknown config key 'agentz'"),
    "wrong type": (_run("agents=many"), "must be an integer"),
    "NaN step size": (_run("optimizer.lr=nan"), "optimizer.lr = nan must be a finite"),
    "infinite step size": (_run("optimizer.lr=inf"), "must be a finite"),
    "infinite inner step": (_run("learner.inner_lr=inf"), "learner.inner_lr = inf"),
    "NaN amplitude": (_run("task.amplitude_max=nan"), "task.amplitude_max = nan"),
    "negative eps": (_run("optimizer.eps=-1"), "optimizer.eps = -1.0 must be positive"),
    "beta1 above 1": (_run("optimizer.beta1=1.5"), "optimizer.beta1 = 1.5 must lie in [0, 1)"),
    "seed above 2^64": (_run("seed=1180591620717411303424"), "[0, 2^64)"),
    "disconnected graph": (_edges("0 1\n2 3\n", 4), "connected"),
    "agent with no edges": (_edges("0 1\n1 2\n2 3\n3 0\n", 5), "no neighbour at all"),
    "non-stochastic matrix": (_matrix, "column"),
    "missing edge list": (
        _run("graph.topology=edge_list", "graph.edge_list_path=/no/such/edges.txt"),
        "/no/such/edges.txt",
    ),
    "missing matrix file": (
        _run("graph.rule=matrix", "graph.matrix_path=/no/such/a.txt"),
        "/no/such/a.txt",
    ),
    "Omniglot folder without images": (_omniglot, "holds no images"),
    "missing data folder": (
        _run("problem=fewshot", "fewshot.paths=[/no/such/omniglot]"),
        "/no/such/omniglot does not exist",
    ),
    "out is a folder": (lambda tmp: (tmp / "run.h5").mkdir() or ["run", JOB, *SETS], "a folder"),
    "own validation tasks of a family without them": (
        _run("problem=linear_representation", "validation.own_tasks=true"),
        "problem = 'linear_representation' has no validation tasks of each agent's own",
    ),
}


@pytest.mark.parametrize("case", RUN_CASES)
def test_bad_run_input(tmp_path, capsys, case) -> None:
    make, fragment = RUN_CASES[case]
    out = tmp_path / "run.h5"
    code, err = main(capsys, *make(tmp_path), "--out", out, "--quiet")
    assert code == 2
    assert fragment in one_error_line(err)
    assert not out.is_file() and not Path(f"{out}.partial").exists()


# A task family of one's own (`problem = "module:Class"`, README "Your own task family"): each
# case is (the source of a module written as tmp/<name>.py or None, the problem with {module}
# for its name, more overrides, the fragment of the error line).
EXAMPLE = "examples.my_task:QuadraticTask"
FAMILY = "from examples.my_task import QuadraticTask\n\n\nclass Task(QuadraticTask):\n"
OPTIONS = "from dataclasses import dataclass, field\n\n\n" + FAMILY + "    @dataclass\n"
PROBLEM_CASES = {
    "neither a problem nor a path": (None, "sinus", (), "nor the import path"),
    "not an import path": (None, "my task:Task", (), "is not an import path"),
    "module not found": (None, "no_such_module_4711:Task", (), "no module named"),
    "module raising": ("raise RuntimeError('no data here')", "{module}:Task", (), "no data here"),
    "module with a syntax error": ("def (:\n", "{module}:Task", (), "raised SyntaxError"),
    "module missing a dependency": (
        "import no_such_dependency_4711",
        "{module}:Task",
        (),
        "raised ModuleNotFoundError: No module named 'no_such_dependency_4711'",
    ),
    "class missing": ("X = 1", "{module}:Task", (), "has no attribute 'Task'"),
    "not a class": ("Task = 3", "{module}:Task", (), "of type 'int', not a class"),
    "not a TaskFamily": ("class Task:\n    pass", "{module}:Task", (), "does not derive from"),
    "methods missing": (
        "from dmeta.tasks import TaskFamily\n\n\nclass Task(TaskFamily):\n    pass",
        "{module}:Task",
        (),
        "does not implement build_model, sample, validation_set",
    ),
    "Options not a dataclass": (FAMILY + "    Options = dict", "{module}:Task", (), "dataclass"),
    "option of no config type": (
        OPTIONS + "    class Options:\n        table: dict = field(default_factory=dict)",
        "{module}:Task",
        (),
        "Options.table has the type",
    ),
    "option without a default": (
        OPTIONS + "    class Options:\n        size: int",
        "{module}:Task",
        (),
        "Options.size needs a default",
    ),
    "unknown option": (None, EXAMPLE, ["problem_options.noise=1"], "'problem_options.noise'"),
    "option of a wrong type": (
        None,
        EXAMPLE,
        ["problem_options.noise_std=much"],
        "problem_options.noise_std = 'much' must be a number",
    ),
    "option not a choice": (None, EXAMPLE, ["problem_options.model=cnn"], "is not one of"),
    "NaN option": (None, EXAMPLE, ["problem_options.noise_std=nan"], "must be a finite number"),
    "option out of range": (
        None,
        EXAMPLE,
        ["problem_options.noise_std=-1"],
        "problem_options.noise_std = -1.0 must not be negative",
    ),
    "options of a built-in problem": (
        None,
        "sine",
        ["problem_options.noise_std=1"],
        "read only by a task family given by import path",
    ),
    "constructor raising": (
        FAMILY + "    def __init__(self, *args):\n        raise ValueError('cannot find the data')",
        "{module}:Task",
        (),
        "(...) raised ValueError: cannot find the data (",
    ),
    "build_model returning no model": (
        FAMILY + "    def build_model(self, config):\n        return 3",
        "{module}:Task",
        (),
        "build_model returned an object of type 'int'",
    ),
    "model with buffers": (
        FAMILY
        + "    def build_model(self, config):\n"
        + "        import torch\n\n        return torch.nn.BatchNorm1d(1)",
        "{module}:Task",
        (),
        "holds buffers (running_mean, running_var, num_batches_tracked)",
    ),
    "tasks of the wrong shape": (
        "from dmeta.tasks import TaskBatch\n"
        + FAMILY
        + "    def sample(self, *args, **kwargs):\n"
        + "        return TaskBatch(*(part[0] for part in super().sample(*args, **kwargs)))",
        "{module}:Task",
        (),
        "sample returned support_x of shape [50, 10, 1]; every part must be a tensor [7, *, sh",
    ),
}


@pytest.mark.parametrize("case", PROBLEM_CASES)
def test_bad_task_family(tmp_path, capsys, monkeypatch, case) -> None:
    source, problem, overrides, fragment = PROBLEM_CASES[case]
    module = "family_" + "".join(c if c.isalnum() else "_" for c in case)
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source + "\n")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.chdir(ROOT)  # the working folder is searched for examples.my_task
    out = tmp_path / "run.h5"
    problem = problem.format(module=module)
    argv = ["run", JOB, *SETS, *sets(f"problem={problem}", *overrides), "--out", out, "--quiet"]
    code, err = main(capsys, *argv)
    sys.modules.pop(module, None)
    assert code == 2
    assert fragment in one_error_line(err)
    assert not out.is_file() and not Path(f"{out}.partial").exists()


def test_quoted_number_of_an_option(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    job = tmp_path / "job.toml"
    job.write_text(f'problem = "{EXAMPLE}"\n[problem_options]\nsupport_shots = "5"\n')
    code, err = main(capsys, "config", job)
    assert code == 2
    assert "problem_options.support_shots = '5' is a string" in one_error_line(err)


@pytest.mark.parametrize("command", ["config", "graph"])
def test_other_commands_on_a_bad_config(tmp_path, capsys, command) -> None:
    (tmp_path / "latin.toml").write_bytes("agents = 5 # é\n".encode("latin-1"))
    code, err = main(capsys, command, tmp_path / "latin.toml")
    assert code == 2 and "not UTF-8" in one_error_line(err)


def test_graph_picture_in_a_missing_folder(tmp_path, capsys) -> None:
    picture = tmp_path / "missing" / "g.png"
    code, err = main(capsys, "graph", JOB, "--plot", picture)
    assert code == 2 and "does not exist; create it first" in one_error_line(err)
    assert not picture.exists()


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> Path:
    """A complete small run file made by `dmeta run` (the earlier result of several cases)."""
    out = tmp_path_factory.mktemp("result") / "run.h5"
    assert cli.main(["run", str(JOB), *SETS, "--out", str(out), "--quiet"]) == 0
    return out


def test_a_complete_result_is_not_overwritten(tmp_path, capsys, result) -> None:
    out = tmp_path / "run.h5"
    shutil.copy(result, out)
    before = digest(out)
    code, err = main(capsys, "run", JOB, *SETS, "--out", out, "--quiet")
    assert code == 2 and "pass --overwrite" in one_error_line(err)
    assert digest(out) == before and sorted(tmp_path.iterdir()) == [out]
    assert main(capsys, "run", JOB, *SETS, "--out", out, "--quiet", "--overwrite")[0] == 0
    assert digest(out) != before and sorted(tmp_path.iterdir()) == [out]


def test_divergence_is_caught_at_the_next_poll(tmp_path, capsys) -> None:
    out = tmp_path / "run.h5"
    overrides = sets("optimizer.lr=1e4", "log_every=100", "iterations=200")
    code, err = main(capsys, "run", JOB, *SETS, *overrides, "--out", out, "--quiet")
    assert code == 2
    line = one_error_line(err)
    assert "diverged by iteration" in line and "lower optimizer.lr" in line
    assert int(line.split("iteration ")[1].split()[0]) <= 10  # poll_every, not log_every
    assert not out.exists()


@pytest.mark.parametrize(
    ("failure", "where"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "on cpu"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: 8 GB"), "on the host"),
    ],
)
@pytest.mark.parametrize("when", ["training", "setting up"])
def test_running_out_of_memory_says_what_to_change(tmp_path, capsys, failure, where, when):
    def fail(original):
        def failing(self, *args, **kwargs):
            if when == "setting up" or args[1] == 3:  # sample(agents, iteration, ...)
                raise failure
            return original(self, *args, **kwargs)

        return failing

    name = "sample" if when == "training" else "validation_set"
    setattr(tasks.SineTask, name, fail(getattr(tasks.SineTask, name)))  # undone below
    out = tmp_path / "run.h5"
    code, err = main(capsys, "run", JOB, *SETS, "--out", out, "--quiet")
    line = one_error_line(err)
    assert code == 2 and f"out of memory {where}" in line, line
    assert "runtime.agents_at_once below" in line and str(failure) in line
    assert not out.exists()


def stopped_run(tmp_path: Path, capsys) -> Path:
    """A run stopped by SIGTERM with a checkpoint: its run file path."""
    out = tmp_path / "run.h5"
    overrides = sets("iterations=40", "checkpoint.poll_every=2")
    send_signals(lambda iteration: iteration == 3 and signal.SIGTERM)
    code, err = main(capsys, "run", JOB, *SETS, *overrides, "--out", out, "--quiet")
    assert code == 75 and "run the same command again to resume" in err, err
    return out


def send_signals(when: Callable[[int], object]) -> None:
    """Make this process signal itself while drawing the tasks of an iteration (`when(i)`
    gives the signal or a false value); undone by the autouse fixture below."""
    original = tasks.SineTask.sample

    def sample(self, agents, iteration, *args, **kwargs):
        how = when(iteration)
        if how and kwargs.get("stream") is None:
            os.kill(os.getpid(), how)
        return original(self, agents, iteration, *args, **kwargs)

    tasks.SineTask.sample = sample


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    monkeypatch.setattr(tasks.SineTask, "sample", tasks.SineTask.sample)
    monkeypatch.setattr(tasks.SineTask, "validation_set", tasks.SineTask.validation_set)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)


def test_truncated_partial_on_resume(tmp_path, capsys) -> None:
    out = stopped_run(tmp_path, capsys)
    partial = Path(f"{out}.partial")
    partial.write_bytes(partial.read_bytes()[:2000])
    code, err = main(capsys, "run", JOB, *SETS, *sets("iterations=40"), "--out", out)
    assert code == 2 and "pass --restart" in one_error_line(err)
    assert not out.exists()


def test_corrupt_checkpoint(tmp_path, capsys) -> None:
    out = stopped_run(tmp_path, capsys)
    Path(f"{out}.ckpt").write_bytes(b"not HDF5")
    code, err = main(capsys, "run", JOB, *SETS, *sets("iterations=40"), "--out", out)
    assert code == 2 and "is corrupt" in one_error_line(err)


def test_ctrl_c_checkpoints_and_a_second_stops_at_once(tmp_path, capsys) -> None:
    out = tmp_path / "run.h5"
    once = sets("iterations=40", "checkpoint.poll_every=2")
    send_signals(lambda iteration: iteration == 3 and signal.SIGINT)
    code, err = main(capsys, "run", JOB, *SETS, *once, "--out", out, "--quiet")
    assert code == 75 and "Traceback" not in err and "dmeta: error" not in err
    assert "run the same command again to resume" in err
    # Twice: the checkpoint of iteration 4 stays; the second Ctrl-C comes before the next poll.
    out = tmp_path / "twice.h5"
    twice = sets("iterations=40", "checkpoint.poll_every=20", "checkpoint.every_iterations=4")
    send_signals(lambda iteration: iteration in (6, 7) and signal.SIGINT)
    code, err = main(capsys, "run", JOB, *SETS, *twice, "--out", out, "--quiet")
    assert code == 130
    assert "interrupted twice" in one_error_line(err) and "is kept" in err
    config = load_config(JOB, [*SMALL, "iterations=40", "checkpoint.every_iterations=4"])
    assert check_checkpoint(Path(f"{out}.ckpt"), config) == 4
    assert not out.exists()


def test_full_disk_injected(tmp_path, capsys, monkeypatch, result) -> None:
    out = tmp_path / "run.h5"
    shutil.copy(result, out)
    before = digest(out)
    calls = []
    original = h5py.File.flush

    def flush(self):
        calls.append(1)
        if len(calls) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self)

    monkeypatch.setattr(h5py.File, "flush", flush)
    overrides = sets("output.flush_every=1", "checkpoint.every_iterations=4")
    code, err = main(capsys, "run", JOB, *SETS, *overrides, "--out", out, "--overwrite")
    assert code == 2
    line = one_error_line(err)
    assert f"the disk holding {tmp_path} is full" in line and "checkpoint" in line, line
    assert digest(out) == before
    config = load_config(JOB, [*SMALL, *overrides[1::2]])
    assert check_checkpoint(Path(f"{out}.ckpt"), config) == 4


@pytest.fixture
def tiny_disk(tmp_path):
    """A 120 KiB tmpfs, or a skip saying why there is none."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=120k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_real(tmp_path, tiny_disk) -> None:
    out = tiny_disk / "run.h5"
    overrides = sets("iterations=200", "log_every=1", "output.flush_every=1")
    result = subprocess.run(
        [sys.executable, "-m", "dmeta.cli", "run", JOB, *SETS, *overrides, "--out", out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"the disk holding {tiny_disk} is full" in one_error_line(result.stderr)
    assert not out.exists()


def test_a_sweep_checks_every_member_before_the_first_runs(tmp_path, capsys) -> None:
    (tmp_path / "small.toml").write_text("agents = 7\niterations = 4\n")
    sweep = tmp_path / "sweep.toml"
    missing = tmp_path / "missing.txt"
    sweep.write_text(
        'base = "small.toml"\n[vary]\n"graph.topology" = ["ring", "edge_list"]\n'
        f'"graph.edge_list_path" = ["", "{missing}"]\n'
    )
    code, err = main(capsys, "sweep", sweep, "--out-dir", tmp_path / "o")
    assert code == 2 and "sweep member 1" in one_error_line(err) and str(missing) in err
    sweep.write_text('base = "small.toml"\n[vary]\nagents = [7, 2]\n')
    code, err = main(capsys, "sweep", sweep, "--ranks", "3", "--out-dir", tmp_path / "o")
    assert code == 2 and "3 ranks but only 2 agents" in one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_a_sweep_skips_complete_members(tmp_path, capsys, result) -> None:
    (tmp_path / "small.toml").write_text("agents = 7\n")
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('base = "small.toml"\n[vary]\nseed = [0]\n')
    (tmp_path / "o").mkdir()
    shutil.copy(result, tmp_path / "o" / "seed=0.h5")
    assert cli.main(["sweep", str(sweep), "--out-dir", str(tmp_path / "o")]) == 0
    assert "complete, skipped" in capsys.readouterr().out
    code = cli.main(["sweep", str(sweep), "--out-dir", str(tmp_path / "o"), "--index", "0"])
    assert code == 0 and "complete, skipped" in capsys.readouterr().out


def _strings(file: h5py.File) -> None:
    del file["metrics/val_loss"]
    file["metrics/val_loss"] = np.full((4, 7), "x", dtype="S3")


def _nan(file: h5py.File) -> None:
    file["metrics/val_loss"][...] = np.nan


def _lambda2(file: h5py.File) -> None:
    file["topology"].attrs["lambda2"] = "0.5"


def _lr(file: h5py.File) -> None:
    file.attrs["config"] = file.attrs["config"].replace('"lr": 0.001', '"lr": "0.001"')


ANALYSIS_CASES = {
    "string metrics": (_strings, fig1b, "holds |S3 values, not numbers"),
    "all-NaN metrics": (_nan, fig1b, "holds no finite value"),
    "string lambda2": (_lambda2, theorem1, "lambda2 = '0.5' is not a number"),
    "string optimizer.lr": (_lr, theorem1, "optimizer.lr = '0.001' is not a number"),
}


@pytest.mark.parametrize("case", ANALYSIS_CASES)
def test_analysis_of_a_mistyped_run_file(tmp_path, capsys, result, case) -> None:
    damage, script, fragment = ANALYSIS_CASES[case]
    path = tmp_path / "run.h5"
    shutil.copy(result, path)
    with h5py.File(path, "a") as file:
        damage(file)
    assert script.main([str(path), "--out", str(tmp_path / "f.png")]) == 2
    assert fragment in one_error_line(capsys.readouterr().err, script.PROG)


# Under mpiexec: errors after the ranks agreed are printed once, with no Abort lines.
MPI_CASES = {
    "divergence": (
        sets("optimizer.lr=1e4", "log_every=100", "iterations=200", "checkpoint.poll_every=2"),
        "diverged by iteration 2",
    ),
    "Omniglot folder without images": (
        sets("problem=fewshot", "fewshot.paths=[EMPTY]"),
        "holds no images",
    ),
}


@pytest.mark.parametrize("case", MPI_CASES)
def test_under_mpiexec(tmp_path, case) -> None:
    overrides, fragment = MPI_CASES[case]
    (tmp_path / "empty" / "Greek" / "character01").mkdir(parents=True)
    overrides = [o.replace("EMPTY", str(tmp_path / "empty")) for o in overrides]
    out = tmp_path / "run.h5"
    command = [BIN / "mpiexec", "-n", "2", sys.executable, "-m", "dmeta.cli", "run", JOB, *SETS]
    result = subprocess.run(
        [str(c) for c in [*command, *overrides, "--out", out, "--quiet"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert fragment in one_error_line(result.stderr)
    assert "Abort" not in result.stderr and not out.exists()
