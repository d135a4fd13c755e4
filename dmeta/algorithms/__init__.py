"""Algorithms by strategy name: the one place a `strategy` string is looked up.

Each algorithm is one module behind `dmeta.algorithms.base.Algorithm`; to add one, write the
module and add its name here (and to `config.Strategy`).
"""

from __future__ import annotations

from dmeta.algorithms.base import Algorithm
from dmeta.algorithms.centralized import Centralized
from dmeta.algorithms.diffusion import ATC, CTA
from dmeta.algorithms.federated import FedAvg, FedMeta
from dmeta.algorithms.l2c import L2C
from dmeta.algorithms.meta_l2c import MetaL2C
from dmeta.algorithms.noncooperative import NonCooperative
from dmeta.algorithms.persafl import PersAFL
from dmeta.algorithms.pushsum import PushSum
from dmeta.errors import DmetaError

REGISTRY: dict[str, type[Algorithm]] = {
    "atc": ATC,
    "cta": CTA,
    "centralized": Centralized,
    "noncooperative": NonCooperative,
    "fedmeta": FedMeta,
    "fedavg": FedAvg,
    "pushsum": PushSum,
    "l2c": L2C,
    "meta_l2c": MetaL2C,
    "persafl": PersAFL,
}


def algorithm_class(strategy: str) -> type[Algorithm]:
    """The algorithm of `strategy`."""
    try:
        return REGISTRY[strategy]
    except KeyError:
        choices = ", ".join(REGISTRY)
        raise DmetaError(f"unknown strategy {strategy!r}: choose one of {choices}") from None
