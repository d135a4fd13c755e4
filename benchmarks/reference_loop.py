"""Dif-MAML on the sine task written the way it is usually written without dmeta.

The baseline of benchmarks/bench_sine.py: one `nn.Module` copy and one Adam per agent, a
Python loop over agents and over each agent's tasks, second-order meta-gradients from
`torch.autograd.grad(create_graph=True)`, and the combination as a loop over each agent's
neighbours. It computes the same meta-gradients as dmeta (checked by the benchmark).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call


class ReferenceDifMAML:
    """K agents, each an `nn.Sequential` with its own Adam, combined through A (a[l, k])."""

    def __init__(
        self,
        modules: list[nn.Module],
        matrix: np.ndarray,
        inner_lr: float,
        outer_lr: float,
    ) -> None:
        self.modules = modules
        self.matrix = matrix
        self.inner_lr = inner_lr
        self.optimizers = [torch.optim.Adam(m.parameters(), lr=outer_lr) for m in modules]

    def meta_gradient(
        self, module: nn.Module, support_x, support_y, query_x, query_y
    ) -> list[torch.Tensor]:
        """Mean over tasks of grad Q(w - alpha grad Q(w; X_in); X_o), one task at a time."""
        names = [name for name, _ in module.named_parameters()]
        weights = list(module.parameters())
        total = [torch.zeros_like(w) for w in weights]
        for t in range(len(support_x)):
            inner = ((module(support_x[t]) - support_y[t]) ** 2).mean()
            grads = torch.autograd.grad(inner, weights, create_graph=True)
            adapted = {
                name: w - self.inner_lr * g
                for name, w, g in zip(names, weights, grads, strict=True)
            }
            outer = ((functional_call(module, adapted, (query_x[t],)) - query_y[t]) ** 2).mean()
            for acc, g in zip(total, torch.autograd.grad(outer, weights), strict=True):
                acc += g / len(support_x)
        return total

    def step(self, tasks) -> None:
        """One iteration of Algorithm 1: adapt every agent, then combine."""
        for k, (module, optimizer) in enumerate(zip(self.modules, self.optimizers, strict=True)):
            gradients = self.meta_gradient(module, *(part[k] for part in tasks))
            for w, g in zip(module.parameters(), gradients, strict=True):
                w.grad = g
            optimizer.step()
        with torch.no_grad():
            states = [[w.detach().clone() for w in m.parameters()] for m in self.modules]
            for k, module in enumerate(self.modules):
                neighbours = np.flatnonzero(self.matrix[:, k])
                for j, w in enumerate(module.parameters()):
                    w.copy_(sum(self.matrix[n, k] * states[n][j] for n in neighbours))
