"""Agent graphs and their combination matrices (Dif-MAML, Kayaalp et al., eq. (6b)).

Convention: A is K x K and a[l, k] is the weight agent k gives to agent l. Every column sums
to one (A is left-stochastic), so the combination step of eq. (6b) reads

    w_k = sum_l a[l, k] phi_l,

and a[l, k] > 0 only when l is in the neighbourhood N_k of k (which includes k itself).
The rules below always keep the self-loops: a[k, k] > 0.

Graphs have nodes exactly 0..K-1 and no self-loops; the self-loops live in A only.
"""

from __future__ import annotations

import math
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np

from dmeta.config import GraphConfig, Rule, Topology
from dmeta.errors import DmetaError

_MAX_SAMPLES = 1000  # random graphs are resampled this many times at most until connected
_TOL = 1e-10  # tolerance of the stochasticity and symmetry checks


def build_graph(cfg: GraphConfig, num_agents: int) -> nx.Graph:
    """The undirected agent graph of `cfg.topology` on nodes 0..num_agents-1."""
    k = num_agents
    if k < 1:
        raise DmetaError(f"the graph needs at least one agent, got agents = {k}")
    match cfg.topology:
        case "ring":
            graph = nx.cycle_graph(k)
        case "grid":
            graph = _grid(k, cfg.grid_rows)
        case "erdos_renyi":
            graph = _connected_sample(
                lambda rng: nx.gnp_random_graph(k, cfg.edge_probability, seed=rng),
                cfg.seed,
                f"Erdos-Renyi graph with {k} agents and edge_probability {cfg.edge_probability}",
                "raise graph.edge_probability",
            )
        case "geometric":
            graph = _connected_sample(
                lambda rng: nx.random_geometric_graph(k, cfg.radius, seed=rng),
                cfg.seed,
                f"random geometric graph with {k} agents and radius {cfg.radius}",
                "raise graph.radius",
            )
        case "complete":
            graph = nx.complete_graph(k)
        case "star":
            graph = nx.star_graph(k - 1)
        case "exponential":
            graph = _exponential(k)
        case "edge_list":
            graph = _read_edge_list(cfg.edge_list_path, k)
        case other:
            choices = ", ".join(typing.get_args(Topology))
            raise DmetaError(f"unknown graph.topology {other!r}: choose one of {choices}")
    graph.remove_edges_from(list(nx.selfloop_edges(graph)))  # ring of 1, "k k" edge-list lines
    return graph


