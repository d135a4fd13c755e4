"""Tests of dmeta.topology: graphs, combination rules, validation and reports."""

from __future__ import annotations

import math
import typing
import warnings

import networkx as nx
import numpy as np
import pytest

from dmeta.config import GraphConfig, Topology
from dmeta.errors import DmetaError
from dmeta.topology import (
    build_graph,
    combination_matrix,
    describe,
    draw_graph,
    mixing_rate,
    validate_combination_matrix,
)

TOPOLOGIES = typing.get_args(Topology)
RULES = ("averaging", "metropolis", "max_degree")
K = 12


def make_graph(topology: str, tmp_path, k: int = K, **fields) -> nx.Graph:
    if topology == "edge_list":
        edges = tmp_path / "edges.txt"
        lines = ["# a ring with a chord", ""]
        lines += [f"{i} {(i + 1) % k}  # ring" for i in range(k)]
        lines.append(f"0 {k // 2}")
        edges.write_text("\n".join(lines) + "\n")
        fields["edge_list_path"] = str(edges)
    defaults = {"edge_probability": 0.3, "radius": 0.5}
    return build_graph(GraphConfig(topology=topology, **(defaults | fields)), k)


def combine(graph: nx.Graph, rule: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return combination_matrix(graph, rule)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_rules_on_every_topology(topology, rule, tmp_path):
    graph = make_graph(topology, tmp_path)
    assert sorted(graph.nodes) == list(range(K))
    a = combine(graph, rule)
    assert a.dtype == np.float64
    assert a.shape == (K, K)
    assert (a >= 0).all()
    np.testing.assert_allclose(a.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    pattern = nx.to_numpy_array(graph, nodelist=range(K)) + np.eye(K) > 0
    np.testing.assert_array_equal(a > 0, pattern)
    assert nx.is_connected(graph)
    assert mixing_rate(a) < 1.0
    validate_combination_matrix(a)
    if rule != "averaging":
        np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=0, atol=1e-12)
        np.testing.assert_allclose(a, a.T, rtol=0, atol=1e-15)
        assert describe(a).doubly_stochastic
        assert describe(a).symmetric


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("topology", sorted(set(TOPOLOGIES) - {"edge_list"}))
def test_small_graphs(topology, k, tmp_path):
    graph = make_graph(topology, tmp_path, k)
    assert sorted(graph.nodes) == list(range(k))
    assert nx.number_of_selfloops(graph) == 0
    for rule in RULES:
        a = combine(graph, rule)
        validate_combination_matrix(a)
        assert mixing_rate(a) < 1.0
    if k == 1:
        assert mixing_rate(combine(graph, "metropolis")) == 0.0


def test_grid_and_exponential_shapes(tmp_path):
    assert nx.is_isomorphic(make_graph("grid", tmp_path), nx.grid_2d_graph(3, 4))
    assert nx.is_isomorphic(make_graph("grid", tmp_path, grid_rows=2), nx.grid_2d_graph(2, 6))
    with pytest.raises(DmetaError, match="grid_rows"):
        make_graph("grid", tmp_path, grid_rows=5)
    # K = 12: hops 1, 2, 4, 8 (8 = -4 mod 12), so every node has degree 6.
    assert {d for _, d in make_graph("exponential", tmp_path).degree} == {6}


def test_averaging_warns_on_star_not_on_ring(tmp_path):
    with pytest.warns(UserWarning, match="metropolis"):
        a = combination_matrix(make_graph("star", tmp_path), "averaging")
    assert not describe(a).doubly_stochastic
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = combination_matrix(make_graph("ring", tmp_path), "averaging")
    assert describe(a).doubly_stochastic


def test_complete_averaging_is_uniform(tmp_path):
    a = combination_matrix(make_graph("complete", tmp_path), "averaging")
    assert np.array_equal(a, np.full((K, K), 1.0 / K))
    assert mixing_rate(a) == pytest.approx(0.0, abs=1e-12)


def test_erdos_renyi_resamples_until_connected():
    first = nx.gnp_random_graph(20, 0.1, seed=np.random.default_rng(0))
    assert not nx.is_connected(first)  # so seed 0 resamples
    cfg = GraphConfig(topology="erdos_renyi", edge_probability=0.1, seed=0)
    graph = build_graph(cfg, 20)
    assert nx.is_connected(graph)
    assert sorted(graph.edges) == sorted(build_graph(cfg, 20).edges)
    other = build_graph(GraphConfig(topology="erdos_renyi", edge_probability=0.1, seed=1), 20)
    assert sorted(graph.edges) != sorted(other.edges)


def test_impossible_random_graphs_raise():
    with pytest.raises(DmetaError, match=r"raise graph\.edge_probability"):
        build_graph(GraphConfig(topology="erdos_renyi", edge_probability=0.0), 5)
    with pytest.raises(DmetaError, match=r"raise graph\.radius"):
        build_graph(GraphConfig(topology="geometric", radius=0.0), 5)
    with pytest.raises(DmetaError, match="graph.seed"):
        build_graph(GraphConfig(topology="geometric", seed=-1), 5)


def test_validate_rejects_bad_matrices():
    with pytest.raises(DmetaError, match=r"a\[0, 1\] = -0\.5 is negative"):
        validate_combination_matrix(np.array([[1.0, -0.5], [0.0, 1.5]]))
    with pytest.raises(DmetaError, match=r"column 1 .* sums to 0\.9,"):
        validate_combination_matrix(np.array([[0.5, 0.4], [0.5, 0.5]]))
    with pytest.raises(DmetaError, match="square"):
        validate_combination_matrix(np.ones((2, 3)) / 2)
    with pytest.raises(DmetaError, match="NaN"):
        validate_combination_matrix(np.array([[np.nan]]))


def test_validate_connectivity():
    block = np.kron(np.eye(2), np.full((2, 2), 0.5))
    with pytest.raises(DmetaError, match=r'2 strongly connected components.*"noncooperative"'):
        validate_combination_matrix(block)
    validate_combination_matrix(block, require_connected=False)


def test_matrix_rule_loads_text_and_npy(tmp_path):
    graph = nx.cycle_graph(4)
    expected = combination_matrix(graph, "metropolis")
    np.savetxt(tmp_path / "a.txt", expected)
    np.save(tmp_path / "a.npy", expected)
    for name in ("a.txt", "a.npy"):
        a = combination_matrix(graph, "matrix", str(tmp_path / name))
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, expected, rtol=0, atol=1e-15)
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(DmetaError, match=r"missing\.txt"):
        combination_matrix(graph, "matrix", missing)
    with pytest.raises(DmetaError, match=r"shape \(4, 4\), expected \(5, 5\)"):
        combination_matrix(nx.cycle_graph(5), "matrix", str(tmp_path / "a.npy"))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("0 1\n1 2 3\n", r"edges.txt, line 2: expected two agent ids"),
        ("0 1\n\n# x\n1 a\n", r"edges.txt, line 4: expected two agent ids"),
        ("0 1\n1 4\n", r"edges.txt, line 2: agent id out of range \[0, 4\)"),
        ("-1 0\n", r"edges.txt, line 1: agent id out of range"),
    ],
)
def test_bad_edge_lists(content, match, tmp_path):
    path = tmp_path / "edges.txt"
    path.write_text(content)
    with pytest.raises(DmetaError, match=match):
        build_graph(GraphConfig(topology="edge_list", edge_list_path=str(path)), 4)


