"""Solver: norm parameters without decay, warm-up/decay LR values, linear scaling, clipping."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hassod.train.solver import (
    WarmupSchedule, build_optimizer, build_scheduler, clip_gradients, param_groups, scaled_lr,
)


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False),
                         nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8, 4),
                         nn.LayerNorm(4))


def test_no_weight_decay_on_norm_parameters():
    model = _model()
    frozen = model[0].bias
    frozen.requires_grad_(False)
    groups = {g["name"]: g for g in param_groups(model, 5e-5)}
    norm_ids = {id(p) for g in (model[1], model[4], model[7]) for p in g.parameters()}
    assert {id(p) for p in groups["norm"]["params"]} == norm_ids
    assert groups["norm"]["weight_decay"] == 0.0
    expected_default = {id(model[0].weight), id(model[3].weight), id(model[6].weight), id(model[6].bias)}
    assert {id(p) for p in groups["default"]["params"]} == expected_default  # frozen bias left out
    assert groups["default"]["weight_decay"] == 5e-5
    optimizer = build_optimizer(model, lr=0.02)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-5, 0.0]
    assert all(g["momentum"] == 0.9 and g["lr"] == 0.02 for g in optimizer.param_groups)


def test_linear_scaling_rule():
    assert scaled_lr(16) == pytest.approx(0.01)
    assert scaled_lr(4) == pytest.approx(0.0025)
    assert scaled_lr(64) == pytest.approx(0.04)


def test_warmup_then_cosine_values():
    schedule = WarmupSchedule(iterations=1100, warmup_iters=100, warmup_factor=0.001, decay="cosine")
    assert schedule(0) == pytest.approx(0.001)
    assert schedule(50) == pytest.approx(0.001 * 0.5 + 0.5)
    assert schedule(99) == pytest.approx(0.001 * 0.01 + 0.99)
    assert schedule(100) == pytest.approx(1.0)
    assert schedule(600) == pytest.approx(0.5)  # half-way through the decay
    assert schedule(350) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert schedule(1100) == pytest.approx(0.0)


def test_step_decay_values():
    schedule = WarmupSchedule(iterations=1000, warmup_iters=10, decay="step", steps=(0.5, 0.9), gamma=0.1)
    assert schedule(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert schedule(499) == pytest.approx(1.0)
    assert schedule(500) == pytest.approx(0.1)
    assert schedule(900) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unknown LR decay"):
        WarmupSchedule(10, decay="linear")


def test_scheduler_sets_the_optimizer_lr_each_iteration_and_saves():
    model = _model()
    optimizer = build_optimizer(model, lr=0.01)
    schedule = WarmupSchedule(iterations=40, warmup_iters=10, warmup_factor=0.1)
    scheduler = build_scheduler(optimizer, schedule)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(0.001)
    assert seen[5] == pytest.approx(0.01 * (0.1 * 0.5 + 0.5))
    assert seen[10] == pytest.approx(0.01)
    assert optimizer.param_groups[1]["lr"] == optimizer.param_groups[0]["lr"]
    # A rebuilt scheduler loaded from the state continues at the same point.
    state = scheduler.state_dict()
    optimizer2 = build_optimizer(model, lr=0.01)
    scheduler2 = build_scheduler(optimizer2, WarmupSchedule(iterations=40, warmup_iters=10, warmup_factor=0.1))
    scheduler2.load_state_dict(state)
    optimizer2.load_state_dict(optimizer.state_dict())
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    scheduler.step()
    scheduler2.step()
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_gradient_clipping_by_global_norm():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)
    a.grad, b.grad = torch.full((3,), 4.0), torch.full((4,), 3.0)  # norm sqrt(48 + 36)
    before = clip_gradients([a, b], max_norm=1.0)
    assert before == pytest.approx(math.sqrt(84))
    total = torch.linalg.vector_norm(torch.cat([a.grad, b.grad]))
    assert float(total) == pytest.approx(1.0, rel=1e-4)
    assert float(a.grad[0] / b.grad[0]) == pytest.approx(4 / 3)  # direction kept
    c = torch.zeros(2, requires_grad=True)
    c.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients([c], max_norm=0) == pytest.approx(5.0)
    assert torch.equal(c.grad, torch.tensor([3.0, 4.0]))
