"""Agent graphs and their combination matrices (Dif-MAML, Kayaalp et al., eq. (6b)).

Convention: A is K x K and a[l, k] is the weight agent k gives to agent l. Every column sums
to one (A is left-stochastic, i.e. column-stochastic), so the combination step of eq. (6b) reads

    w_k = sum_l a[l, k] phi_l,

and a[l, k] > 0 only when l is in the neighbourhood N_k of k (which includes k itself).
The rules below always keep the self-loops: a[k, k] > 0.

Graphs have nodes exactly 0..K-1 and no self-loops; the self-loops live in A only. In a
directed graph an edge l -> k (edge-list line "l k") means l's model reaches k, so k may give
it a weight a[l, k] > 0: agents listen to their in-neighbours.

Matrices are scipy.sparse csc_array (float64), so memory is O(K x degree): nothing here forms
a dense K x K array except for K <= DENSE_LIMIT (eigenvalues) and dense matrix files.
Push weights (`PushWeights`, for push-sum) are the other, row-stochastic convention and have
their own type. A `Schedule` gives the combination matrix of every round of a time-varying
graph as a pure function of (seed, round), so all MPI ranks agree without communicating.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import scipy.io
import scipy.sparse as sp
from scipy.sparse import csgraph
from scipy.sparse import linalg as splinalg

from dmeta.config import GraphConfig, Rule, Topology
from dmeta.errors import DmetaError

DENSE_LIMIT = 1000  # mixing_rate and perron_vector use dense eigenvalues up to this many agents
DRAW_LIMIT = 2000  # draw_graph refuses larger graphs
_MAX_SAMPLES = 1000  # random graphs are resampled this many times at most until connected
_TOL = 1e-10  # tolerance of the stochasticity and symmetry checks
_DIRECTED = ("ring", "exponential", "edge_list")  # topologies with a directed variant

Matrix = np.ndarray | sp.sparray


def build_graph(cfg: GraphConfig, num_agents: int) -> nx.Graph | nx.DiGraph:
    """The agent graph of `cfg.topology` on nodes 0..num_agents-1 (directed if cfg.directed)."""
    k = num_agents
    if k < 1:
        raise DmetaError(f"the graph needs at least one agent, got agents = {k}")
    if cfg.directed and cfg.topology not in _DIRECTED:
        raise DmetaError(
            f"graph.directed = true is defined for topology {', '.join(_DIRECTED)}, "
            f"not {cfg.topology!r}: set graph.directed = false or change graph.topology"
        )
    match cfg.topology:
        case "ring":
            graph = _circulant(k, [1], cfg.directed)
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
            graph = _circulant(k, [2**j for j in range((k - 1).bit_length())], cfg.directed)
        case "edge_list":
            graph = _read_edge_list(cfg.edge_list_path, k, cfg.directed)
        case other:
            choices = ", ".join(typing.get_args(Topology))
            raise DmetaError(f"unknown graph.topology {other!r}: choose one of {choices}")
    graph.remove_edges_from(list(nx.selfloop_edges(graph)))  # ring of 1, "k k" edge-list lines
    return graph


def _circulant(k: int, hops: list[int], directed: bool) -> nx.Graph | nx.DiGraph:
    """Node i linked to i + hop mod K for every hop (i -> i + hop when directed)."""
    graph = nx.empty_graph(k, create_using=nx.DiGraph if directed else nx.Graph)
    nodes = np.arange(k)
    for hop in hops:
        graph.add_edges_from(zip(nodes.tolist(), ((nodes + hop) % k).tolist(), strict=True))
    return graph


def _grid(k: int, grid_rows: int) -> nx.Graph:
    """A rows x (K / rows) grid, node r * columns + c at row r, column c."""
    rows = grid_rows or max(r for r in range(1, math.isqrt(k) + 1) if k % r == 0)
    if rows < 1 or k % rows:
        raise DmetaError(
            f"graph.grid_rows = {grid_rows} does not divide agents = {k}: "
            "set it to a divisor of the agent count, or 0 for the most nearly square grid"
        )
    ids = np.arange(k).reshape(rows, k // rows)
    graph = nx.empty_graph(k)
    for left, right in ((ids[:, :-1], ids[:, 1:]), (ids[:-1], ids[1:])):  # rows, then columns
        graph.add_edges_from(zip(left.ravel().tolist(), right.ravel().tolist(), strict=True))
    return graph


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


def _read_edge_list(path: str, k: int, directed: bool) -> nx.Graph | nx.DiGraph:
    """Graph from "l k" lines of 0-based ids ('#' starts a comment); directed: l -> k."""
    if not path:
        raise DmetaError('graph.topology = "edge_list" needs graph.edge_list_path: set it')
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise DmetaError(f"cannot read edge list {path}: {exc.strerror}") from exc
    graph = nx.empty_graph(k, create_using=nx.DiGraph if directed else nx.Graph)
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


def combination_matrix(graph: nx.Graph, rule: Rule, matrix_path: str = "") -> sp.csc_array:
    """The K x K left-stochastic combination matrix A of `graph` under `rule` (float64, sparse).

    averaging: a[l, k] = 1/|N_k| for l in N_k (in-neighbours and self on a digraph). Columns
    sum to one; rows do only on regular graphs, so a UserWarning is emitted when A is not
    doubly stochastic.
    metropolis: a[l, k] = 1/max(|N_k|, |N_l|) for neighbours l != k, a[k, k] the rest.
    max_degree: a[l, k] = 1/(d_max + 1) for neighbours l != k, a[k, k] = 1 - d_k/(d_max + 1).
    matrix: read from `matrix_path`: a dense K x K .npy or text file, or a sparse Matrix
    Market .mtx file.
    Metropolis and max-degree weights are symmetric and doubly stochastic (undirected only).
    """
    if rule == "matrix":
        return _load_matrix(matrix_path, graph.number_of_nodes())
    _check_rule(graph, rule)
    a = _rule_weights(_adjacency(graph), rule)
    if rule == "averaging" and not _sums_to_one(a.sum(axis=1), _TOL):
        warnings.warn(
            "averaging weights are left-stochastic but not doubly stochastic on this "
            "irregular graph, so agents weigh unequally in the network average: "
            'set graph.rule = "metropolis" for a doubly stochastic A',
            UserWarning,
            stacklevel=2,
        )
    return a


def _check_rule(graph: nx.Graph | nx.DiGraph, rule: str) -> None:
    """DmetaError unless `rule` is a known rule that can weigh `graph` (matrix files aside)."""
    if rule not in typing.get_args(Rule):
        choices = ", ".join(typing.get_args(Rule))
        raise DmetaError(f"unknown graph.rule {rule!r}: choose one of {choices}")
    if graph.is_directed() and rule != "averaging":
        raise DmetaError(f'rule = "{rule}" needs an undirected graph: use rule = "averaging"')


def _adjacency(graph: nx.Graph | nx.DiGraph) -> sp.coo_array:
    """0/1 adjacency without diagonal: entry [l, k] for an edge l -> k (both ways if undirected)."""
    k = graph.number_of_nodes()
    if set(graph) != set(range(k)):
        raise DmetaError(f"the graph's nodes must be the agent ids 0..{k - 1}: relabel them")
    pairs = itertools.chain.from_iterable(graph.edges())
    edges = np.fromiter(pairs, dtype=np.int64, count=2 * graph.number_of_edges()).reshape(-1, 2)
    return _edges_to_adjacency(edges[:, 0], edges[:, 1], k, graph.is_directed())


def _edges_to_adjacency(rows: np.ndarray, cols: np.ndarray, k: int, directed: bool) -> sp.coo_array:
    """0/1 adjacency of edges rows[i] -> cols[i] (and back unless directed), no diagonal."""
    if not directed:
        rows, cols = np.concatenate([rows, cols]), np.concatenate([cols, rows])
    keep = rows != cols
    pattern = sp.coo_array((np.ones(keep.sum()), (rows[keep], cols[keep])), shape=(k, k))
    pattern.sum_duplicates()  # multigraph edges
    pattern.data[:] = 1.0
    return pattern


def _rule_weights(adjacency: sp.coo_array, rule: str) -> sp.csc_array:
    """A of an averaging, metropolis or max_degree `rule` from a 0/1 adjacency (no diagonal)."""
    k = adjacency.shape[0]
    rows, cols = adjacency.coords
    size = np.bincount(cols, minlength=k) + 1.0  # |N_k|: in-neighbours and self
    diagonal = np.arange(k)
    if rule == "averaging":
        rows, cols = np.concatenate([rows, diagonal]), np.concatenate([cols, diagonal])
        return sp.csc_array((1.0 / size[cols], (rows, cols)), shape=(k, k))
    if rule == "metropolis":
        weights = 1.0 / np.maximum(size[rows], size[cols])
    else:  # max_degree
        weights = np.full(rows.size, 1.0 / size.max())
    self_weights = 1.0 - np.bincount(cols, weights=weights, minlength=k)
    data = np.concatenate([weights, self_weights])
    indices = (np.concatenate([rows, diagonal]), np.concatenate([cols, diagonal]))
    return sp.csc_array((data, indices), shape=(k, k))


_FILE_ROUNDING = 1e-5  # column sums this close to one in a matrix file are rounding, rescaled


def _load_matrix(path: str, k: int) -> sp.csc_array:
    """A K x K matrix file (.npy, .mtx, else text). Columns summing to within 1e-5 of one
    (weights printed to five or six digits) are rescaled to sum to exactly one; anything
    further is left to validation."""
    if not path:
        raise DmetaError('graph.rule = "matrix" needs graph.matrix_path: set it')
    try:
        if path.endswith(".mtx"):
            a = sp.csc_array(scipy.io.mmread(path))
        else:
            a = np.load(path) if path.endswith(".npy") else np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DmetaError(f"cannot read combination matrix {path}: {exc}") from exc
    if a.shape != (k, k):
        raise DmetaError(
            f"combination matrix {path} has shape {a.shape}, expected ({k}, {k}) for {k} agents"
        )
    a = sp.csc_array(a, dtype=np.float64)
    sums = a.sum(axis=0)
    if np.all(a.data >= 0) and np.all(np.abs(sums - 1.0) <= _FILE_ROUNDING):
        a.data /= np.repeat(sums, np.diff(a.indptr))
    return a


def validate_combination_matrix(
    a: Matrix, require_connected: bool = True, tolerance: float = 1e-10
) -> None:
    """Raise DmetaError unless A (dense or sparse) is a valid left-stochastic combination matrix.

    With `require_connected`, the directed graph with an edge l -> k wherever a[l, k] > 0
    must be strongly connected (Dif-MAML needs a strongly connected network).
    """
    a = _as_sparse(a, "combination matrix")
    _check_entries(a, "combination matrix", "a")
    off = _first_off_one(a.sum(axis=0), tolerance)
    if off is not None:
        raise DmetaError(
            f"column {off} of the combination matrix sums to {a.sum(axis=0)[off]:.12g}, not 1: "
            f"the weights a[:, {off}] agent {off} gives its neighbours must sum to one"
        )
    if require_connected:
        fix = 'a disconnected graph needs strategy = "noncooperative" or another graph'
        _check_connected(a, "combination matrix", fix)


def _as_sparse(a: Matrix, what: str) -> sp.csc_array:
    """`a` as a float64 csc_array; DmetaError unless it is a nonempty square matrix."""
    if not sp.issparse(a):
        a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise DmetaError(f"{what} must be square K x K, got shape {a.shape}")
    return sp.csc_array(a, dtype=np.float64)


def _check_entries(a: sp.csc_array, what: str, symbol: str) -> None:
    """DmetaError on a NaN, infinite or negative entry of `a`."""
    if not np.isfinite(a.data).all():
        raise DmetaError(f"{what} has NaN or infinite entries: fix the weights")
    entries = a.tocoo()
    rows, cols = entries.coords
    negative = np.flatnonzero(entries.data < 0)
    if negative.size:
        first = negative[np.lexsort((cols[negative], rows[negative]))[0]]
        row, col = rows[first], cols[first]
        raise DmetaError(
            f"{what} entry {symbol}[{row}, {col}] = {a[row, col]:g} is negative: "
            "all weights must be nonnegative"
        )


def _first_off_one(sums: np.ndarray, tolerance: float) -> int | None:
    """The first index whose sum is not within `tolerance` of one, None if there is none."""
    off = np.flatnonzero(~(np.abs(sums - 1.0) <= tolerance))
    return int(off[0]) if off.size else None


def _sums_to_one(sums: np.ndarray, tolerance: float) -> bool:
    return _first_off_one(sums, tolerance) is None


def _check_connected(a: sp.csc_array, what: str, fix: str) -> None:
    """DmetaError unless the graph l -> k where a[l, k] > 0 is strongly connected; agents
    with no edge at all are named."""
    pattern = (a > 0).tocoo()
    count, _ = csgraph.connected_components(pattern, directed=True, connection="strong")
    if count == 1:
        return
    rows, cols = pattern.coords
    edges = np.concatenate([rows[rows != cols], cols[rows != cols]])
    alone = np.setdiff1d(np.arange(a.shape[0]), edges)
    if alone.size:
        names = ", ".join(map(str, alone[:5])) + (", ..." if alone.size > 5 else "")
        raise DmetaError(
            f"agents with no neighbour at all in the {what} graph: {names} (of 0..{a.shape[0] - 1};"
            " an edge list naming fewer agents?): link them or lower agents "
            f"({fix})"
        )
    raise DmetaError(f"the {what} graph has {count} strongly connected components: {fix}")


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
    lambda2_method: str

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
            f"lambda2 (mixing rate): {self.lambda2:.6g} ({self.lambda2_method})",
        ]


def describe(a: Matrix) -> MatrixReport:
    """Summarise A: edges and degrees of its support, stochasticity, primitivity, lambda2.

    Sparse throughout: O(K x degree) memory; lambda2 as in `estimate_mixing_rate`.
    """
    a = _as_sparse(a, "combination matrix")
    pattern = (a > 0).astype(np.int8)
    linked = (pattern + pattern.T).tocoo()
    rows, cols = linked.coords
    off_diagonal = cols[rows != cols]
    degrees = np.bincount(off_diagonal, minlength=a.shape[0])
    lambda2, method = estimate_mixing_rate(a)
    return MatrixReport(
        num_agents=a.shape[0],
        num_edges=off_diagonal.size // 2,
        min_degree=int(degrees.min()),
        max_degree=int(degrees.max()),
        doubly_stochastic=bool((a.data >= 0).all())
        and _sums_to_one(a.sum(axis=0), _TOL)
        and _sums_to_one(a.sum(axis=1), _TOL),
        symmetric=_asymmetry(a) <= _TOL,
        primitive=_is_primitive(pattern),
        lambda2=lambda2,
        lambda2_method=method,
    )


def _asymmetry(a: sp.csc_array) -> float:
    """max |a[l, k] - a[k, l]|."""
    difference = (a - a.T).tocoo()
    return float(np.abs(difference.data).max()) if difference.nnz else 0.0


def _is_primitive(pattern: sp.sparray) -> bool:
    """Whether a nonnegative matrix with this support is primitive: its graph is strongly
    connected and aperiodic (the gcd of its cycle lengths is one; a positive diagonal entry is
    a cycle of length one). The period is the gcd of level(u) + 1 - level(v) over the edges
    u -> v, levels being breadth-first distances from agent 0."""
    count, _ = csgraph.connected_components(pattern, directed=True, connection="strong")
    if count > 1:
        return False
    if (pattern.diagonal() > 0).any():
        return True
    levels = csgraph.shortest_path(pattern, unweighted=True, indices=0).astype(np.int64)
    rows, cols = pattern.tocoo().coords
    return int(np.gcd.reduce(np.abs(levels[rows] + 1 - levels[cols]))) == 1


def mixing_rate(a: Matrix) -> float:
    """lambda_2 = spectral radius of A^T - (1/K) 1 1^T (Dif-MAML, Theorem 1).

    For left-stochastic A this is the second largest eigenvalue modulus of A (the rank-one
    term moves the eigenvalue 1 to 0 and keeps the others); it is 0 for K = 1. Computed by
    `estimate_mixing_rate`, which also says how.
    """
    return estimate_mixing_rate(a)[0]


_ARPACK_TOL = 1e-8  # relative accuracy ARPACK is asked for
_ARPACK_SECONDS = 4.0  # ARPACK gives up after this long
_ARPACK_NCV = 20  # Lanczos / Arnoldi basis size of ARPACK
_KRYLOV_STEPS = 40  # Arnoldi steps of the estimate when ARPACK gives up


class _OutOfTimeError(Exception):
    """Raised inside ARPACK's matrix-vector product to stop it at its deadline."""


