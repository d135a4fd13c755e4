"""The counter-based generator of dmeta/rng.py: Philox4x32-10 and the draws built on it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmeta import rng

F64 = torch.float64
MAX = 0xFFFFFFFF

# Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter, key, block.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MAX, MAX, MAX, MAX), (MAX, MAX), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize(("counter", "key", "block"), KNOWN_ANSWERS)
def test_philox_gives_random123_known_answers_in_python_integers(counter, key, block) -> None:
    assert rng.philox4x32_10(counter, key) == block


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(("counter", "key", "block"), KNOWN_ANSWERS)
def test_philox_gives_random123_known_answers_in_int64_tensors(
    device: str, counter, key, block
) -> None:
    # The counter twice, in a row and in a column, so that the words broadcast to [2, 2].
    row = tuple(torch.tensor([[word, word]], device=device) for word in counter)
    words = rng.philox4x32_10((row[0], row[1].T, row[2], row[3].T), key)
    for word, expected in zip(words, block, strict=True):
        assert word.shape == (2, 2) and word.device.type == device
        assert torch.all(word == expected)


@pytest.mark.parametrize(("counter", "key", "block"), KNOWN_ANSWERS)
def test_philox_gives_random123_known_answers_in_int64_arrays(counter, key, block) -> None:
    """numpy's int64 arrays, the CPU's path (`rng.blocks`)."""
    row = tuple(np.array([[word, word]], dtype=np.int64) for word in counter)
    words = rng.philox4x32_10((row[0], row[1].T, row[2], row[3].T), key)
    for word, expected in zip(words, block, strict=True):
        assert word.shape == (2, 2) and np.all(word == expected)


def test_cpu_blocks_equal_the_blocks_of_torch_tensors() -> None:
    """The CPU computes `blocks` with numpy; a GPU with torch: the same words."""
    agents = torch.arange(6) * 7919 + 2**31
    seed, stream, iteration = 2**63 + 11, rng.STREAM_TASKS, 2**40 + 3
    counter = (
        torch.arange(15)[None, :],
        agents[:, None],
        iteration & MAX,
        (iteration >> 32) | (stream << 16),
    )
    expected = rng.philox4x32_10(counter, (seed & MAX, seed >> 32))
    words = rng.blocks(seed, agents, stream, iteration, (3, 5))
    for word, theirs in zip(words, expected, strict=True):
        assert word.dtype == torch.int64 and torch.equal(word.reshape(6, 15), theirs)


def first_two_words(seed: int, agents: torch.Tensor, stream: int, iteration: int) -> np.ndarray:
    """Words 0 and 1 of each agent's first block as one 64-bit integer per agent."""
    words = rng.blocks(seed, agents, stream, iteration, (1,))
    return ((words[0][:, 0] << 32) | words[1][:, 0]).numpy()


def test_ten_million_agent_iteration_keys_give_distinct_64_bit_numbers() -> None:
    agents = torch.arange(10_000)
    outputs = np.concatenate(
        [first_two_words(0, agents, rng.STREAM_TASKS, iteration) for iteration in range(1000)]
    )
    assert len(outputs) == 10**7
    # Sorted, equal numbers would be neighbours (np.unique would hash them, ten times slower).
    outputs.sort()
    assert np.all(outputs[1:] != outputs[:-1])