def _grid(k: int, grid_rows: int) -> nx.Graph:
    """A rows x (K / rows) grid, numbered row by row."""
    rows = grid_rows or max(r for r in range(1, math.isqrt(k) + 1) if k % r == 0)
    if rows < 1 or k % rows:
        raise DmetaError(
            f"graph.grid_rows = {grid_rows} does not divide agents = {k}: "
            "set it to a divisor of the agent count, or 0 for the most nearly square grid"
        )
    return nx.convert_node_labels_to_integers(nx.grid_2d_graph(rows, k // rows), ordering="sorted")


def _connected_sample(
    sample: Callable[[np.random.Generator], nx.Graph], seed: int, what: str, fix: str
) -> nx.Graph:
    """The first connected graph in successive draws `sample(rng)`, rng seeded with `seed`."""
    if seed < 0:
        raise DmetaError(f"graph.seed must be nonnegative, got {seed}")
    rng = np.random.default_rng(seed)
    for _ in range(_MAX_SAMPLES):
        graph = sample(rng)
        if nx.is_connected(graph):
            return graph
    raise DmetaError(f"no connected {what} in {_MAX_SAMPLES} samples: {fix}")


def _exponential(k: int) -> nx.Graph:
    """Node i linked to i + 2^j mod K for j = 0..floor(log2(K - 1))."""
    graph = nx.empty_graph(k)
    hops = [2**j for j in range((k - 1).bit_length())]
    graph.add_edges_from((i, (i + hop) % k) for i in range(k) for hop in hops)
    return graph


def _read_edge_list(path: str, k: int) -> nx.Graph:
    """Undirected graph from "l k" lines of 0-based ids; '#' starts a comment."""
    if not path:
        raise DmetaError('graph.topology = "edge_list" needs graph.edge_list_path: set it')
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise DmetaError(f"cannot read edge list {path}: {exc.strerror}") from exc
    graph = nx.empty_graph(k)
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        try:
            ids = list(map(int, fields))  # ValueError on a non-integer
        except ValueError:
            ids = []
        if len(ids) != 2:
            raise DmetaError(
                f"{path}, line {number}: expected two agent ids 'l k', got {line.strip()!r}"
            )
        if not all(0 <= i < k for i in ids):
            raise DmetaError(
                f"{path}, line {number}: agent id out of range [0, {k}) in {line.strip()!r}: "
                "ids are 0-based and must be below agents"
            )
        graph.add_edge(*ids)
    return graph


def combination_matrix(graph: nx.Graph, rule: Rule, matrix_path: str = "") -> np.ndarray:
    """The K x K left-stochastic combination matrix A of `graph` under `rule` (float64).

    averaging: a[l, k] = 1/|N_k| for l in N_k. Columns sum to one; rows do only on regular
    graphs, so a UserWarning is emitted when A is not doubly stochastic.
    metropolis: a[l, k] = 1/max(|N_k|, |N_l|) for neighbours l != k, a[k, k] the rest.
    max_degree: a[l, k] = 1/(d_max + 1) for neighbours l != k, a[k, k] = 1 - d_k/(d_max + 1).
    matrix: read from `matrix_path` (.npy, else text), which must hold a K x K matrix.
    Metropolis and max-degree weights are symmetric and doubly stochastic.
    """
    k = graph.number_of_nodes()
    if rule == "matrix":
        return _load_matrix(matrix_path, k)
    if graph.is_directed() and rule != "averaging":
        raise DmetaError(f'rule = "{rule}" needs an undirected graph: use rule = "averaging"')
    adjacency = nx.to_numpy_array(graph, nodelist=range(k), weight=None)
    np.fill_diagonal(adjacency, 0.0)
    match rule:
        case "averaging":
            support = adjacency + np.eye(k)
            a = support / support.sum(axis=0)
            if not np.allclose(a.sum(axis=1), 1.0, rtol=0.0, atol=_TOL):
                warnings.warn(
                    "averaging weights are left-stochastic but not doubly stochastic on this "
                    "irregular graph, so agents weigh unequally in the network average: "
                    'set graph.rule = "metropolis" for a doubly stochastic A',
                    UserWarning,
                    stacklevel=2,
                )
            return a
        case "metropolis":
            size = adjacency.sum(axis=0) + 1.0  # |N_k|, self included
            a = adjacency / np.maximum.outer(size, size)
        case "max_degree":
            a = adjacency / (adjacency.sum(axis=0).max() + 1.0)
        case other:
            choices = ", ".join(typing.get_args(Rule))
            raise DmetaError(f"unknown graph.rule {other!r}: choose one of {choices}")
    np.fill_diagonal(a, 1.0 - a.sum(axis=0))
    return a


_FILE_ROUNDING = 1e-5  # column sums this close to one in a matrix file are rounding, rescaled


def _load_matrix(path: str, k: int) -> np.ndarray:
    """A K x K matrix file. Columns summing to within 1e-5 of one (weights printed to five or
    six digits) are rescaled to sum to exactly one; anything further is left to validation."""
    if not path:
        raise DmetaError('graph.rule = "matrix" needs graph.matrix_path: set it')
    try:
        a = np.load(path) if path.endswith(".npy") else np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DmetaError(f"cannot read combination matrix {path}: {exc}") from exc
    if a.shape != (k, k):
        raise DmetaError(
            f"combination matrix {path} has shape {a.shape}, expected ({k}, {k}) for {k} agents"
        )
    a = a.astype(np.float64)
    sums = a.sum(axis=0)
    if np.all(a >= 0) and np.all(np.abs(sums - 1.0) <= _FILE_ROUNDING):
        a = a / sums
    return a


def validate_combination_matrix(
    a: np.ndarray, require_connected: bool = True, tolerance: float = 1e-10
) -> None:
    """Raise DmetaError unless A is a valid left-stochastic combination matrix.

    With `require_connected`, the directed graph with an edge l -> k wherever a[l, k] > 0
    must be strongly connected (Dif-MAML needs a strongly connected network).
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.size == 0:
        raise DmetaError(f"combination matrix must be square K x K, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise DmetaError("combination matrix has NaN or infinite entries: fix the weights")
    negative = np.argwhere(a < 0)
    if negative.size:
        row, col = negative[0]
        raise DmetaError(
            f"combination matrix entry a[{row}, {col}] = {a[row, col]:g} is negative: "
            "all weights must be nonnegative"
        )
    sums = a.sum(axis=0)
    off = np.flatnonzero(np.abs(sums - 1.0) > tolerance)
    if off.size:
        k = off[0]
        raise DmetaError(
            f"column {k} of the combination matrix sums to {sums[k]:.12g}, not 1: "
            f"the weights a[:, {k}] agent {k} gives its neighbours must sum to one"
        )
    if require_connected:
        components = nx.number_strongly_connected_components(_digraph(a))
        if components > 1:
            raise DmetaError(
                f"the combination matrix graph has {components} strongly connected components: "
                'a disconnected graph needs strategy = "noncooperative" or another graph'
            )


def _digraph(a: np.ndarray) -> nx.DiGraph:
    """Edge l -> k wherever a[l, k] > 0 (self-loops included)."""
    return nx.from_numpy_array((a > 0).astype(int), create_using=nx.DiGraph)


@dataclass(frozen=True)
class MatrixReport:
    """Facts about a combination matrix (see `describe`)."""

    num_agents: int
    num_edges: int
    min_degree: int
    max_degree: int
    doubly_stochastic: bool
    symmetric: bool
    primitive: bool
    lambda2: float

    def lines(self) -> list[str]:
        """A human-readable summary, one fact per line."""
        yes = {True: "yes", False: "no"}
        return [
            f"agents: {self.num_agents}",
            f"edges: {self.num_edges}",
            f"degree (excluding self): min {self.min_degree}, max {self.max_degree}",
            f"doubly stochastic: {yes[self.doubly_stochastic]}",
            f"symmetric: {yes[self.symmetric]}",
            f"primitive: {yes[self.primitive]}",
            f"lambda2 (mixing rate): {self.lambda2:.6g}",
        ]


def describe(a: np.ndarray) -> MatrixReport:
    """Summarise A: edges and degrees of its support, stochasticity, primitivity, lambda2.

    A nonnegative matrix is primitive when its graph is strongly connected (irreducible) and
    aperiodic; a positive diagonal entry is a cycle of length one, so it suffices then.
    """
    a = np.asarray(a, dtype=np.float64)
    linked = (a > 0) | (a.T > 0)
    np.fill_diagonal(linked, False)
    degrees = linked.sum(axis=0)
    graph = _digraph(a)

    def close(x: np.ndarray, y: np.ndarray | float) -> bool:
        return bool(np.allclose(x, y, rtol=0.0, atol=_TOL))

    return MatrixReport(
        num_agents=a.shape[0],
        num_edges=int(np.triu(linked).sum()),
        min_degree=int(degrees.min()),
        max_degree=int(degrees.max()),
        doubly_stochastic=bool((a >= 0).all())
        and close(a.sum(axis=0), 1.0)
        and close(a.sum(axis=1), 1.0),
        symmetric=close(a, a.T),
        primitive=nx.is_strongly_connected(graph) and nx.is_aperiodic(graph),
        lambda2=mixing_rate(a),
    )


def mixing_rate(a: np.ndarray) -> float:
    """lambda_2 = spectral radius of A^T - (1/K) 1 1^T (Dif-MAML, Theorem 1).

    For left-stochastic A this is the second largest eigenvalue modulus of A (the rank-one
    term moves the eigenvalue 1 to 0 and keeps the others); it is 0 for K = 1.
    """
    a = np.asarray(a, dtype=np.float64)
    k = a.shape[0]
    return float(np.abs(np.linalg.eigvals(a.T - np.full((k, k), 1.0 / k))).max())


def draw_graph(graph: nx.Graph, a: np.ndarray, path: str) -> None:
    """Save a PNG picture of `graph` (spring layout, seed 0) titled with K and lambda2."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 6))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    nx.draw_networkx(graph, nx.spring_layout(graph, seed=0), ax=axes, node_color="#9ecae1")
    axes.set_title(f"K = {graph.number_of_nodes()} agents, $\\lambda_2$ = {mixing_rate(a):.4f}")
    axes.set_axis_off()
    figure.savefig(path, format="png", dpi=100)