def test_missing_edge_list(tmp_path):
    path = str(tmp_path / "nowhere.txt")
    with pytest.raises(DmetaError, match=r"nowhere\.txt"):
        build_graph(GraphConfig(topology="edge_list", edge_list_path=path), 4)


def test_mixing_rate_of_ring_of_four():
    a = combination_matrix(nx.cycle_graph(4), "metropolis")
    np.testing.assert_allclose(a, np.where(a > 0, 1 / 3, 0.0))
    # Circulant eigenvalues 1/3 + 2/3 cos(2 pi j / 4); j = 0 (the eigenvalue 1) is removed.
    expected = max(abs(1 / 3 + 2 / 3 * math.cos(2 * math.pi * j / 4)) for j in (1, 2, 3))
    assert mixing_rate(a) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(1 / 3)


def test_describe():
    report = describe(combination_matrix(nx.star_graph(4), "metropolis"))
    assert report.primitive
    assert report.doubly_stochastic
    assert report.symmetric
    assert (report.num_agents, report.num_edges) == (5, 4)
    assert (report.min_degree, report.max_degree) == (1, 4)
    assert len(report.lines()) == 7
    flip = describe(np.array([[0.0, 1.0], [1.0, 0.0]]))
    assert not flip.primitive
    assert flip.doubly_stochastic
    assert flip.lambda2 == pytest.approx(1.0)


def test_draw_graph(tmp_path):
    graph = nx.cycle_graph(6)
    path = tmp_path / "graph.png"
    draw_graph(graph, combination_matrix(graph, "metropolis"), str(path))
    assert path.read_bytes().startswith(b"\x89PNG")


def test_directed_graphs_take_averaging_only():
    graph = nx.DiGraph([(0, 1), (1, 2), (2, 0)])  # edge l -> k: k listens to l
    a = combination_matrix(graph, "averaging")
    np.testing.assert_array_equal(a > 0, np.eye(3) + nx.to_numpy_array(graph) > 0)
    validate_combination_matrix(a)
    with pytest.raises(DmetaError, match="undirected"):
        combination_matrix(graph, "metropolis")


def test_matrix_file_rounded_to_six_digits_is_rescaled(tmp_path):
    path = tmp_path / "rounded.txt"
    path.write_text("0.333333 0.5 0.333333\n0.333333 0.5 0.333333\n0.333333 0 0.333333\n")
    a = combination_matrix(nx.empty_graph(3), "matrix", str(path))
    np.testing.assert_allclose(a.sum(axis=0), 1.0, rtol=0, atol=1e-15)
    validate_combination_matrix(a)
    path.write_text("0.3 0.5 0.3\n0.3 0.5 0.3\n0.3 0 0.3\n")
    with pytest.raises(DmetaError, match="column 0"):
        validate_combination_matrix(combination_matrix(nx.empty_graph(3), "matrix", str(path)))