def estimate_mixing_rate(a: Matrix, dense_limit: int = DENSE_LIMIT) -> tuple[float, str]:
    """lambda_2 of `mixing_rate` and how it was computed, in bounded time and O(K x degree)
    memory above `dense_limit` agents.

    K <= dense_limit: all eigenvalues of the dense A^T - (1/K) 1 1^T (symmetric solver if A is).
    Otherwise ARPACK (eigsh if A is symmetric, else eigs) on the operator
    x -> A^T x - mean(x) 1, which never forms the rank-one term, for at most 4 s. If it does
    not converge (a ring of 100,000 has lambda_2 = 1 - O(1e-9), too close to the rest of the
    spectrum), the best estimate is the largest-modulus Ritz value of 40 Arnoldi steps, a
    lower bound when A is symmetric, reported with its residual norm.
    """
    a = _as_sparse(a, "combination matrix")
    k = a.shape[0]
    symmetric = _asymmetry(a) == 0.0
    if k <= dense_limit:
        dense = a.T.toarray() - 1.0 / k
        values = np.linalg.eigvalsh(dense) if symmetric else np.linalg.eigvals(dense)
        return float(np.abs(values).max()), f"dense eigenvalues (K <= {dense_limit})"
    transposed = a.T.tocsr()
    deadline = time.monotonic() + _ARPACK_SECONDS

    def product(x: np.ndarray) -> np.ndarray:  # (A^T - (1/K) 1 1^T) x
        if time.monotonic() > deadline:
            raise _OutOfTimeError
        x = x.ravel()
        return transposed @ x - x.mean()

    operator = splinalg.LinearOperator((k, k), matvec=product, dtype=np.float64)
    start = np.random.default_rng(0).standard_normal(k)
    solver, name = (splinalg.eigsh, "eigsh") if symmetric else (splinalg.eigs, "eigs")
    try:
        options = {"tol": _ARPACK_TOL, "ncv": min(_ARPACK_NCV, k), "v0": start, "maxiter": 10**6}
        values = solver(operator, k=1, which="LM", return_eigenvectors=False, **options)
        return float(np.abs(values).max()), f"ARPACK {name}, tol {_ARPACK_TOL:g}, converged"
    except (_OutOfTimeError, splinalg.ArpackNoConvergence):
        deadline = math.inf  # `product` reads it: no deadline for the Arnoldi steps below
    value, residual = _ritz_estimate(operator, start, _KRYLOV_STEPS)
    bound = ", a lower bound" if symmetric else ""
    return value, (
        f"ARPACK {name} did not converge in {_ARPACK_SECONDS:g} s (tol {_ARPACK_TOL:g}); "
        f"estimate: largest Ritz value of {_KRYLOV_STEPS} Arnoldi steps{bound}, "
        f"residual {residual:.1e}"
    )


