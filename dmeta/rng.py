"""Counter-based random numbers: Philox4x32-10 keyed by the run seed, vectorized over agents.

Every random number in a run is a pure function of (run seed, agent id, stream, iteration,
element index), evaluated for all agents of a rank in one tensor expression. So a run draws the
same numbers whatever the number of ranks (no generator belongs to a rank), no Python loop over
agents is needed, and the whole random state of a run is its iteration counter, which makes
checkpoints trivial.

Element j of agent a's draw is one block of Philox4x32-10 (Salmon, Moraes, Dror and Shaw,
"Parallel random numbers: as easy as 1, 2, 3", SC 2011; the Random123 library): four 32-bit
words computed from the 128-bit counter

    word 0: element index j          (32 bits: fewer than 2^32 numbers per agent and draw)
    word 1: agent id a               (32 bits)
    word 2: iteration, bits 0-31
    word 3: iteration, bits 32-47, then stream << 16   (48-bit iteration, 16-bit stream)

under the 64-bit key `seed` (low word, high word). For a fixed key Philox is a bijection of
the counter, so distinct (seed, agent, stream, iteration, index) tuples never share a block: no
two draws of a run coincide, unlike a hash into a smaller state. The arithmetic is int64 tensor
work on any device: a 32 x 32-bit product wraps modulo 2^64 in int64 and keeps all 64 bits.

Streams: independent families of random numbers, one per use. A new use gets a new stream.

    1  STREAM_INIT             launch models w_{k,0} (per agent, or agent 0 with same_init)
    2  STREAM_TASKS            meta-training tasks; iteration = task draw number
    3  STREAM_VALIDATION       fixed validation tasks (agent 0, iteration 0)
    4  STREAM_STATIONARITY     tasks of the stationarity estimate (iteration 0)
    5  STREAM_TRUTH            the linear-representation task's B* (agent 0, iteration 0)
    6  STREAM_HEADS            the linear-representation task's fixed heads (iteration 0)
    7  STREAM_TEST             fixed few-shot meta-test episodes (agent 0, iteration 0)
    8  STREAM_SPLIT            Omniglot's shuffle of characters into splits (agent 0)
    9  STREAM_PARTITION        the shuffle of meta-train classes among agents (agent 0)
    10 STREAM_INIT_DIRECTIONS  directions of the linear-representation launch at a distance
    11 STREAM_CLIENTS          the server's sample of clients in a federated round (agent 0,
                               iteration = round; PersA-FL: iteration = dispatch instant)
    12 STREAM_CLIENT_SPLIT     federated data: the shuffle of clients into train, validation
                               and test clients (agent 0, iteration 0)
    13 STREAM_CLIENT_EXAMPLES  federated data: the order of a client's examples, which fixes
                               its support and query sets (key: the client's source index)
    14 STREAM_WAKE             push-sum wake-ups (per agent, iteration = round)
    15 STREAM_DELAY            push-sum message delays (key: global edge id, iteration = send
                               round)
    16 STREAM_LOSS             push-sum message losses (key: global edge id, iteration = send
                               round)
    17 STREAM_L2C_VALIDATION   L2C's validation tasks of a node for its mixing-weight step
                               (per agent, iteration = round)
    18 STREAM_SPEED            a federated client's job duration, drawn once (per client,
                               iteration 0)
    19 STREAM_L2C_ENCODER      meta-L2C's initial encoder, shared by all nodes (agent 0,
                               iteration 0)
    20 STREAM_OWN_VALIDATION   an agent's own fixed validation tasks (validation.own_tasks;
                               per agent, iteration 0)
    21 STREAM_CLASS_SHARDS     non-IID data: the order of a class's examples, which cuts its
                               shards, and which group each shard joins (key: class id,
                               iteration 0)
    22 STREAM_GROUP_CLASSES    non-IID data: the order of the classes in a group of shards,
                               which deals them to nodes (key: group id, iteration 0)
    23 STREAM_NODE_SPLIT       non-IID data: the order of a node's examples, which cuts its
                               training and validation splits (per node, iteration 0)
    24 STREAM_CLIENT_BATCHES   federated data: the order of a FedAvg client's examples in a
                               local epoch, cut into mini-batches (per client, iteration =
                               the epoch's draw number: round and epoch)

A family of tasks (TASKS, VALIDATION, STATIONARITY, TEST, OWN_VALIDATION) that draws its tasks
in several parts draws part p from `substream(family, p)` = family + 256 p, so that no two
parts share numbers:

    1  PART_HEADS    heads w* of fresh linear-representation tasks
    2  PART_PICKS    which of an agent's fixed heads each task uses
    3  PART_SAMPLES  inputs x and noise z of linear-representation tasks

Sine tasks and few-shot episodes hold all their numbers in one draw per call (distinct element
indices), so they use the family stream itself.
"""

from __future__ import annotations

import math

import numpy as np
import torch

Word = int | torch.Tensor | np.ndarray

_MASK32 = 0xFFFFFFFF
# Philox4x32's multipliers and Weyl key increments (Random123, philox.h).
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_ROUNDS = 10

