"""The README's shell commands work as written (the cheap ones run, the others are checked).

Every ```sh block is read; a command of the `dmeta` console script is run with its job file and
its --set overrides but a cheap action (`run` becomes `config`, `sweep` gets `--count`, `graph`
runs as is with any picture sent to a temporary folder), analysis scripts must answer `--help`,
and `make` targets must exist. So a renamed job file, key or script fails here.
"""

from __future__ import annotations

import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dmeta import cli

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


COMMANDS = _commands()
# `dmeta status RUN.h5` reads a run file, which a fresh clone does not have: its --help only.
DMETA = [c for c in COMMANDS if c.startswith(".venv/bin/dmeta ") and " status " not in c]
STATUS = [c for c in COMMANDS if c.startswith(".venv/bin/dmeta status ")]
ANALYSIS = [c for c in COMMANDS if re.match(r"\.venv/bin/python analysis/\w+\.py", c)]
MAKE = [c for c in COMMANDS if c.startswith("make ")]


def test_the_readme_has_commands_of_every_kind(capsys) -> None:
    assert len(DMETA) >= 5 and ANALYSIS and MAKE and STATUS
    with pytest.raises(SystemExit) as exit_:
        cli.main(["status", "--help"])
    assert exit_.value.code == 0 and "usage: dmeta status" in capsys.readouterr().out
    bare = [c for c in COMMANDS if re.match(r"(dmeta|python analysis)\b", c)]
    assert not bare, f"use .venv/bin/... as the rest of the README does: {bare}"


def _cheap(command: str, folder: Path) -> list[str]:
    words = shlex.split(command)[1:]
    subcommand = words[0]
    words = [w for w in words if w not in ("--quiet", "--parallel") and not w.isdigit()]
    if "--out" in words:  # run: the output file does not matter for `config`
        at = words.index("--out")
        del words[at : at + 2]
    if "--out-dir" in words:
        at = words.index("--out-dir")
        words[at + 1] = str(folder / "sweep")
    if "--plot" in words:
        at = words.index("--plot")
        words[at + 1] = str(folder / "graph.png")
    if subcommand == "run":
        words[0] = "config"
    elif subcommand == "sweep":
        words.append("--count")
    return words


@pytest.mark.parametrize("command", DMETA)
def test_dmeta_commands_check_out(command, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    code = cli.main(_cheap(command, tmp_path))
    assert code == 0, f"{command}\n{capsys.readouterr().err[-1500:]}"


@pytest.mark.parametrize("script", sorted({c.split()[1] for c in ANALYSIS}))
def test_analysis_scripts_answer_help(script, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.syspath_prepend(str(ROOT / "analysis"))
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("command", MAKE)
def test_make_targets_exist(command) -> None:
    target = command.split()[1]
    result = subprocess.run(
        ["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
