"""The combination step (eq. 6b) and the network quantities of Theorem 1, as tensor maths."""

from __future__ import annotations

import torch


def combine(weights: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """w_k = sum_l a[l, k] phi_l for each receiving agent k (eq. 6b).

    weights: [sources, receivers], the rows of A for the source agents and the columns of the
    receiving agents; states: [sources, M], the intermediate states phi_l. Returns [receivers, M].
    """
    return weights.T @ states


def disagreement(launch_models: torch.Tensor, centroid: torch.Tensor) -> torch.Tensor:
    """||w_k - w_c||^2 per agent (Theorem 1), with w_c the network centroid (1/K) sum_k w_k."""
    return ((launch_models - centroid) ** 2).sum(dim=1)