STREAM_INIT = 1
STREAM_TASKS = 2
STREAM_VALIDATION = 3
STREAM_STATIONARITY = 4
STREAM_TRUTH = 5
STREAM_HEADS = 6
STREAM_TEST = 7
STREAM_SPLIT = 8
STREAM_PARTITION = 9
STREAM_INIT_DIRECTIONS = 10
STREAM_CLIENTS = 11
STREAM_CLIENT_SPLIT = 12
STREAM_CLIENT_EXAMPLES = 13
STREAM_WAKE = 14
STREAM_DELAY = 15
STREAM_LOSS = 16
STREAM_L2C_VALIDATION = 17
STREAM_SPEED = 18
STREAM_L2C_ENCODER = 19
STREAM_OWN_VALIDATION = 20
STREAM_CLASS_SHARDS = 21
STREAM_GROUP_CLASSES = 22
STREAM_NODE_SPLIT = 23
STREAM_CLIENT_BATCHES = 24

PART_HEADS = 1
PART_PICKS = 2
PART_SAMPLES = 3


def substream(stream: int, part: int) -> int:
    """The stream of part `part` of the draws of family `stream` (module docstring)."""
    if not 0 <= stream < 256 or not 0 <= part < 256:
        raise ValueError(
            f"substream({stream}, {part}): a family stream and its part must each lie in [0, 256)"
        )
    return stream + 256 * part


# Elements whose Philox blocks are computed together on the CPU (2^17: about 1 MiB per int64
# word, so a round's temporaries stay in the caches).
_ELEMENTS_AT_ONCE = 2**17


def _mulhilo(value: Word, multiplier: int) -> tuple[Word, Word]:
    """High and low 32-bit words of multiplier * value for 0 <= value < 2^32.

    In an int64 tensor the product wraps modulo 2^64, which keeps its 64 bits; the mask removes
    the sign bits that the arithmetic shift brings in.
    """
    product = value * multiplier
    high = product >> 32
    # Both are new objects: masking them in place (for tensors) saves two temporaries.
    high &= _MASK32
    product &= _MASK32
    return high, product


def philox4x32_10(
    counter: tuple[Word, Word, Word, Word], key: tuple[int, int]
) -> tuple[Word, Word, Word, Word]:
    """The Philox4x32-10 block of `counter` (four 32-bit words) under `key` (two words).

    Words lie in [0, 2^32). Counter words are Python integers or int64 tensors that broadcast
    against each other: words that are constant over a draw stay Python integers and words that
    vary along one axis only stay small, so the first rounds cost little.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(_ROUNDS):
        if round_:
            k0 = (k0 + _KEY_STEPS[0]) & _MASK32
            k1 = (k1 + _KEY_STEPS[1]) & _MASK32
        high0, low0 = _mulhilo(c0, _MULTIPLIERS[0])
        high1, low1 = _mulhilo(c2, _MULTIPLIERS[1])
        # `high ^ c` is a new object, so ^= k works in place on tensors.
        c0, c2 = high1 ^ c1, high0 ^ c3
        c0 ^= k0
        c2 ^= k1
        c1, c3 = low1, low0
    return c0, c1, c2, c3


def _check_iteration(name: str, t: int) -> None:
    """ValueError unless t fits the counter's 48 bits of iteration (word 2 and the low half of
    word 3): [0, 2^48)."""
    if not 0 <= t < 2**48:
        raise ValueError(f"{name} must lie in [0, 2^48)")


def set_counter(counter: torch.Tensor, t: int) -> None:
    """Write round t into `counter`, the 0-d tensor that a replayed or compiled round reads as
    its iteration (`blocks`), once t is checked against the iteration's range."""
    _check_iteration(f"round {t}", t)
    counter.fill_(t)


