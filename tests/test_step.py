"""The training step apart from the loop: forward_backward writes gradients into the student only, update_teacher
is the EMA, and the loss reads the networks' output dicts (iBOT masks come with the batch)."""
from __future__ import annotations

import pytest
import torch

from adclr.train import TrainConfig
from adclr.train.ibot_masks import GlobalViewMasks
from adclr.train.losses import ADCLRLoss
from adclr.train.network import build_network
from adclr.train.step import TrainStep

TINY = dict(arch="test_vit", img_size=32, model_kwargs={"patch_size": 8}, num_queries=3, out_dim=64,
            head_hidden_dim=64, head_bottleneck_dim=32, drop_path=0.0)


def make_step(**overrides) -> TrainStep:
    cfg = TrainConfig(**{**TINY, **overrides})
    torch.manual_seed(0)
    student, teacher = build_network(cfg), build_network(cfg)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss = ADCLRLoss(cfg.out_dim, lambda_patch=cfg.lambda_patch if cfg.variant == "ibot" else 0.0)
    return TrainStep(cfg, student, teacher, loss, torch.device("cpu"))


def batch(num_queries: int = 3, masks: GlobalViewMasks | None = None) -> dict:
    g = torch.Generator().manual_seed(1)
    out = {"global": [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)],
           "local": [torch.randn(2, 3, 16, 16, generator=g) for _ in range(2)],
           "queries": torch.randn(2, num_queries, 3, 8, 8, generator=g)}
    if masks is not None:
        out["masks"] = masks(2)
    return out


@pytest.mark.parametrize("variant", ["dino", "ibot"])
def test_forward_backward_fills_student_gradients_only(variant):
    step = make_step(variant=variant)
    masks = GlobalViewMasks((4, 4), (0.3, 0.5), 1.0) if variant == "ibot" else None
    terms = step.forward_backward(batch(masks=masks), teacher_temp=0.04)
    assert set(terms) >= {"loss", "cls", "query", "patch"} and torch.isfinite(terms["loss"])
    assert terms["query"] > 0 and (terms["patch"] > 0) == (variant == "ibot")
    assert step.student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in step.teacher.parameters())


def test_loss_from_outputs_equals_the_explicit_call():
    step = make_step()
    data = batch()
    with torch.no_grad():
        student = step.student(data["global"], data["queries"], data["local"])
        teacher = step.teacher(data["global"], data["queries"])
    a = ADCLRLoss(64).from_outputs(student, teacher, 0.04)
    b = ADCLRLoss(64)(student["cls"], teacher["cls"], 0.04, student["query"], teacher["query"])
    assert all(torch.equal(a[k], b[k]) for k in ("loss", "cls", "query", "patch"))


def test_update_teacher_is_the_ema():
    step = make_step()
    with torch.no_grad():
        for p in step.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in step.teacher.parameters()]
    step.update_teacher(1.0)
    assert all(torch.equal(p, q) for p, q in zip(step.teacher.parameters(), before))
    step.update_teacher(0.75)
    for t, s, old in zip(step.teacher.parameters(), step.student.parameters(), before):
        torch.testing.assert_close(t, 0.75 * old + 0.25 * s)


def test_masks_come_from_the_collate_with_the_view_grid():
    masks = GlobalViewMasks((4, 6), (0.2, 0.4), probability=0.5)(8)
    assert len(masks) == 2 and all(m.shape == (8, 24) and m.dtype == torch.bool for m in masks)
    never = GlobalViewMasks((4, 6), (0.2, 0.4), probability=0.0)(8)
    assert not any(m.any() for m in never)


def test_uint8_views_are_normalised_on_the_device_like_float_views_normalised_by_hand():
    g = torch.Generator().manual_seed(2)
    raw = {"global": [torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(2)],
           "local": [torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8) for _ in range(2)],
           "queries": torch.randint(0, 256, (2, 3, 3, 8, 8), generator=g, dtype=torch.uint8)}

    def by_hand(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - 0.5) / 0.5  # timm's test_vit: mean = std = 0.5 per channel

    floats = {k: [by_hand(t) for t in v] if isinstance(v, list) else by_hand(v) for k, v in raw.items()}
    from_uint8 = make_step().forward_backward(raw, teacher_temp=0.04)
    from_float = make_step().forward_backward(floats, teacher_temp=0.04)
    assert all(torch.allclose(from_uint8[k], from_float[k], atol=1e-5) for k in ("loss", "cls", "query"))
