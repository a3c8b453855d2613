"""DINOv2's KoLeo term: equal to a plain float64 nearest-neighbour reference, differentiable, and added by the step."""
from __future__ import annotations

import math

import pytest
import torch

from adclr.errors import InvalidSettingError
from adclr.train import TrainConfig
from adclr.train.koleo import koleo_loss, koleo_over_views
from test_step import batch, make_step


def reference(x: torch.Tensor) -> float:
    """-mean log(distance to the nearest other point) after L2 normalisation, by explicit loops in float64."""
    rows = [r / r.norm() for r in x.double()]
    total = 0.0
    for i, a in enumerate(rows):
        total += math.log(min(float((a - b).norm()) for j, b in enumerate(rows) if j != i))
    return -total / len(rows)


def test_koleo_equals_the_nearest_neighbour_reference():
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(0))
    assert koleo_loss(x).item() == pytest.approx(reference(x), abs=1e-5)
    views = [x, 3 * x.flip(0) + 0.1]
    assert koleo_over_views(views).item() == pytest.approx(reference(views[0]) + reference(views[1]), abs=1e-5)


def test_koleo_pushes_the_closest_pair_apart():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    koleo_loss(x).backward()
    # rows 0 and 1 are each other's neighbour: descending the loss moves them apart along the circle
    step = x - 0.01 * x.grad
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(step[0:1], step[1:2]) < cosine(x[0:1], x[1:2])


def test_koleo_needs_two_rows():
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 4))


def test_step_adds_the_weighted_koleo_term_and_refuses_a_negative_weight():
    data = batch()
    plain = make_step().forward_backward(data, teacher_temp=0.04)
    with_koleo = make_step(koleo_weight=0.5).forward_backward(data, teacher_temp=0.04)
    assert "koleo" not in plain and with_koleo["koleo"] > 0
    assert torch.allclose(with_koleo["loss"], plain["loss"] + 0.5 * with_koleo["koleo"], atol=1e-6)
    with pytest.raises(InvalidSettingError, match="koleo_weight"):
        TrainConfig(koleo_weight=-0.1)