def _check_ranges(
    seed: int, agents: torch.Tensor, stream: int, iteration: Word, count: int
) -> None:
    """ValueError unless every field fits its place in the counter or key.

    An iteration given as a tensor (a CUDA graph's counter, see `blocks`) is its caller's to
    check, and so are the agent ids while a CUDA graph is captured or torch.compile traces:
    reading either back would synchronise, which a capture cannot do, and a traced read would
    split the compiled program (the ids are the rank's own, checked by its eager draws).
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed = {seed} must lie in [0, 2^64)")
    if not 0 <= stream < 2**16:
        raise ValueError(f"stream = {stream} must lie in [0, 2^16)")
    if isinstance(iteration, int):
        _check_iteration(f"iteration = {iteration}", iteration)
    if count > 2**32:
        raise ValueError(f"one draw holds {count} numbers per agent; draw at most 2^32 at once")
    if agents.dtype.is_floating_point or agents.dtype.is_complex or agents.dtype == torch.bool:
        raise ValueError(f"agent ids must be an integer tensor, not {agents.dtype}")
    traced = torch.compiler.is_compiling() or (
        agents.is_cuda and torch.cuda.is_current_stream_capturing()
    )
    if agents.numel() and not traced:
        # On a GPU this reads two numbers back: one synchronisation per draw.
        low, high = torch.aminmax(agents)
        if int(low) < 0 or int(high) >= 2**32:
            raise ValueError(f"agent ids must lie in [0, 2^32); got [{int(low)}, {int(high)}]")


def blocks(
    seed: int, agents: torch.Tensor, stream: int, iteration: Word, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four 32-bit words (as int64) of every element's Philox block, each of shape
    [len(agents), *shape]: element [a, j...] is the block of (seed, agents[a], stream,
    iteration, flat index j). The draws below are built from these words.

    `iteration` may be a 0-d int64 tensor on the agents' device (the counter of a round
    replayed from a CUDA graph, `dmeta.cudagraph`, which must read a new value each replay
    where a Python integer would be frozen into the captured kernels); the caller checks that
    it lies in [0, 2^48).
    """
    count = math.prod(shape)
    _check_ranges(seed, agents, stream, iteration, count)
    # numpy's path on the CPU, torch's on a GPU and where torch.compile traces the draw (a
    # whole round compiled with its counter tensor, `engine.CompiledRounds`).
    cpu = agents.device.type == "cpu" and not torch.compiler.is_compiling()
    if isinstance(iteration, torch.Tensor) and cpu:
        iteration = int(iteration)  # numpy's path below takes integers
    if not len(agents):  # e.g. a rank none of whose agents is sampled
        empty = torch.zeros((0, *shape), dtype=torch.int64, device=agents.device)
        return empty, empty, empty, empty
    if cpu:
        # numpy's operators on the CPU: the same integers, at a fraction of torch's cost per
        # call on small draws (a draw is about 60 of them; the 40-agent task draw 3x faster).
        index, ids = np.arange(count, dtype=np.int64)[None, :], agents.numpy().astype(np.int64)
        # A slice of agents at a time keeps the rounds' int64 temporaries in the CPU's caches
        # (10,000 sine agents' task draw: 2x faster); every element is its own block either way.
        rows = max(1, _ELEMENTS_AT_ONCE // max(count, 1))
    else:
        index, ids = torch.arange(count, device=agents.device)[None, :], agents.to(torch.int64)
        rows = len(agents)
    parts = []
    for first in range(0, len(agents), rows):
        counter = (
            index,
            ids[first : first + rows, None],
            iteration & _MASK32,
            (iteration >> 32) | (stream << 16),
        )
        words = philox4x32_10(counter, (seed & _MASK32, seed >> 32))
        if cpu:
            words = tuple(torch.from_numpy(word) for word in words)
        size = (min(rows, len(agents) - first), count)
        parts.append([torch.broadcast_to(word, size) for word in words])
    if len(parts) == 1:
        return tuple(word.reshape(len(agents), *shape) for word in parts[0])
    stacked = zip(*parts, strict=True)
    return tuple(torch.cat(words).reshape(len(agents), *shape) for words in stacked)


def _unit53(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """k 2^-53 in float64 for the 53-bit integer k made of `high` and the top 21 bits of `low`:
    exact, in [0, 1 - 2^-53]."""
    return ((high << 21) | (low >> 11)).to(torch.float64) * 2.0**-53


def random_bits(
    seed: int, agents: torch.Tensor, stream: int, iteration: Word, shape: tuple[int, ...]
) -> torch.Tensor:
    """Uniform 32-bit integers (as int64) of shape [len(agents), *shape], one family per agent.

    Element [a, j...] is the first word of the Philox block of (seed, agents[a], stream,
    iteration, flat index j).
    """
    return blocks(seed, agents, stream, iteration, shape)[0]


def uniform(
    seed: int,
    agents: torch.Tensor,
    stream: int,
    iteration: Word,
    shape: tuple[int, ...],
    low: torch.Tensor | float = 0.0,
    high: torch.Tensor | float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform samples in [low, high) of shape [len(agents), *shape], keyed per agent.

    The unit sample carries as many random bits as `dtype` has significand bits (53 for
    float64 from two words of the block, 24 for float32), so it is exact and below 1.
    `low` and `high` broadcast against the result (e.g. per-agent bounds of shape [A, 1, ...]).
    """
    words = blocks(seed, agents, stream, iteration, shape)
    if dtype == torch.float64:
        unit = _unit53(words[0], words[1])
    else:
        # Significand bits: eps = 2^(1 - digits).
        digits = 1 - round(math.log2(torch.finfo(dtype).eps))
        unit = (words[0] >> (32 - digits)).to(dtype) * 2.0**-digits
    return low + (high - low) * unit


def normal(
    seed: int,
    agents: torch.Tensor,
    stream: int,
    iteration: Word,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal samples of shape [len(agents), *shape], keyed per agent: Box-Muller from
    the two 53-bit uniforms of each element's block, computed in float64."""
    words = blocks(seed, agents, stream, iteration, shape)
    # 1 - u lies in [2^-53, 1]: the logarithm stays finite.
    radius = torch.sqrt(-2.0 * torch.log(1.0 - _unit53(words[0], words[1])))
    angle = (2.0 * math.pi) * _unit53(words[2], words[3])
    return (radius * torch.cos(angle)).to(dtype)
