"""Tests of dmeta.topology: graphs, combination rules, validation and reports."""

from __future__ import annotations

import math
import typing
import warnings

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp

from dmeta.config import GraphConfig, Topology
from dmeta.errors import DmetaError
from dmeta.topology import (
    DRAW_LIMIT,
    PushWeights,
    build_graph,
    build_schedule,
    combination_matrix,
    describe,
    draw_graph,
    estimate_mixing_rate,
    mixing_rate,
    perron_vector,
    push_weights,
    validate_combination_matrix,
    validate_push_weights,
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


def combine(graph: nx.Graph, rule: str) -> sp.csc_array:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return combination_matrix(graph, rule)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_rules_on_every_topology(topology, rule, tmp_path):
    graph = make_graph(topology, tmp_path)
    assert sorted(graph.nodes) == list(range(K))
    sparse = combine(graph, rule)
    assert isinstance(sparse, sp.csc_array)
    validate_combination_matrix(sparse)
    assert mixing_rate(sparse) < 1.0
    a = sparse.toarray()
    assert a.dtype == np.float64
    assert a.shape == (K, K)
    assert (a >= 0).all()
    np.testing.assert_allclose(a.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    pattern = nx.to_numpy_array(graph, nodelist=range(K)) + np.eye(K) > 0
    np.testing.assert_array_equal(a > 0, pattern)
    assert nx.is_connected(graph)
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
    assert np.array_equal(a.toarray(), np.full((K, K), 1.0 / K))
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
    expected = combination_matrix(graph, "metropolis").toarray()
    np.savetxt(tmp_path / "a.txt", expected)
    np.save(tmp_path / "a.npy", expected)
    for name in ("a.txt", "a.npy"):
        a = combination_matrix(graph, "matrix", str(tmp_path / name))
        assert isinstance(a, sp.csc_array)
        assert a.dtype == np.float64
        np.testing.assert_allclose(a.toarray(), expected, rtol=0, atol=1e-15)
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
    a = combination_matrix(nx.cycle_graph(4), "metropolis").toarray()
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
    np.testing.assert_array_equal(a.toarray() > 0, np.eye(3) + nx.to_numpy_array(graph) > 0)
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


def old_dense_rule(graph: nx.Graph, rule: str) -> np.ndarray:
    """The dense formulas dmeta used before the sparse rewrite."""
    k = graph.number_of_nodes()
    adjacency = nx.to_numpy_array(graph, nodelist=range(k), weight=None)
    if rule == "averaging":
        support = adjacency + np.eye(k)
        return support / support.sum(axis=0)
    if rule == "metropolis":
        size = adjacency.sum(axis=0) + 1.0
        a = adjacency / np.maximum.outer(size, size)
    else:
        a = adjacency / (adjacency.sum(axis=0).max() + 1.0)
    np.fill_diagonal(a, 1.0 - a.sum(axis=0))
    return a


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("topology", ["ring", "grid", "erdos_renyi", "star", "exponential"])
def test_sparse_rules_equal_dense_formulas(topology, rule, tmp_path):
    graph = make_graph(topology, tmp_path, 20)
    a = combine(graph, rule)
    assert isinstance(a, sp.csc_array) and a.has_canonical_format
    np.testing.assert_allclose(a.toarray(), old_dense_rule(graph, rule), rtol=0, atol=1e-15)
    directed = nx.DiGraph([(0, 1), (1, 2), (2, 0), (0, 2), (3, 0), (2, 3)])
    np.testing.assert_array_equal(
        combine(directed, "averaging").toarray(), old_dense_rule(directed, "averaging")
    )


SPECTRAL_GRAPHS = [("ring", 30), ("grid", 36), ("erdos_renyi", 40), ("star", 25)]


@pytest.mark.parametrize("rule", ["averaging", "metropolis"])
@pytest.mark.parametrize(("topology", "k"), SPECTRAL_GRAPHS)
def test_sparse_lambda2_matches_dense(topology, k, rule, tmp_path):
    a = combine(make_graph(topology, tmp_path, k), rule)
    dense, how = estimate_mixing_rate(a)
    assert how.startswith("dense eigenvalues")
    sparse, how = estimate_mixing_rate(a, dense_limit=0)
    assert how.startswith("ARPACK") and how.endswith("converged")
    assert sparse == pytest.approx(dense, abs=1e-7)
    assert describe(a).lambda2_method in describe(a).lines()[-1]


def test_lambda2_estimate_when_arpack_gives_up(monkeypatch):
    import dmeta.topology

    a = combination_matrix(nx.cycle_graph(200), "metropolis")
    monkeypatch.setattr(dmeta.topology, "_ARPACK_SECONDS", 0.0)
    estimate, how = estimate_mixing_rate(a, dense_limit=0)
    assert "did not converge" in how and "lower bound" in how
    exact = 1 / 3 + 2 / 3 * math.cos(2 * math.pi / 200)
    assert exact - 0.05 < estimate <= exact + 1e-12


@pytest.mark.parametrize("dense_limit", [1000, 0])
def test_perron_vector(dense_limit, tmp_path):
    assert np.array_equal(perron_vector(combine(nx.cycle_graph(7), "metropolis")), np.ones(7) / 7)
    star = nx.star_graph(9)
    degrees = np.array([d for _, d in sorted(star.degree)]) + 1.0
    p = perron_vector(combine(star, "averaging"), dense_limit=dense_limit)
    np.testing.assert_allclose(p, degrees / degrees.sum(), rtol=1e-12)
    directed = nx.cycle_graph(6, create_using=nx.DiGraph)
    directed.add_edge(0, 3)
    for graph in (make_graph("erdos_renyi", tmp_path, 30), directed):
        a = combine(graph, "averaging")
        values, vectors = np.linalg.eig(a.toarray())
        expected = vectors[:, np.argmax(values.real)].real
        p = perron_vector(a, dense_limit=dense_limit)
        np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-10)
        np.testing.assert_allclose(a @ p, p, rtol=1e-10)
        assert (p > 0).all() and p.sum() == pytest.approx(1.0)
    with pytest.raises(DmetaError, match="Perron"):
        perron_vector(np.array([[1.0, 0.5], [0.0, 0.5]]), dense_limit=dense_limit)


def test_ring_of_100000_agents_is_sparse():
    k = 100_000
    a = combination_matrix(build_graph(GraphConfig(topology="ring"), k), "metropolis")
    assert isinstance(a, sp.csc_array)
    assert a.shape == (k, k) and a.nnz == 3 * k
    validate_combination_matrix(a)
    report = describe(a)
    assert (report.num_edges, report.min_degree, report.max_degree) == (k, 2, 2)
    assert report.doubly_stochastic and report.symmetric and report.primitive
    assert 0.99 < report.lambda2 < 1.0
    assert "ARPACK" in report.lambda2_method


def test_directed_edge_list_and_circulants(tmp_path):
    path = tmp_path / "edges.txt"
    path.write_text("0 1\n1 2\n2 0\n0 3\n3 0  # l k: l's model reaches k\n")
    cfg = GraphConfig(topology="edge_list", edge_list_path=str(path), directed=True)
    graph = build_graph(cfg, 4)
    assert graph.is_directed() and graph.has_edge(0, 1) and not graph.has_edge(1, 0)
    a = combine(graph, "averaging").toarray()
    assert a[0, 1] == 0.5 and a[1, 0] == 0.0  # agent 1 listens to agent 0, not back
    np.testing.assert_allclose(a[:, 0], [1 / 3, 0, 1 / 3, 1 / 3])
    validate_combination_matrix(a)
    with pytest.raises(DmetaError, match='use rule = "averaging"'):
        combination_matrix(graph, "max_degree")
    ring = build_graph(GraphConfig(topology="ring", directed=True), 5)
    assert sorted(ring.edges) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)]
    exponential = build_graph(GraphConfig(topology="exponential", directed=True), 8)
    assert sorted(exponential.successors(3)) == [4, 5, 7]
    with pytest.raises(DmetaError, match="graph.directed = false"):
        build_graph(GraphConfig(topology="grid", directed=True), 4)


