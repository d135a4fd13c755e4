"""Per-agent outer optimizers against torch.optim, row by row."""

from __future__ import annotations

import pytest
import torch

from dmeta import optim
from dmeta.optim import SGD, Adam

F64 = torch.float64


def _torch_adam_rows(params, gradients_per_step, masks, **settings) -> torch.Tensor:
    """Each row stepped by its own torch.optim.Adam, only in the steps its mask allows."""
    rows = []
    for r in range(params.shape[0]):
        row = params[r].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([row], **settings)
        for gradients, mask in zip(gradients_per_step, masks, strict=True):
            if mask[r]:
                row.grad = gradients[r].clone()
                optimizer.step()
        rows.append(row.detach())
    return torch.stack(rows)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_rows_equal_torch_adam_with_per_agent_step_counts(weight_decay) -> None:
    generator = torch.Generator().manual_seed(0)
    params = torch.randn(4, 6, dtype=F64, generator=generator)
    steps = [torch.randn(4, 6, dtype=F64, generator=generator) for _ in range(5)]
    # Agent 1 sits out two rounds, agent 3 one: their bias corrections use their own counts.
    masks = [
        torch.tensor([True, True, True, True]),
        torch.tensor([True, False, True, False]),
        torch.tensor([True, False, True, True]),
        torch.tensor([True, True, True, True]),
        torch.tensor([True, True, True, True]),
    ]
    settings = {"lr": 0.1, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": weight_decay}
    adam = Adam(0.1, 0.8, 0.95, 1e-6, weight_decay)
    rows, state = params.clone(), adam.init_state(params)
    for gradients, mask in zip(steps, masks, strict=True):
        rows, state = adam.step(rows, gradients, state, mask)
    torch.testing.assert_close(state["step"], torch.tensor([5, 3, 5, 4]))
    expected = _torch_adam_rows(params, steps, masks, **settings)
    torch.testing.assert_close(rows, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_without_mask_steps_every_row_in_slices_as_torch_adam(
    monkeypatch, weight_decay
) -> None:
    """The unmasked step updates its state in place, a slice of rows at a time on the CPU
    (here 2 rows of 6 elements, then the last row alone): the masked step's bits, and torch's."""
    monkeypatch.setattr(optim, "_ELEMENTS_AT_ONCE", 12)
    generator = torch.Generator().manual_seed(1)
    params = torch.randn(5, 6, dtype=F64, generator=generator)
    steps = [torch.randn(5, 6, dtype=F64, generator=generator) for _ in range(4)]
    adam = Adam(0.1, 0.8, 0.95, 1e-6, weight_decay)
    rows, state = params.clone(), adam.init_state(params)
    masked_rows, masked_state = params.clone(), adam.init_state(params)
    everyone = torch.ones(5, dtype=torch.bool)
    for gradients in steps:
        moment = state["exp_avg"]
        rows, state = adam.step(rows, gradients, state)
        assert state["exp_avg"] is moment  # in place
        masked_rows, masked_state = adam.step(masked_rows, gradients, masked_state, everyone)
        torch.testing.assert_close(rows, masked_rows, rtol=0, atol=0)
    for name in state:
        torch.testing.assert_close(state[name], masked_state[name], rtol=0, atol=0)
    settings = {"lr": 0.1, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": weight_decay}
    expected = _torch_adam_rows(params, steps, [everyone] * len(steps), **settings)
    torch.testing.assert_close(rows, expected, rtol=1e-14, atol=1e-14)


def test_a_masked_row_keeps_its_model_and_state() -> None:
    adam = Adam(0.01, 0.9, 0.999, 1e-8)
    params = torch.randn(3, 5, dtype=F64)
    rows, state = adam.step(params, torch.randn(3, 5, dtype=F64), adam.init_state(params))
    mask = torch.tensor([False, True, False])
    after, new_state = adam.step(rows, torch.randn(3, 5, dtype=F64), state, mask)
    for name in state:
        torch.testing.assert_close(new_state[name][~mask], state[name][~mask], rtol=0, atol=0)
        assert not torch.equal(new_state[name][mask], state[name][mask])
    torch.testing.assert_close(after[~mask], rows[~mask], rtol=0, atol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_sgd_is_eq_6a(masked) -> None:
    params, gradients = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    mask = torch.tensor([True, False, True]) if masked else None
    updated, state = SGD(0.5).step(params, gradients, {}, mask)
    expected = params - 0.5 * gradients
    if masked:
        expected[1] = params[1]
    torch.testing.assert_close(updated, expected, rtol=0, atol=0)
    assert state == {}


def test_sgd_weight_decay_is_torch_sgds() -> None:
    """optimizer.weight_decay: w - lr (g + lambda w), torch.optim.SGD's coupled L2 term."""
    params, gradients = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    updated, _ = SGD(0.5, weight_decay=0.01).step(params, gradients, {})
    row = params.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([row], lr=0.5, weight_decay=0.01)
    row.grad = gradients.clone()
    optimizer.step()
    torch.testing.assert_close(updated, row.detach(), rtol=1e-15, atol=1e-15)