def _ritz_estimate(
    operator: splinalg.LinearOperator, start: np.ndarray, steps: int
) -> tuple[float, float]:
    """Largest modulus among the Ritz values of `steps` Arnoldi steps from `start` (with full
    reorthogonalisation), and the residual norm of its Ritz pair."""
    basis = np.zeros((steps + 1, start.size))
    hessenberg = np.zeros((steps + 1, steps))
    basis[0] = start / np.linalg.norm(start)
    for j in range(steps):
        w = operator.matvec(basis[j])
        for _ in range(2):  # Gram-Schmidt twice keeps the basis orthonormal
            coefficients = basis[: j + 1] @ w
            w -= coefficients @ basis[: j + 1]
            hessenberg[: j + 1, j] += coefficients
        hessenberg[j + 1, j] = np.linalg.norm(w)
        if hessenberg[j + 1, j] < 1e-12:  # an invariant subspace: its Ritz values are exact
            steps = j + 1
            break
        basis[j + 1] = w / hessenberg[j + 1, j]
    values, vectors = np.linalg.eig(hessenberg[:steps, :steps])
    best = int(np.argmax(np.abs(values)))
    return float(abs(values[best])), float(abs(hessenberg[steps, steps - 1] * vectors[-1, best]))


def perron_vector(a: Matrix, dense_limit: int = DENSE_LIMIT) -> np.ndarray:
    """The Perron vector p of A: A p = p, p > 0, sum(p) = 1 (its right eigenvector of the
    eigenvalue 1; the limit of the network average weights under eq. (6b)).

    Uniform when A is doubly stochastic; the dense eigenvector for K <= dense_limit; else the
    exact solution of (I - A) p = 0 with p_0 = 1, by sparse LU of (I - A) without its first
    row and column (memory: the LU factors, O(K) for a ring).
    """
    a = _as_sparse(a, "combination matrix")
    k = a.shape[0]
    if _sums_to_one(a.sum(axis=1), _TOL):
        return np.full(k, 1.0 / k)
    if k <= dense_limit:
        values, vectors = np.linalg.eig(a.toarray())
        p = vectors[:, np.argmin(np.abs(values - 1.0))].real
    else:
        reduced = (sp.eye_array(k, format="csc") - a)[1:, 1:].tocsc()
        try:
            rest = splinalg.splu(reduced).solve(a[1:, [0]].toarray().ravel())
        except RuntimeError:  # exactly singular: not strongly connected
            rest = np.full(k - 1, -1.0)
        p = np.concatenate([[1.0], rest])
    p = p / p.sum()
    if not (p > 0).all():
        raise DmetaError(
            "the combination matrix has no positive Perron vector, its graph is not strongly "
            "connected: validate_combination_matrix says what to change"
        )
    return p