def test_agent_without_edges_is_named(tmp_path):
    path = tmp_path / "edges.txt"
    path.write_text("0 1\n1 2\n2 3\n")
    graph = build_graph(GraphConfig(topology="edge_list", edge_list_path=str(path)), 5)
    with pytest.raises(DmetaError, match=r"no neighbour at all .*: 4 \(of 0\.\.4"):
        validate_combination_matrix(combine(graph, "metropolis"))


def test_push_weights():
    graph = nx.DiGraph([(0, 1), (1, 2), (2, 0), (0, 2)])
    push = push_weights(graph)
    expected = np.array([[1 / 3, 1 / 3, 1 / 3], [0, 0.5, 0.5], [0.5, 0, 0.5]])
    np.testing.assert_allclose(push.matrix.toarray(), expected, rtol=0, atol=1e-15)
    validate_push_weights(push)
    with pytest.raises(DmetaError, match=r"row 1 of the push weights sums to 0\.9"):
        validate_push_weights(PushWeights(sp.csr_array(np.array([[1, 0], [0.4, 0.5]]))))
    with pytest.raises(DmetaError, match="push-sum needs a strongly connected graph"):
        validate_push_weights(PushWeights(sp.csr_array(np.array([[1.0, 0], [0.5, 0.5]]))))


