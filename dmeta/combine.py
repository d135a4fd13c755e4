"""The combination step (eq. 6b) and the network quantities of Theorem 1, as tensor maths."""

from __future__ import annotations

import warnings

import torch

# A weight block with fewer non-zeros than this share of its entries is applied as a sparse
# (CSR) product: K^2 M multiply-adds become nnz M (benchmarks/bench_combine.py, BENCHMARKS.md).
SPARSE_DENSITY = 0.25


def combine(weights: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """w_k = sum_l a[l, k] phi_l for each receiving agent k (eq. 6b).

    weights: [sources, receivers], the rows of A for the source agents and the columns of the
    receiving agents; states: [sources, M], the intermediate states phi_l. Returns [receivers, M].
    """
    return weights.T @ states


class Combination:
    """`combine` for one fixed weight block [sources, receivers], applied every iteration.

    A^T is formed once, dense or, when the block is sparse, in CSR form; the two agree to
    rounding (sums are taken in another order).
    """

    def __init__(self, weights: torch.Tensor) -> None:
        transposed = weights.T.contiguous()
        if int((weights != 0).sum()) < SPARSE_DENSITY * weights.numel():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                transposed = transposed.to_sparse_csr()
        self.transposed = transposed

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        """[receivers, M]: the combined models of the receiving agents."""
        return self.transposed @ states


def disagreement(launch_models: torch.Tensor, centroid: torch.Tensor) -> torch.Tensor:
    """||w_k - w_c||^2 per agent (Theorem 1), with w_c the network centroid (1/K) sum_k w_k."""
    return ((launch_models - centroid) ** 2).sum(dim=1)
