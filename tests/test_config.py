"""Typed config: job files, overrides, and the errors a user sees."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from dmeta.config import Config, config_from_json, load_config
from dmeta.errors import DmetaError
from dmeta.runner import resolve_agents_at_once
from dmeta.sweep import load_sweep

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.toml"))


def test_defaults_match_the_paper_sine_experiment() -> None:
    config = Config()
    assert config.agents == 40 and config.learner.inner_lr == 0.01
    assert config.optimizer.name == "adam" and config.optimizer.lr == 0.001
    assert config.task.support_shots == config.task.query_shots == 10
    assert config.model.hidden == [40, 40] and config.graph.rule == "averaging"


def test_job_file_and_overrides(tmp_path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('agents = 8\n[graph]\ntopology = "ring"\n[model]\nhidden = [5, 6]\n')
    config = load_config(job, ["graph.rule=metropolis", "optimizer.lr=0.5", "model.same_init=yes"])
    assert config.agents == 8 and config.graph.topology == "ring"
    assert config.graph.rule == "metropolis" and config.optimizer.lr == 0.5
    assert config.model.hidden == [5, 6] and config.model.same_init is True
    assert load_config(None, ["model.hidden=[3,4]"]).model.hidden == [3, 4]
    assert config_from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("agentz=3", "unknown config key 'agentz'"),
        ("graph.colour=red", "unknown config key 'graph.colour'"),
        ("agents=many", "agents = 'many' must be an integer"),
        ("optimizer.lr=fast", "optimizer.lr = 'fast' must be a number"),
        ("strategy=gossip", "strategy = 'gossip' is not one of"),
        ("agents=0", "agents = 0 must be at least 1"),
        ("graph=ring", "'graph' is a section"),
        ("agents", "must have the form KEY=VALUE"),
        ("model.same_init=maybe", "must be true or false"),
        ("seed=1180591620717411303424", "seed = 1180591620717411303424 must lie in"),
        ("seed=-1", "seed = -1 must lie in"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay = -0.1 must not be negative"),
    ],
)
def test_bad_overrides_name_the_problem(override: str, message: str) -> None:
    with pytest.raises(DmetaError, match=message.replace("(", r"\(").replace("'", "'")):
        load_config(None, [override])


def test_bad_job_files(tmp_path) -> None:
    with pytest.raises(DmetaError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("agents = = 3")
    with pytest.raises(DmetaError, match="not valid TOML"):
        load_config(broken)
    typo = tmp_path / "typo.toml"
    typo.write_text("[optimiser]\nlr = 0.1\n")
    with pytest.raises(DmetaError, match="unknown config key 'optimiser'"):
        load_config(typo)


def test_dmeta_config_shows_the_sections_a_run_reads(tmp_path, capsys) -> None:
    import json

    from dmeta import cli
    from dmeta.config import Config

    job = tmp_path / "job.toml"
    job.write_text("agents = 4\n")
    assert cli.main(["config", str(job)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert "task" in shown and "linear" not in shown and "federated" not in shown
    assert "problem_options" not in shown  # read only by a family given by import path
    assert cli.main(["config", str(job), "--set", "strategy=fedmeta"]) == 0
    assert "federated" in json.loads(capsys.readouterr().out)
    assert cli.main(["config", str(job), "--all"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(json.loads(Config().to_json()))


def test_an_integer_or_auto_key() -> None:
    """runtime.agents_at_once takes an integer or "auto", which resolves by device."""
    assert load_config(None, ["runtime.agents_at_once=16"]).runtime.agents_at_once == 16
    assert load_config(None, []).runtime.agents_at_once == "auto"
    with pytest.raises(DmetaError, match="must be an integer or 'auto'"):
        load_config(None, ["runtime.agents_at_once=most"])
    assert resolve_agents_at_once("auto", torch.device("cpu")) == 64
    assert resolve_agents_at_once("auto", torch.device("cuda")) == 0
    assert resolve_agents_at_once(8, torch.device("cuda")) == 8


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_and_sweep_file_loads(path: Path, tmp_path) -> None:
    """A job file's keys and values pass the config's checks; a sweep file's every member."""
    if "base" in tomllib.loads(path.read_text()):
        _, runs = load_sweep(path, tmp_path, [])
        assert runs
    else:
        assert isinstance(load_config(path), Config)