def test_draws_that_the_32_bit_hash_made_identical_differ() -> None:
    # With seed 0 the old hash gave agent 9 at iteration 1418 and agent 13 at iteration 9681 the
    # same tasks in the Fig. 1b setting (40 agents, 5 tasks of 22 numbers).
    first = rng.uniform(0, torch.tensor([9]), rng.STREAM_TASKS, 1418, (5, 22))
    second = rng.uniform(0, torch.tensor([13]), rng.STREAM_TASKS, 9681, (5, 22))
    assert not torch.any(first == second)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@pytest.mark.parametrize(
    ("other_agent", "other_stream", "other_iteration"),
    [(4, rng.STREAM_VALIDATION, 7), (4, rng.STREAM_TASKS, 8), (5, rng.STREAM_TASKS, 7)],
    ids=["streams", "adjacent iterations", "adjacent agents"],
)
def test_neighbouring_keys_give_uncorrelated_numbers(
    other_agent: int, other_stream: int, other_iteration: int
) -> None:
    n = 100_000
    one = rng.uniform(3, torch.tensor([4]), rng.STREAM_TASKS, 7, (n,), dtype=F64)
    other = rng.uniform(
        3, torch.tensor([other_agent]), other_stream, other_iteration, (n,), dtype=F64
    )
    assert abs(correlation(one, other)) < 5 / math.sqrt(n)
    # Nor do neighbouring elements of one draw.
    assert abs(correlation(one[0, 1:], one[0, :-1])) < 5 / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_uniforms_lie_in_the_unit_interval_with_its_moments(dtype: torch.dtype) -> None:
    sample = rng.uniform(1, torch.arange(100), rng.STREAM_TASKS, 0, (10_000,), dtype=dtype)
    assert sample.dtype == dtype
    assert sample.min() >= 0 and sample.max() < 1
    values = sample.to(F64)
    n = values.numel()
    # Standard errors of the mean and variance of U(0, 1): sqrt(1/12 / n) and sqrt(1/180 / n).
    assert abs(values.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(values.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)


def test_uniforms_scale_to_their_bounds() -> None:
    low = torch.tensor([[1.0], [-3.0]], dtype=F64)
    sample = rng.uniform(2, torch.arange(2), rng.STREAM_TASKS, 5, (1000,), low, low + 2, F64)
    assert torch.all((sample >= low) & (sample < low + 2))


def test_normals_are_standard() -> None:
    sample = rng.normal(1, torch.arange(100), rng.STREAM_TASKS, 0, (10_000,), F64)
    n = sample.numel()
    assert torch.isfinite(sample).all()
    # Standard errors of the mean, variance and fourth moment of N(0, 1): 1, sqrt(2), sqrt(96).
    assert abs(sample.mean().item()) < 5 / math.sqrt(n)
    assert abs(sample.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((sample**4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    assert rng.normal(1, torch.arange(2), rng.STREAM_TASKS, 0, (3,)).dtype == torch.float32


@pytest.mark.parametrize("draw", [rng.random_bits, rng.uniform, rng.normal])
def test_draws_do_not_depend_on_the_other_agents_or_on_repetition(draw) -> None:
    everyone = draw(11, torch.arange(12), rng.STREAM_TASKS, 9, (3, 5))
    assert everyone.shape == (12, 3, 5)
    subset = torch.tensor([7, 2, 10])
    torch.testing.assert_close(draw(11, subset, rng.STREAM_TASKS, 9, (3, 5)), everyone[subset])
    torch.testing.assert_close(draw(11, torch.arange(12), rng.STREAM_TASKS, 9, (3, 5)), everyone)


def test_draws_in_slices_of_agents_are_the_draws_at_once(monkeypatch) -> None:
    """The CPU computes the blocks a slice of agents at a time (cache-sized): same numbers."""
    whole = rng.blocks(5, torch.arange(9), rng.STREAM_TASKS, 3, (2, 7))
    monkeypatch.setattr(rng, "_ELEMENTS_AT_ONCE", 30)  # 2 agents (28 elements) a slice
    sliced = rng.blocks(5, torch.arange(9), rng.STREAM_TASKS, 3, (2, 7))
    for ours, theirs in zip(sliced, whole, strict=True):
        assert ours.shape == (9, 2, 7) and torch.equal(ours, theirs)


def test_draws_for_no_agents_are_empty() -> None:
    none = torch.arange(0)
    assert rng.uniform(0, none, rng.STREAM_TASKS, 1, (2, 3)).shape == (0, 2, 3)
    assert rng.normal(0, none, rng.STREAM_TASKS, 1, (4,), F64).shape == (0, 4)


def test_random_bits_are_32_bit_words() -> None:
    bits = rng.random_bits(0, torch.arange(50), rng.STREAM_TASKS, 0, (2000,))
    assert bits.dtype == torch.int64
    assert bits.min() >= 0 and bits.max() <= MAX
    assert abs(bits.to(F64).mean().item() / 2**32 - 0.5) < 0.005


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_equal_cpu_draws() -> None:
    for device in ("cpu", "cuda"):
        agents = torch.arange(40, device=device)
        bits = rng.random_bits(5, agents, rng.STREAM_TASKS, 2**40 + 3, (5, 22))
        normals = rng.normal(5, agents, rng.STREAM_TASKS, 2**40 + 3, (5, 22), F64)
        if device == "cpu":
            expected_bits, expected_normals = bits, normals
    torch.testing.assert_close(bits.cpu(), expected_bits, rtol=0, atol=0)
    torch.testing.assert_close(normals.cpu(), expected_normals)


def test_fields_use_their_whole_range() -> None:
    top = torch.tensor([2**32 - 1])
    seed, stream, iteration = 2**64 - 1, 2**16 - 1, 2**48 - 1
    draws = {
        "top": rng.random_bits(seed, top, stream, iteration, (4,)),
        "stream": rng.random_bits(seed, top, stream - 1, iteration, (4,)),
        "iteration": rng.random_bits(seed, top, stream, iteration - 1, (4,)),
        "agent": rng.random_bits(seed, top - 1, stream, iteration, (4,)),
        "seed": rng.random_bits(seed - 1, top, stream, iteration, (4,)),
    }
    rows = {tuple(row.flatten().tolist()) for row in draws.values()}
    assert len(rows) == len(draws)


@pytest.mark.parametrize(
    ("seed", "agents", "stream", "iteration", "shape", "message"),
    [
        (2**64, [0], 1, 0, (1,), "seed"),
        (-1, [0], 1, 0, (1,), "seed"),
        (0, [2**32], 1, 0, (1,), "agent ids"),
        (0, [-1], 1, 0, (1,), "agent ids"),
        (0, [0], 2**16, 0, (1,), "stream"),
        (0, [0], 1, 2**48, (1,), "iteration"),
        (0, [0], 1, -1, (1,), "iteration"),
        (0, [], 1, 0, (2**16, 2**16 + 1), "at most 2\\^32"),
    ],
)
def test_out_of_range_fields_are_refused(seed, agents, stream, iteration, shape, message) -> None:
    with pytest.raises(ValueError, match=message):
        rng.uniform(seed, torch.tensor(agents, dtype=torch.int64), stream, iteration, shape)


def test_substreams_are_distinct_from_every_stream() -> None:
    families = [rng.STREAM_TASKS, rng.STREAM_VALIDATION, rng.STREAM_STATIONARITY, rng.STREAM_TEST]
    parts = [rng.PART_HEADS, rng.PART_PICKS, rng.PART_SAMPLES]
    streams = [value for name, value in vars(rng).items() if name.startswith("STREAM_")]
    assert len(set(streams)) == len(streams)
    derived = [rng.substream(family, part) for family in families for part in parts]
    assert len(set(derived) | set(streams)) == len(derived) + len(streams)
    with pytest.raises(ValueError, match="substream"):
        rng.substream(256, 1)


def test_a_round_counter_holds_only_rounds_of_the_iteration_range() -> None:
    """Replayed and compiled rounds read t from a counter tensor: it takes [0, 2^48) only."""
    counter = torch.zeros((), dtype=torch.int64)
    rng.set_counter(counter, 2**48 - 1)
    assert int(counter) == 2**48 - 1
    for t in (-1, 2**48):
        with pytest.raises(ValueError, match=rf"round {t} must lie in \[0, 2\^48\)"):
            rng.set_counter(counter, t)
    assert int(counter) == 2**48 - 1
