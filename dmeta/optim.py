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

# Elements of a row slice that Adam updates together on the CPU (2^17: 512 KiB a float32 array,
# so a slice's parameters, gradients and moments stay in the caches together).
_ELEMENTS_AT_ONCE = 2**17


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
        """One Adam step of the rows in `mask`; all rows when None, then the moments and step
        counts are updated in place, as torch.optim.Adam does (`_step_all`)."""
        if mask is None:
            return self._step_all(params, gradients, state)
        gradients = _decayed(gradients, params, self.weight_decay)
        step = state["step"] + 1
        moments = self._moments(state["exp_avg"], state["exp_avg_sq"], gradients, in_place=False)
        updated = self._update(params, *moments, *self._corrections(step, params.dtype))
        new_state = {"step": step, "exp_avg": moments[0], "exp_avg_sq": moments[1]}
        masked = {name: _masked(mask, new_state[name], state[name]) for name in state}
        return _masked(mask, updated, params), masked

    def _step_all(
        self, params: torch.Tensor, gradients: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]:
        """Every row's step, the state in place. On the CPU a slice of rows at a time, so that
        the dozen passes over a slice find it in the caches: one pass over [K, M] from memory
        instead of a dozen (10,000 sine agents: Adam took 55 of an agent's 140 us an
        iteration). Each element gets the same operations either way."""
        corrections = self._corrections(state["step"].add_(1), params.dtype)
        updated = torch.empty_like(params)
        rows = len(params)
        if params.device.type == "cpu":
            rows = max(1, _ELEMENTS_AT_ONCE // max(1, params.shape[1:].numel()))
        for first in range(0, len(params), rows):
            part = slice(first, first + rows)
            gradient = _decayed(gradients[part], params[part], self.weight_decay)
            moments = self._moments(
                state["exp_avg"][part], state["exp_avg_sq"][part], gradient, in_place=True
            )
            corrections_part = (correction[part] for correction in corrections)
            self._update(params[part], *moments, *corrections_part, out=updated[part])
        return updated, state

    def _corrections(self, step: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Bias corrections [agents, 1] 1 - beta1^t and sqrt(1 - beta2^t) of each row's step
        count t, in float64 as torch computes them from a Python step."""
        count = step.to(torch.float64)[:, None]
        correction1 = (1 - torch.pow(self.beta1, count)).to(dtype)
        return correction1, (1 - torch.pow(self.beta2, count)).sqrt().to(dtype)

    def _moments(
        self,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        gradients: torch.Tensor,
        in_place: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """m <- beta1 m + (1 - beta1) g and v <- beta2 v + (1 - beta2) g^2, in place or new."""
        if in_place:
            exp_avg.lerp_(gradients, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(gradients, gradients, value=1 - self.beta2)
            return exp_avg, exp_avg_sq
        return (
            torch.lerp(exp_avg, gradients, 1 - self.beta1),
            torch.addcmul(exp_avg_sq * self.beta2, gradients, gradients, value=1 - self.beta2),
        )

    def _update(
        self,
        params: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        correction1: torch.Tensor,
        correction2: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """w - lr / c1 * m / (sqrt(v) / c2 + eps), torch.optim.Adam's order of operations."""
        denominator = (exp_avg_sq.sqrt() / correction2).add_(self.eps)
        return torch.sub(params, (exp_avg / denominator).mul_(self.lr / correction1), out=out)
