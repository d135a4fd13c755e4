"""Per-agent optimizers for the outer update (eq. 6a): pure tensor maths, state in rows.

Every agent owns its optimizer state: one row per agent of each moment and its own step count,
so an agent that sits out a round (not sampled, asleep) keeps its state untouched, and the state
is checkpointed and restored by agent id like the models. `step` takes an optional update mask
[agents]; rows outside the mask are returned unchanged. The Adam update follows
`torch.optim.Adam` (Kingma and Ba, Algorithm 1) term by term, with the bias corrections taken
from each row's own step count.
"""

from __future__ import annotations

from typing import Protocol

import torch

State = dict[str, torch.Tensor]


class RowOptimizer(Protocol):
    """An element-wise optimizer over rows [agents, M] with per-row state."""

    def init_state(self, params: torch.Tensor) -> State: ...

    def step(
        self,
        params: torch.Tensor,
        gradients: torch.Tensor,
        state: State,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State]: ...


def _masked(mask: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """`new` on the rows in `mask` (all rows when None), `old` elsewhere."""
    if mask is None:
        return new
    shape = (-1,) + (1,) * (new.dim() - 1)
    return torch.where(mask.reshape(shape), new, old)


def _decayed(gradients: torch.Tensor, params: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """g + lambda w: an L2 penalty (lambda/2)|w|^2 on the loss, as torch.optim's `weight_decay`
    (coupled: Adam normalises it with the gradient); g itself when lambda is 0."""
    return gradients.add(params, alpha=weight_decay) if weight_decay else gradients


class SGD:
    """w <- w - lr (g + lambda w): eq. (6a) as the theory states it (lambda = 0); no state."""

    def __init__(self, lr: float, weight_decay: float = 0.0) -> None:
        self.lr = lr
        self.weight_decay = weight_decay

    def init_state(self, params: torch.Tensor) -> State:
        return {}

    def step(
        self,
        params: torch.Tensor,
        gradients: torch.Tensor,
        state: State,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State]:
        gradients = _decayed(gradients, params, self.weight_decay)
        return _masked(mask, params - self.lr * gradients, params), state


class Adam:
    """Adam with moments `exp_avg`, `exp_avg_sq` [agents, M] and a step count `step` [agents]."""

    def __init__(
        self, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0
    ) -> None:
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.weight_decay = weight_decay

    def init_state(self, params: torch.Tensor) -> State:
        return {
            "exp_avg": torch.zeros_like(params),
            "exp_avg_sq": torch.zeros_like(params),
            "step": torch.zeros(params.shape[0], dtype=torch.int64, device=params.device),
        }

    def step(
        self,
        params: torch.Tensor,
        gradients: torch.Tensor,
        state: State,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State]:
        """One Adam step of the rows in `mask` (all rows when None: then the moments and step
        counts are updated in place, as torch.optim.Adam does, to spare temporaries)."""
        gradients = _decayed(gradients, params, self.weight_decay)
        new_state = self._advanced(state, gradients, out=None if mask is not None else state)
        # Bias corrections per row, in float64 as torch computes them from a Python step.
        count = new_state["step"].to(torch.float64)[:, None]
        correction1 = (1 - torch.pow(self.beta1, count)).to(params.dtype)
        correction2 = (1 - torch.pow(self.beta2, count)).sqrt().to(params.dtype)
        denominator = (new_state["exp_avg_sq"].sqrt() / correction2).add_(self.eps)
        step_size = self.lr / correction1
        updated = params - (new_state["exp_avg"] / denominator).mul_(step_size)
        if mask is None:
            return updated, new_state
        masked = {name: _masked(mask, new_state[name], state[name]) for name in state}
        return _masked(mask, updated, params), masked

    def _advanced(self, state: State, gradients: torch.Tensor, out: State | None) -> State:
        """The moments and step counts after one more gradient: into `out`'s tensors (in
        place) or new tensors."""
        if out is None:
            return {
                "step": state["step"] + 1,
                "exp_avg": torch.lerp(state["exp_avg"], gradients, 1 - self.beta1),
                "exp_avg_sq": torch.addcmul(
                    state["exp_avg_sq"] * self.beta2, gradients, gradients, value=1 - self.beta2
                ),
            }
        return {
            "step": out["step"].add_(1),
            "exp_avg": out["exp_avg"].lerp_(gradients, 1 - self.beta1),
            "exp_avg_sq": out["exp_avg_sq"]
            .mul_(self.beta2)
            .addcmul_(gradients, gradients, value=1 - self.beta2),
        }
