"""Linear representation learning (Collins, Mokhtari, Oh and Shakkottai; papers/ seed 001).

Tasks are y = <B* w*_t, x> + z with x ~ N(0, I_d), z ~ N(0, sigma^2) and a ground-truth
representation B* in R^{d x k} with orthonormal columns; each task has its own head w*_t in R^k.
The model is a representation B in R^{d x k} and a head w in R^k, flattened as B row-major then
w, predicting <B w, x> with the loss (1/2)(<B w, x> - y)^2, whose expectation over x and z (the
population loss) is (1/2)||B w - B* w*_t||^2 + sigma^2 / 2.

Pure tensor maths: these functions know nothing of agents' layout, MPI or files.
"""

from __future__ import annotations

import math

import torch


def split(theta: torch.Tensor, dim: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [..., d, k], w [..., k]) from flat parameters [..., d k + k] (B row-major first)."""
    representation = theta[..., : dim * rank].reshape(*theta.shape[:-1], dim, rank)
    return representation, theta[..., dim * rank :]


def flatten(representation: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Flat parameters [..., d k + k] from B [..., d, k] and w [..., k]."""
    return torch.cat([representation.flatten(-2), head], dim=-1)


def predict(theta: torch.Tensor, x: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """<B w, x> for inputs x [samples, d]: [samples, 1]."""
    representation, head = split(theta, dim, rank)
    return (x @ (representation @ head))[:, None]


def sample_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(1/2) mean over samples of (<B w, x> - y)^2."""
    return 0.5 * ((prediction - target) ** 2).mean()


def population_loss(
    theta: torch.Tensor, task_head: torch.Tensor, truth: torch.Tensor, noise_std: float
) -> torch.Tensor:
    """E over x and z of the sample loss: (1/2)||B w - B* w*||^2 + sigma^2 / 2."""
    dim, rank = truth.shape
    representation, head = split(theta, dim, rank)
    residual = representation @ head - truth @ task_head
    return 0.5 * residual @ residual + 0.5 * noise_std**2


def population_gradient(
    theta: torch.Tensor, task_head: torch.Tensor, truth: torch.Tensor
) -> torch.Tensor:
    """Gradient of `population_loss` in closed form: ((B w - B* w*) w^T, B^T (B w - B* w*))."""
    dim, rank = truth.shape
    representation, head = split(theta, dim, rank)
    residual = representation @ head - truth @ task_head
    return flatten(torch.outer(residual, head), representation.T @ residual)


def orthonormal_basis(matrix: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [d, k] of the column space of a full-rank matrix [d, k]."""
    basis, _ = torch.linalg.qr(matrix)
    return basis


def principal_angle_distance(representation: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """dist(B, B*) = ||B_perp^T B*||_2 with B orthonormalized: the sine of the largest
    principal angle between the column spaces (0: the same space, 1: orthogonal ones).
    Batched over leading dimensions of B [..., d, k]; NaN for a B that is not finite (a
    diverged run), where the decomposition would fail."""
    finite = torch.isfinite(representation).all(dim=-1).all(dim=-1)
    # Stand-ins keep the decomposition defined; their distances are replaced below.
    representation = torch.where(finite[..., None, None], representation, truth)
    basis = orthonormal_basis(representation)
    outside = truth - basis @ (basis.transpose(-1, -2) @ truth)
    distance = torch.linalg.matrix_norm(outside, ord=2)
    return torch.where(finite, distance, torch.full_like(distance, math.nan))


def at_distance(truth: torch.Tensor, distance: float, direction: torch.Tensor) -> torch.Tensor:
    """A representation at principal-angle distance `distance` from B* [d, k]: every column of
    B* rotated by the angle arcsin(distance) towards an orthonormal set orthogonal to B*, taken
    from `direction` [d, k] (any full-rank matrix; needs d >= 2k)."""
    dim, rank = truth.shape
    if dim < 2 * rank:
        raise ValueError(f"a representation at a given distance needs d >= 2k, got {dim}, {rank}")
    away = direction - truth @ (truth.T @ direction)
    away = orthonormal_basis(away)
    angle = math.asin(distance)
    return math.cos(angle) * truth + math.sin(angle) * away


def head_covariance_root(rank: int, condition_number: float, dtype: torch.dtype) -> torch.Tensor:
    """Diagonal square root of the heads' covariance: eigenvalues spaced geometrically from 1
    down to 1/condition_number (the task diversity of seed 001; 1 is the most diverse)."""
    exponents = torch.linspace(0.0, 1.0, rank, dtype=torch.float64) if rank > 1 else torch.zeros(1)
    eigenvalues = condition_number ** (-exponents.to(torch.float64))
    return torch.diag(eigenvalues.sqrt()).to(dtype)
