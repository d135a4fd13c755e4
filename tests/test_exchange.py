"""The exchange layer in one process: routes, the segment-sum mix (eq. 6b), its gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmeta import exchange as exchange_module
from dmeta.exchange import AgentLayout, LocalExchange, _build_route, indexed_mix, segment_mix

F64 = torch.float64


def _random_edges(num_agents: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random column-stochastic support with self-loops, as edges l -> k with a[l, k]."""
    state = np.random.default_rng(seed)
    support = (state.random((num_agents, num_agents)) < 0.3) | np.eye(num_agents, dtype=bool)
    matrix = state.random((num_agents, num_agents)) * support
    matrix /= matrix.sum(axis=0)
    sources, destinations = np.nonzero(matrix)
    order = state.permutation(len(sources))  # edge order must not matter
    sources, destinations = sources[order], destinations[order]
    return sources, destinations, matrix[sources, destinations]


def _by_hand(rows: torch.Tensor, sources, destinations, weights) -> torch.Tensor:
    out = torch.zeros_like(rows)
    for source, destination, weight in zip(sources, destinations, weights, strict=True):
        out[destination] += float(weight) * rows[source]
    return out


def test_local_mix_is_eq_6b(monkeypatch) -> None:
    sources, destinations, weights = _random_edges(9, seed=1)
    rows = torch.randn(9, 5, dtype=F64)
    exchange = LocalExchange(9)
    route = exchange.route(sources, destinations)
    mixed = exchange.mix(rows, route, route.weights(weights, rows))
    torch.testing.assert_close(
        mixed, _by_hand(rows, sources, destinations, weights), rtol=1e-14, atol=1e-14
    )
    assert not route.sends_per_agent.any()  # one process: nothing leaves
    monkeypatch.setattr(exchange_module, "MIX_COLUMNS", 2)  # the columns 2 at a time
    monkeypatch.setattr(exchange_module, "MIX_TILE_BYTES", 0)
    monkeypatch.setattr(exchange_module, "MIX_TILE_DEGREE", 1)
    sliced = exchange.mix(rows, route, route.weights(weights, rows))
    torch.testing.assert_close(sliced, mixed, rtol=0, atol=0)


def _simulated_ranks(rows: torch.Tensor, size: int, sources, destinations, weights):
    """Every rank's mix with the rows its route says it receives, delivered by hand."""
    layout = AgentLayout(rows.shape[0], size)
    routes = [_build_route(layout, r, sources, destinations, "cpu") for r in range(size)]
    blocks = [rows[layout.agents(r)] for r in range(size)]
    results = []
    for r, route in enumerate(routes):
        received = []
        for source in route.sources:
            sender = routes[source]
            rows_sent = torch.split(sender.send_index, sender.send_counts)
            received.append(blocks[source][rows_sent[sender.destinations.index(r)]])
        table = torch.cat([blocks[r], *received])
        local = route.weights(weights, rows)
        results.append(
            segment_mix(table, route.slots, route.targets, local, len(blocks[r]), route.crow)
        )
    return torch.cat(results), routes, layout


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("columns", [256, 3])  # all 7 columns at once, or 3 at a time
def test_every_layout_gives_the_same_bits(size, dtype, columns, monkeypatch) -> None:
    monkeypatch.setattr(exchange_module, "MIX_COLUMNS", columns)
    monkeypatch.setattr(exchange_module, "MIX_TILE_BYTES", 0)
    monkeypatch.setattr(exchange_module, "MIX_TILE_DEGREE", 1)
    sources, destinations, weights = _random_edges(11, seed=size)
    rows = torch.randn(11, 7, dtype=dtype)
    exchange = LocalExchange(11)
    route = exchange.route(sources, destinations)
    local = exchange.mix(rows, route, route.weights(weights, rows))
    spread, _, _ = _simulated_ranks(rows, size, sources, destinations, weights)
    # Incoming edges are summed in (destination, source) order on every layout.
    torch.testing.assert_close(spread, local, rtol=0, atol=0)