def draw_graph(graph: nx.Graph, a: Matrix, path: str) -> None:
    """Save a PNG picture of `graph` (spring layout, seed 0) titled with K and lambda2."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = graph.number_of_nodes()
    if k > DRAW_LIMIT:
        raise DmetaError(
            f"a picture of {k} agents is slow and unreadable: drawing stops at {DRAW_LIMIT} "
            "agents, leave out --plot"
        )
    figure = Figure(figsize=(6, 6))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    nx.draw_networkx(graph, nx.spring_layout(graph, seed=0), ax=axes, node_color="#9ecae1")
    axes.set_title(f"K = {k} agents, $\\lambda_2$ = {mixing_rate(a):.4f}")
    axes.set_axis_off()
    figure.savefig(path, format="png", dpi=100)


@dataclass(frozen=True)
class PushWeights:
    """Row-stochastic push (send) weights for push-sum: matrix[k, l] is the share of its mass
    sender k pushes to agent l; every row sums to one. The opposite of the column-stochastic
    combination matrix A, hence a type of its own."""

    matrix: sp.csr_array


def push_weights(graph: nx.Graph | nx.DiGraph) -> PushWeights:
    """p[k, l] = 1/(d_out(k) + 1) for l = k and every out-neighbour l of k (edge k -> l; every
    neighbour if the graph is undirected)."""
    adjacency = _adjacency(graph)  # [k, l] = 1 for an edge k -> l
    receive = _rule_weights(adjacency.T.tocoo(), "averaging")  # columns: out-neighbours of k
    return PushWeights(receive.T.tocsr())


def validate_push_weights(
    push: PushWeights, require_connected: bool = True, tolerance: float = 1e-10
) -> None:
    """Raise DmetaError unless `push.matrix` is nonnegative, row-stochastic and (with
    `require_connected`) its graph k -> l where p[k, l] > 0 is strongly connected."""
    p = _as_sparse(push.matrix, "push weights")
    _check_entries(p, "push weights", "p")
    sums = p.sum(axis=1)
    off = _first_off_one(sums, tolerance)
    if off is not None:
        raise DmetaError(
            f"row {off} of the push weights sums to {sums[off]:.12g}, not 1: the shares "
            f"p[{off}, :] agent {off} pushes to its out-neighbours and itself must sum to one"
        )
    if require_connected:
        _check_connected(p, "push weights", "push-sum needs a strongly connected graph")


_REGULAR_STREAM, _FAILURE_STREAM, _PROBE_STREAM = 1, 2, 3  # random streams of a schedule seed
_PROBES = 4  # random vectors of expected_mixing_rate


class Schedule:
    """The combination matrix of every round t = 1, 2, ... of a time-varying graph (or the same
    matrix every round: `static`). matrix_at(t) is a pure function of (seed, t)."""

    def __init__(
        self, name: str, num_agents: int, seed: int, matrix_at: Callable[[int], sp.csc_array]
    ) -> None:
        self.name = name
        self.num_agents = num_agents
        self.seed = seed
        self._matrix_at = matrix_at

    @property
    def static(self) -> bool:
        """Whether every round has the same combination matrix."""
        return self.name == "static"

    def matrix_at(self, t: int) -> sp.csc_array:
        """The left-stochastic combination matrix A_t of round t >= 1 (eq. (6b) with A_t)."""
        if t < 1:
            raise ValueError(f"rounds are numbered from 1, got t = {t}")
        return self._matrix_at(t)

    def expected_mixing_rate(self, rounds: int = 64) -> tuple[float, str]:
        """The per-round mixing rate and how it was computed.

        Static: lambda_2 of the matrix (`estimate_mixing_rate`). Time-varying: the growth
        rate of the disagreement x_t = (I - (1/K) 1 1^T) A_t^T x_{t-1} of random x_0 orthogonal
        to 1 (the top Lyapunov exponent of the products A_t^T ... A_1^T off the consensus
        direction): the geometric mean of ||x_t|| / ||x_{t-1}|| over rounds after a burn-in of
        rounds / 4, the worst of 4 random x_0; 0 when the disagreement vanishes exactly.
        """
        if self.static:
            return estimate_mixing_rate(self.matrix_at(1))
        k = self.num_agents
        if k == 1:
            return 0.0, "one agent: no disagreement"
        x = np.random.default_rng([self.seed, _PROBE_STREAM]).standard_normal((k, _PROBES))
        x -= x.mean(axis=0)
        burn_in = rounds // 4
        log_growth = np.zeros(_PROBES)
        for t in range(1, rounds + 1):
            y = self.matrix_at(t).T @ x
            y -= y.mean(axis=0)
            growth = np.linalg.norm(y, axis=0) / np.linalg.norm(x, axis=0)
            if growth.min() < 1e-12:
                return 0.0, f"exact consensus: the disagreement vanished in round {t}"
            if t > burn_in:
                log_growth += np.log(growth)
            x = y / np.linalg.norm(y, axis=0)
        rate = float(np.exp(log_growth.max() / (rounds - burn_in)))
        return rate, (
            f"geometric mean of the disagreement contraction over rounds {burn_in + 1}.."
            f"{rounds}, worst of {_PROBES} random starts"
        )


def build_schedule(cfg: GraphConfig, num_agents: int, seed: int, rule: Rule) -> Schedule:
    """The combination matrices of `cfg.schedule`, round t keyed by (seed, t).

    static: A of `build_graph(cfg)` under `rule` in every round.
    one_peer_exponential: in round t agent k receives from the single peer
    l = (k - 2^j) mod K, j = (t - 1) mod ceil(log2 K), with a[k, k] = a[l, k] = 1/2 (every
    agent sends to k + 2^j: doubly stochastic; exact averaging after log2 K rounds when K is
    a power of two); the topology and `rule` are not used.
    random_regular: a fresh random cfg.degree-regular graph per round under `rule`.
    link_failures: every edge of `build_graph(cfg)` is down in round t with probability
    cfg.failure_probability, independently per (edge, t); `rule` reweighs the surviving graph.
    """
    k = num_agents
    if seed < 0:
        raise DmetaError(f"the schedule seed must be nonnegative, got {seed}")
    match cfg.schedule:
        case "static":
            a = combination_matrix(build_graph(cfg, k), rule, cfg.matrix_path)
            return Schedule("static", k, seed, lambda t: a)
        case "one_peer_exponential":
            return Schedule(cfg.schedule, k, seed, functools.partial(_one_peer, k))
        case "random_regular":
            _check_redrawn_rule(cfg.schedule, rule)
            if not (1 <= cfg.degree < k and cfg.degree * k % 2 == 0):
                raise DmetaError(
                    f"graph.degree = {cfg.degree} with agents = {k}: a random regular graph "
                    "needs 1 <= degree < agents and degree x agents even; change graph.degree"
                )
            draw = functools.partial(_random_regular, k, cfg.degree, rule, seed)
            return Schedule(cfg.schedule, k, seed, draw)
        case "link_failures":
            return _link_failures(cfg, k, seed, rule)
        case other:
            raise DmetaError(
                f"unknown graph.schedule {other!r}: choose one of static, "
                "one_peer_exponential, random_regular, link_failures"
            )


def _check_redrawn_rule(schedule: str, rule: str) -> None:
    """DmetaError unless `rule` can weigh a graph that changes every round."""
    if rule not in ("averaging", "metropolis", "max_degree"):
        raise DmetaError(
            f'graph.schedule = "{schedule}" weighs a new graph every round: set graph.rule to '
            f"averaging, metropolis or max_degree, not {rule!r}"
        )


def _one_peer(k: int, t: int) -> sp.csc_array:
    """Round t of the one-peer exponential graph: a[k, k] = a[k - 2^j, k] = 1/2."""
    if k == 1:
        return sp.csc_array(np.ones((1, 1)))
    hop = 2 ** ((t - 1) % (k - 1).bit_length())
    agents = np.arange(k)
    rows = np.concatenate([agents, (agents - hop) % k])
    return sp.csc_array((np.full(2 * k, 0.5), (rows, np.tile(agents, 2))), shape=(k, k))


def _random_regular(k: int, degree: int, rule: str, seed: int, t: int) -> sp.csc_array:
    """Round t of the random regular schedule: networkx's graph seeded from (seed, t)."""
    rng = np.random.default_rng([seed, _REGULAR_STREAM, t])
    graph = nx.random_regular_graph(degree, k, seed=int(rng.integers(2**32)))
    return _rule_weights(_adjacency(graph), rule)


