"""The training step apart from the loop: forward_backward writes gradients into the student only, update_teacher
is the EMA, and the loss reads the networks' output dicts (iBOT masks come with the batch)."""
from __future__ import annotations

import pytest
import torch

from adclr.train import TrainConfig
from adclr.train.ibot_masks import GlobalViewMasks
from adclr.train import losses
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


def _loss_and_grads(step: TrainStep, data: dict, loss_fn: ADCLRLoss, last_layer: bool, masks=None):
    step.student.zero_grad(set_to_none=True)
    student = step.student(data["global"], data["queries"], data["local"], masks=masks, local_queries=True,
                           patch_outputs=masks is not None, last_layer=last_layer)
    with torch.no_grad():
        teacher = step.teacher(data["global"], data["queries"], patch_outputs=masks is not None, last_layer=last_layer)
    terms = loss_fn.from_outputs(student, teacher, 0.04, masks)
    terms["loss"].backward()
    grads = {name: p.grad.clone() for name, p in step.student.named_parameters() if p.grad is not None}
    return terms, grads


# the fused path against the logits path: rows in blocks of 3 with a short last one, queries on the local crops too
@pytest.mark.parametrize("variant, centering", [("dino", "center"), ("ibot", "center"), ("dino", "sinkhorn_knopp")])
def test_the_fused_last_layer_gives_the_loss_gradients_centers_and_diagnostics_of_the_logits(variant, centering,
                                                                                            monkeypatch):
    monkeypatch.setattr(losses, "SOFTMAX_BLOCK", 3 * TINY["out_dim"])
    step = make_step(variant=variant)
    step.teacher.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in step.student.state_dict().items()})
    masks = GlobalViewMasks((4, 4), (0.3, 0.5), 1.0)(2) if variant == "ibot" else None
    data = batch(num_queries=5)
    results = []
    for last_layer in (True, False):
        loss_fn = ADCLRLoss(64, lambda_q=0.7, lambda_patch=0.5 if masks else 0.0, centering=centering)
        loss_fn.cls.center.copy_(torch.randn(1, 64, generator=torch.Generator().manual_seed(3)) * 0.1)
        terms, grads = _loss_and_grads(step, data, loss_fn, last_layer, masks)
        results.append((terms, grads, loss_fn.state_dict(), loss_fn.stats()))
    (terms, grads, centers, stats), (f_terms, f_grads, f_centers, f_stats) = results
    assert f_terms["query"] > 0 and (f_terms["patch"] > 0) == (variant == "ibot")
    for name in ("loss", "cls", "query", "patch"):
        assert f_terms[name].item() == pytest.approx(terms[name].item(), rel=1e-6, abs=1e-7), name
    assert grads.keys() == f_grads.keys() and any("last_layer" in name for name in grads)
    for name, grad in grads.items():
        assert (f_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    for name, center in centers.items():
        torch.testing.assert_close(f_centers[name], center, rtol=0, atol=1e-6)
    assert stats.keys() == f_stats.keys() and {"cls_kl", "query_batch_entropy"} <= stats.keys()
    for name, value in stats.items():
        assert f_stats[name].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), name


def test_a_second_backward_through_the_fused_last_layer_raises():
    step = make_step()
    data = batch()
    student = step.student(data["global"], data["queries"], last_layer=False)
    with torch.no_grad():
        teacher = step.teacher(data["global"], data["queries"], last_layer=False)
    loss = ADCLRLoss(64).from_outputs(student, teacher, 0.04)["loss"]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_the_fused_path_names_mismatched_outputs():
    step = make_step()
    data = batch()
    with torch.no_grad():
        student = step.student(data["global"], data["queries"], last_layer=False)
        teacher = step.teacher(data["global"], data["queries"][:, :2], last_layer=False)
    with pytest.raises(ValueError, match="every 'query' view must have the same rows"):
        ADCLRLoss(64).from_outputs(student, teacher, 0.04)


def test_the_fused_path_keeps_fp32_under_bf16_autocast():
    step = make_step()
    data = batch()
    losses_by_precision = []
    for bf16 in (False, True):
        step.student.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            student = step.student(data["global"], data["queries"], data["local"], last_layer=False)
            with torch.no_grad():
                teacher = step.teacher(data["global"], data["queries"], last_layer=False)
            terms = ADCLRLoss(64).from_outputs(student, teacher, 0.04)
        terms["loss"].backward()
        assert (student["cls"][0].dtype == torch.bfloat16) == bf16  # the head ran under autocast
        assert terms["loss"].dtype == terms["query"].dtype == torch.float32
        assert step.student.head.last_layer.parametrizations.weight.original1.grad.dtype == torch.float32
        losses_by_precision.append(terms["loss"].item())
    assert losses_by_precision[1] == pytest.approx(losses_by_precision[0], rel=1e-2)
