"""A task family of one's own, named by import path (README "Your own task family"): the example
examples/my_task.py with its job examples/my_task.toml, its typed [problem_options], its own
model, and what the run file records. Bad families and options are in tests/test_badinput.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import h5py
import pytest
import torch

from dmeta import cli
from dmeta.config import config_digest, config_from_json, load_config, numbers_only
from dmeta.models import FlatModel
from dmeta.runner import build_learner, build_model, build_task
from dmeta.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "examples" / "my_task.toml"
PROBLEM = "examples.my_task:QuadraticTask"
SHORT = ["iterations=4", "log_every=2", "validation.tasks=10", "runtime.threads=1"]


@pytest.fixture(autouse=True)
def at_the_root(monkeypatch) -> None:
    """The example is imported from the working folder, as when run from the repository."""
    monkeypatch.chdir(ROOT)


def test_the_example_runs_and_its_run_file_records_the_family(tmp_path, capsys) -> None:
    out = tmp_path / "my_task.h5"
    sets = [item for o in SHORT for item in ("--set", o)]
    code = cli.main(["run", str(JOB), *sets, "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    source = ROOT / "examples" / "my_task.py"
    with h5py.File(out) as f:
        assert f.attrs["complete"]
        config = json.loads(f.attrs["config"])
        assert config["problem"] == PROBLEM
        assert config["problem_options"]["noise_std"] == 0.1
        assert config["problem_options"]["model"] == "mlp"
        assert config_from_json(f.attrs["config"]) == load_config(JOB, SHORT)
        assert f.attrs["problem_file"] == str(source)
        assert f.attrs["problem_file_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert list(f["time/iteration"]) == [0, 2, 4]
        # The family's own score: one value per logged row and agent, and the centroid's.
        assert f["metrics/val_mae"].shape == f["metrics/val_loss"].shape == (3, 6)
        assert f["centroid/val_mae"].shape == (3,)
        assert torch.isfinite(torch.as_tensor(f["metrics/val_mae"][()])).all()


def test_options_are_typed_and_resolved() -> None:
    from examples.my_task import QuadraticTask

    overrides = ["problem_options.support_shots=5", "problem_options.model=quadratic"]
    config = load_config(JOB, overrides)
    expected = dataclasses.replace(QuadraticTask.Options(), support_shots=5, model="quadratic")
    # Every field is stored, those the job leaves alone at their defaults.
    assert config.problem_options == dataclasses.asdict(expected)
    # The digest (sweep members' stationarity draws) follows the options.
    assert config_digest(config) == config_digest(load_config(JOB, overrides))
    assert config_digest(config) != config_digest(load_config(JOB))
    noisier = load_config(JOB, ["problem_options.noise_std=0.2"])
    assert config_digest(noisier) != config_digest(load_config(JOB))


def test_a_checkpoint_of_a_built_in_problem_from_before_options_existed_resumes() -> None:
    from dmeta.checkpoint import _differences

    config = load_config(None, ["agents=4"])
    saved = json.loads(config.to_json())
    del saved["problem_options"]  # what a run file of an earlier dmeta holds
    assert _differences(numbers_only(json.dumps(saved)), numbers_only(config.to_json())) == []
    options = numbers_only(load_config(JOB).to_json())["problem_options"]
    assert options["noise_std"] == 0.1


def test_the_family_builds_its_own_model_for_the_learners() -> None:
    config = load_config(JOB, ["problem_options.model=quadratic", "runtime.dtype=float64"])
    task = build_task(config, torch.float64, torch.device("cpu"))
    assert task.config.model == "quadratic" and task.config.support_shots == 10
    model = build_model(task, config)
    assert isinstance(model, FlatModel) and model.num_parameters == 3  # w2, w1 and w0
    agents = torch.arange(3)
    batch = task.sample(agents, 1, 4)
    assert batch.support_x.shape == (3, 4, 10, 1) and batch.query_y.shape == (3, 4, 10, 1)
    learner = build_learner(config.learner, model, task)
    launch = task.initial_parameters(model, agents, False, torch.float64)
    gradients, losses = learner.meta_gradients(launch, batch)
    assert gradients.shape == (3, 3) and torch.isfinite(gradients).all()
    # Another stream draws other tasks; the same call the same ones.
    assert torch.equal(task.sample(agents, 1, 4).support_y, batch.support_y)
    assert not torch.equal(task.sample(agents, 1, 4, stream=4).support_y, batch.support_y)


def test_dmeta_config_shows_the_options(capsys) -> None:
    assert cli.main(["config", str(JOB)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["problem"] == PROBLEM and shown["problem_options"]["curvature"] == 1.0
    assert "model" in shown and "task" not in shown and "linear" not in shown


def test_a_sweep_varies_options(tmp_path) -> None:
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f'base = "{JOB}"\n[vary]\n"problem_options.noise_std" = [0.0, 0.5]\n')
    _, runs = load_sweep(sweep, tmp_path, [])
    assert [run.out.name for run in runs] == ["noise_std=0.0.h5", "noise_std=0.5.h5"]
    assert [run.config.problem_options["noise_std"] for run in runs] == [0.0, 0.5]
