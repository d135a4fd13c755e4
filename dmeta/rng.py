"""Counter-based random numbers, keyed per agent and vectorized over agents.

Every random number in a run is a pure function of (run seed, agent id, stream, iteration,
index): a keyed integer hash, evaluated for all agents of a rank in one tensor expression. So
a run draws the same numbers whatever the number of ranks (no generator belongs to a rank), no
Python loop over agents is needed, and the whole random state of a run is its iteration
counter, which makes checkpoints trivial.

The mixer is the 32-bit finaliser of MurmurHash3 applied in a keyed cascade; 32-bit products
are formed from 16-bit halves so that every intermediate fits in int64 on any device.
Element indices are 32-bit: one draw holds fewer than 2^32 numbers per agent.
"""

from __future__ import annotations

import math

import torch

Word = int | torch.Tensor

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9

# Streams: independent families of random numbers. A new use of randomness gets a new stream.
STREAM_INIT = 1
STREAM_TASKS = 2
STREAM_VALIDATION = 3
STREAM_STATIONARITY = 4
STREAM_TRUTH = 5
STREAM_HEADS = 6
STREAM_TEST = 7
STREAM_SPLIT = 8


def _mul32(a: Word, constant: int) -> Word:
    """(a * constant) mod 2^32 for 0 <= a < 2^32, without int64 overflow."""
    high, low = a >> 16, a & 0xFFFF
    return ((((high * constant) & 0xFFFF) << 16) + low * constant) & _MASK32


def _fmix32(h: Word) -> Word:
    """MurmurHash3's 32-bit finaliser: a bijection of [0, 2^32) with full avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _absorb(state: Word, value: Word) -> Word:
    """Mix one more 32-bit word into the hash state (Python ints and int64 tensors alike)."""
    return _fmix32((state ^ ((_fmix32(value & _MASK32) + _GOLDEN) & _MASK32)) & _MASK32)


def random_bits(
    seed: int, agents: torch.Tensor, stream: int, iteration: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """Uniform 32-bit integers (as int64) of shape [len(agents), *shape], one family per agent.

    Element [a, j...] depends only on (seed, agents[a], stream, iteration, flat index j).
    """
    # The words common to all agents are mixed in Python integers: only the agent id and the
    # element index are tensor work.
    state = seed & _MASK32
    for word in (seed >> 32, stream, iteration, iteration >> 32):
        state = _absorb(state, word & _MASK32)
    count = math.prod(shape)
    index = torch.arange(count, device=agents.device, dtype=torch.int64)
    state = _absorb(torch.full_like(agents, state, dtype=torch.int64), agents.to(torch.int64))
    bits = _absorb(state[:, None], index)
    return bits.reshape(len(agents), *shape)


def uniform(
    seed: int,
    agents: torch.Tensor,
    stream: int,
    iteration: int,
    shape: tuple[int, ...],
    low: torch.Tensor | float = 0.0,
    high: torch.Tensor | float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform samples in [low, high) of shape [len(agents), *shape], keyed per agent.

    `low` and `high` broadcast against the result (e.g. per-agent bounds of shape [A, 1, ...]).
    """
    bits = random_bits(seed, agents, stream, iteration, shape)
    # 2^-32 * bits lies in [0, 1); float64 first keeps all 32 bits before rounding to dtype.
    unit = (bits.to(torch.float64) * (1.0 / 4294967296.0)).to(dtype)
    return low + (high - low) * unit


def normal(
    seed: int,
    agents: torch.Tensor,
    stream: int,
    iteration: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal samples of shape [len(agents), *shape], keyed per agent (Box-Muller from
    two uniform words per element)."""
    bits = random_bits(seed, agents, stream, iteration, (2, *shape)).to(torch.float64)
    # (bits + 0.5) / 2^32 lies in (0, 1): the logarithm stays finite.
    unit = (bits + 0.5) * (1.0 / 4294967296.0)
    radius = torch.sqrt(-2.0 * torch.log(unit[:, 0]))
    return (radius * torch.cos(2.0 * math.pi * unit[:, 1])).to(dtype)