def schedule(name: str, k: int = 16, rule: str = "metropolis", **fields):
    cfg = GraphConfig(topology="exponential", schedule=name, **fields)
    return build_schedule(cfg, k, 7, rule)


@pytest.mark.parametrize(
    "name", ["static", "one_peer_exponential", "random_regular", "link_failures"]
)
def test_schedules_are_reproducible_and_column_stochastic(name):
    first, second = schedule(name), schedule(name)
    assert first.static == (name == "static")
    for t in range(1, 6):
        a = first.matrix_at(t)
        assert isinstance(a, sp.csc_array)
        validate_combination_matrix(a, require_connected=False)
        assert (a != second.matrix_at(t)).nnz == 0
    if name in ("random_regular", "link_failures"):
        assert (first.matrix_at(1) != first.matrix_at(2)).nnz > 0
        cfg = GraphConfig(topology="exponential", schedule=name)
        other_seed = build_schedule(cfg, 16, 8, "metropolis")
        assert (first.matrix_at(1) != other_seed.matrix_at(1)).nnz > 0


def test_one_peer_exponential_averages_exactly():
    k = 16
    one_peer = schedule("one_peer_exponential", k)
    product = np.eye(k)
    for t in range(1, 5):  # log2(16) rounds
        a = one_peer.matrix_at(t).toarray()
        assert a[(3 - 2 ** (t - 1)) % k, 3] == 0.5 and a[3, 3] == 0.5
        product = a.T @ product
    assert np.array_equal(product, np.full((k, k), 1 / k))
    rate, how = one_peer.expected_mixing_rate()
    assert rate == 0.0 and "exact consensus" in how


def test_link_failures_drop_and_reweigh_edges():
    k = 12
    cfg = GraphConfig(topology="ring", schedule="link_failures", failure_probability=0.3)
    failures = build_schedule(cfg, k, 0, "metropolis")
    ring = {frozenset(edge) for edge in nx.cycle_graph(k).edges}
    dropped = 0
    for t in range(1, 6):
        a = failures.matrix_at(t).toarray()
        up = {frozenset((i, j)) for i, j in zip(*np.nonzero(a), strict=True) if i != j}
        assert up <= ring
        for edge in ring - up:  # a down edge has no weight either way
            i, j = sorted(edge)
            assert a[i, j] == a[j, i] == 0.0
        dropped += len(ring - up)
        survivors = nx.empty_graph(k)
        survivors.add_edges_from(tuple(edge) for edge in up)
        expected = combination_matrix(survivors, "metropolis").toarray()
        np.testing.assert_allclose(a, expected, rtol=0, atol=1e-15)
        np.testing.assert_allclose(a.sum(axis=0), 1.0, rtol=0, atol=1e-15)
    assert dropped > 0


def test_expected_mixing_rate():
    static = schedule("static")
    assert static.expected_mixing_rate() == estimate_mixing_rate(static.matrix_at(1))
    assert static.expected_mixing_rate()[0] == mixing_rate(static.matrix_at(1))
    regular, how = schedule("random_regular", 64, degree=3).expected_mixing_rate()
    assert 0.0 < regular < 1.0 and "geometric mean" in how


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"schedule": "random_regular", "degree": 3}, "degree x agents even"),
        ({"schedule": "random_regular", "degree": 16}, "degree < agents"),
        ({"schedule": "link_failures", "failure_probability": 1.0}, r"not in \[0, 1\)"),
    ],
)
def test_bad_schedules(fields, match):
    k = 15 if fields.get("degree") == 3 else 16
    with pytest.raises(DmetaError, match=match):
        build_schedule(GraphConfig(**fields), k, 0, "metropolis")
    with pytest.raises(DmetaError, match="not 'matrix'"):
        build_schedule(GraphConfig(schedule="random_regular"), 16, 0, "matrix")


def test_draw_graph_refuses_huge_graphs(tmp_path):
    k = DRAW_LIMIT + 1
    with pytest.raises(DmetaError, match="leave out --plot"):
        draw_graph(nx.cycle_graph(k), sp.eye_array(k), str(tmp_path / "g.png"))
