"""The algorithm registry and interface: one place maps a strategy name to its module."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from dmeta.algorithms import REGISTRY, algorithm_class
from dmeta.algorithms.base import Algorithm
from dmeta.config import Strategy
from dmeta.errors import DmetaError

DMETA = Path(__file__).resolve().parents[1] / "dmeta"


def test_every_configurable_strategy_has_an_algorithm() -> None:
    assert set(REGISTRY) == set(typing.get_args(Strategy))
    for algorithm in REGISTRY.values():
        assert issubclass(algorithm, Algorithm)
    with pytest.raises(DmetaError, match="unknown strategy 'gossip'"):
        algorithm_class("gossip")


def test_no_strategy_name_is_tested_outside_the_registry() -> None:
    """The engine, the runner and the exchange never branch on a strategy's name."""
    names = "|".join(REGISTRY)
    pattern = re.compile(rf"strategy\s*(==|!=|in)|[\"']({names})[\"']")
    for path in ("engine.py", "runner.py", "exchange.py", "checkpoint.py", "output.py"):
        for number, line in enumerate((DMETA / path).read_text().splitlines(), start=1):
            assert not pattern.search(line), f"dmeta/{path}:{number}: {line.strip()}"