def _link_failures(cfg: GraphConfig, k: int, seed: int, rule: Rule) -> Schedule:
    """The link-failure schedule of `build_schedule` on the static graph of `cfg`."""
    _check_redrawn_rule("link_failures", rule)
    if not 0.0 <= cfg.failure_probability < 1.0:
        raise DmetaError(
            f"graph.failure_probability = {cfg.failure_probability} is not in [0, 1): change it"
        )
    graph = build_graph(cfg, k)
    _check_rule(graph, rule)
    rows, cols = _adjacency(graph).coords
    if not graph.is_directed():  # each undirected edge once
        rows, cols = rows[rows < cols], cols[rows < cols]
    if rule == "averaging":
        warnings.warn(
            "averaging weights on graphs with failed links are not doubly stochastic: "
            'set graph.rule = "metropolis" for doubly stochastic rounds',
            UserWarning,
            stacklevel=3,
        )

    def round_matrix(t: int) -> sp.csc_array:
        rng = np.random.default_rng([seed, _FAILURE_STREAM, t])
        up = rng.random(rows.size) >= cfg.failure_probability
        adjacency = _edges_to_adjacency(rows[up], cols[up], k, graph.is_directed())
        return _rule_weights(adjacency, rule)

    return Schedule("link_failures", k, seed, round_matrix)