def test_rows_are_sent_once_per_receiving_rank_and_only_when_needed() -> None:
    # A ring of 8 on 4 ranks: agent 1 (rank 0) is heard by agent 2 (rank 1) only.
    ring = np.arange(8)
    sources = np.concatenate([ring, ring, ring])
    destinations = np.concatenate([ring, (ring + 1) % 8, (ring - 1) % 8])
    layout = AgentLayout(8, 4)
    route = _build_route(layout, 0, sources, destinations, "cpu")
    assert route.destinations == [1, 3] and route.sources == [1, 3]
    assert route.send_index.tolist() == [1, 0] and route.send_counts == [1, 1]
    np.testing.assert_array_equal(route.sends_per_agent, [1, 1])
    assert route.receive_counts == [1, 1]


def test_mix_is_differentiable_in_the_weights() -> None:
    sources, destinations, weights = _random_edges(6, seed=3)
    rows = torch.randn(6, 4, dtype=F64)
    exchange = LocalExchange(6)
    route = exchange.route(sources, destinations)
    local = route.weights(weights, rows).requires_grad_(True)
    target = torch.randn(6, 4, dtype=F64)
    loss = (exchange.mix(rows, route, local) * target).sum()
    (gradient,) = torch.autograd.grad(loss, local)
    # d loss / d w_e = <rows[l_e], target[k_e]> for edge e = (l_e -> k_e).
    edges = route.edges
    expected = (rows[sources[edges]] * target[destinations[edges]]).sum(dim=1)
    torch.testing.assert_close(gradient, expected, rtol=1e-14, atol=1e-14)


def test_deliver_gives_each_incoming_edge_its_source_row() -> None:
    sources, destinations, _ = _random_edges(8, seed=4)
    rows = torch.randn(8, 3, dtype=F64)
    exchange = LocalExchange(8)
    route = exchange.route(sources, destinations)
    delivered = exchange.deliver(rows, route)
    torch.testing.assert_close(delivered, rows[sources[route.edges]], rtol=0, atol=0)
    # Incoming edges are ordered by destination, then source.
    order = np.lexsort((sources[route.edges], destinations[route.edges]))
    np.testing.assert_array_equal(order, np.arange(len(order)))


def test_the_indexed_mix_in_slices_gives_the_same_bits(monkeypatch) -> None:
    sources, destinations, weights = _random_edges(9, seed=5)
    rows = torch.randn(9, 5, dtype=F64)
    route = LocalExchange(9).route(sources, destinations)
    local = route.weights(weights, rows)
    whole = indexed_mix(rows, route.slots, route.targets, local, 9)
    monkeypatch.setattr(exchange_module, "MIX_SLICE_ELEMENTS", 7)  # one edge (5 elements) a slice
    sliced = indexed_mix(rows, route.slots, route.targets, local, 9)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=0)
    expected = _by_hand(rows, sources, destinations, weights)
    torch.testing.assert_close(whole, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_the_mix_in_column_slices_gives_the_bits_of_the_whole_product(dtype, monkeypatch) -> None:
    # A rank slices the columns or not by its own table's size and edges, so layouts agree to
    # the bit only if both give the same bits: at a run's size (640 agents with about 64
    # in-neighbours each, the sine network's 1761 parameters), not just a toy's.
    generator = np.random.default_rng(6)
    agents = 640
    adjacency = generator.random((agents, agents)) < 0.1
    np.fill_diagonal(adjacency, True)
    sources, destinations = np.nonzero(adjacency)
    weights = generator.random(len(sources))
    rows = torch.randn(agents, 1761, dtype=dtype, generator=torch.Generator().manual_seed(6))
    exchange = LocalExchange(agents)
    route = exchange.route(sources, destinations)
    local = route.weights(weights, rows)
    sliced = exchange.mix(rows, route, local)
    monkeypatch.setattr(exchange_module, "MIX_TILE_BYTES", 1 << 40)  # the whole product
    whole = exchange.mix(rows, route, local)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=0)
