import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import _free_port

from adclr.train import losses
from adclr.train.losses import ADCLRLoss, DINOClsLoss, IBOTPatchLoss, QueryLoss

K = 32
M = 0.9  # center momentum
S_T = 0.1  # student temperature


# ---- independent, plainly written references (float64, explicit softmax / log, center as a plain tensor) ----


def ref_softmax(x):
    e = torch.exp(x)
    return e / e.sum(-1, keepdim=True)


def ref_ce(teacher_row, student_row, center, t_temp):
    """Cross-entropy of one teacher vector vs one student vector."""
    q = ref_softmax((teacher_row - center) / t_temp)
    log_p = torch.log(ref_softmax(student_row / S_T))
    return -(q * log_p).sum()


def ref_dino(student, teacher, center, t_temp):
    total, pairs = 0.0, 0
    for a in range(len(teacher)):
        for b in range(len(student)):
            if a == b:
                continue
            batch = teacher[a].shape[0]
            total = total + sum(ref_ce(teacher[a][n], student[b][n], center, t_temp) for n in range(batch)) / batch
            pairs += 1
    return total / pairs


def ref_query(student, teacher, center, t_temp):
    batch, r = teacher[0].shape[:2]
    total, terms = 0.0, 0
    for i in range(r):
        for a in range(len(teacher)):
            for b in range(len(student)):
                if a == b:
                    continue
                for n in range(batch):
                    total = total + ref_ce(teacher[a][n, i], student[b][n, i], center, t_temp)
                    terms += 1
    return total / terms


def ref_patch(student, teacher, masks, center, t_temp):
    view_losses = []
    for s, t, m in zip(student, teacher, masks):
        image_losses = []
        for n in range(s.shape[0]):
            positions = [j for j in range(s.shape[1]) if m[n, j]]
            if not positions:
                image_losses.append(0.0)
                continue
            ces = [ref_ce(t[n, j], s[n, j], center, t_temp) for j in positions]
            image_losses.append(sum(ces) / len(ces))
        view_losses.append(sum(image_losses) / len(image_losses))
    return sum(view_losses) / len(view_losses)


def ref_center(center, teacher_outputs):
    rows = torch.cat([t.reshape(-1, K) for t in teacher_outputs])
    return center * M + rows.mean(0, keepdim=True) * (1 - M)


def randn(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_()


# ---- tests ----


def test_dino_cls_loss_matches_reference_over_three_calls():
    torch.manual_seed(0)
    loss_fn = DINOClsLoss(K).double()
    center = torch.zeros(1, K, dtype=torch.float64)
    for step, t_temp in enumerate([0.04, 0.05, 0.07]):
        student = [randn(4, K) for _ in range(5)]  # 2 global + 3 local crops
        teacher = [randn(4, K, scale=0.3) + step for _ in range(2)]
        loss = loss_fn(student, teacher, t_temp)
        expected = ref_dino(student, teacher, center, t_temp)
        assert abs(loss.item() - expected.item()) < 1e-6
        center = ref_center(center, teacher)
        torch.testing.assert_close(loss_fn.center, center, atol=1e-12, rtol=0)
    assert center.abs().sum() > 0


def test_query_loss_matches_loop_reference():
    torch.manual_seed(1)
    loss_fn = QueryLoss(K).double()
    loss_fn.center.copy_(torch.randn(1, K, dtype=torch.float64) * 0.1)
    center = loss_fn.center.clone()
    student = [randn(3, 4, K) for _ in range(2)]
    teacher = [randn(3, 4, K) for _ in range(2)]
    loss = loss_fn(student, teacher, 0.06)
    assert abs(loss.item() - ref_query(student, teacher, center, 0.06).item()) < 1e-6
    torch.testing.assert_close(loss_fn.center, ref_center(center, teacher), atol=1e-12, rtol=0)


def test_query_loss_with_queries_on_local_crops_too():
    torch.manual_seed(2)
    loss_fn = QueryLoss(K).double()
    student = [randn(2, 3, K) for _ in range(4)]
    teacher = [randn(2, 3, K) for _ in range(2)]
    loss = loss_fn(student, teacher, 0.04)
    assert abs(loss.item() - ref_query(student, teacher, torch.zeros(1, K, dtype=torch.float64), 0.04).item()) < 1e-6


def plain_cross_view_ce(student, teacher, center, t_temp):
    """The per-pair formula, float64: mean over pairs a != b of the rows' mean of -q_a . log_softmax(s_b / T_s)."""
    q = [torch.softmax((t.double() - center) / t_temp, -1) for t in teacher]
    log_p = [torch.log_softmax(s.double() / S_T, -1) for s in student]
    pairs = [-(q[a] * log_p[b]).sum(-1).mean() for a in range(len(q)) for b in range(len(log_p)) if a != b]
    return sum(pairs) / len(pairs)


# DINO's prototype count; queries on 3 local crops too; softmaxes over blocks of 3 rows and a short last block
@pytest.mark.parametrize("views, k, block", [(2, 65536, None), (5, 256, None), (2, 65536, 3 * 65536)])
def test_query_loss_and_its_gradient_in_fp32_match_the_per_pair_formula(views, k, block, monkeypatch):
    if block:
        monkeypatch.setattr(losses, "SOFTMAX_BLOCK", block)
    torch.manual_seed(10)
    loss_fn = QueryLoss(k)
    loss_fn.center.copy_(torch.randn(1, k) * 0.05)
    center = loss_fn.center.double().clone()
    # cosine-sized logits, as the head gives; the teacher sharp enough that some probabilities underflow
    student = [(torch.randn(2, 10, k) * 0.3).requires_grad_() for _ in range(views)]
    teacher = [torch.randn(2, 10, k) * 0.3 for _ in range(2)]
    reference_student = [s.detach().double().requires_grad_() for s in student]
    loss = loss_fn(student, teacher, 0.04)
    expected = plain_cross_view_ce(reference_student, teacher, center, 0.04)
    # each row's fp32 sums run over k positive terms: blocked summation keeps each within ~log2(k) eps of the exact
    # sum, whichever way the threads split it (seen: 0.2-1.24 ppm over 1-8 threads at k = 65536; the bound 3.8 ppm)
    tolerance = 2 * math.log2(k) * torch.finfo(torch.float32).eps
    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) < tolerance * abs(expected.item())
    loss.backward()
    expected.backward()
    for got, ref in zip(student, reference_student):
        assert (got.grad.double() - ref.grad).abs().max() < 1e-5 * ref.grad.abs().max()


def test_query_loss_on_bf16_logits_as_under_autocast():
    torch.manual_seed(11)
    student = [(torch.randn(2, 3, K) * 0.3).bfloat16().requires_grad_() for _ in range(2)]
    teacher = [(torch.randn(2, 3, K) * 0.3).bfloat16() for _ in range(2)]
    loss = QueryLoss(K)(student, teacher, 0.04)
    assert loss.dtype == torch.float32  # softmaxes in fp32, as autocast runs them
    # the division by the temperature happens in bf16 (as it does in the network's dtype), the softmax in fp32
    reference_student = [(s.detach() / S_T).double().mul(S_T).requires_grad_() for s in student]
    expected = plain_cross_view_ce(reference_student, teacher, torch.zeros(1, K, dtype=torch.float64), 0.04)
    assert abs(loss.item() - expected.item()) < 1e-5
    loss.backward()
    expected.backward()
    for got, ref in zip(student, reference_student):
        assert got.grad.dtype == torch.bfloat16
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-2 * ref.grad.abs().max().item(), rtol=0)


def test_query_loss_with_zero_queries_is_a_differentiable_zero_and_keeps_center():
    loss_fn = QueryLoss(K)
    student = [torch.randn(3, 0, K, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(3, 0, K) for _ in range(2)]
    loss = loss_fn(student, teacher, 0.04)
    assert loss.dtype == torch.float32 and loss.shape == () and loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert student[0].grad is not None
    assert torch.equal(loss_fn.center, torch.zeros(1, K))


def test_adclr_loss_with_zero_queries_equals_plain_dino():
    torch.manual_seed(3)
    student = [randn(4, K) for _ in range(4)]
    teacher = [randn(4, K) for _ in range(2)]
    student_q = [randn(4, 0, K) for _ in range(2)]
    teacher_q = [randn(4, 0, K) for _ in range(2)]
    out = ADCLRLoss(K).double()(student, teacher, 0.04, student_q, teacher_q)
    plain = DINOClsLoss(K).double()(student, teacher, 0.04)
    assert torch.equal(out["loss"], plain) and torch.equal(out["cls"], plain)
    assert abs(out["loss"].item()
               - ref_dino(student, teacher, torch.zeros(1, K, dtype=torch.float64), 0.04).item()) < 1e-12
    assert out["query"].item() == 0.0 and out["patch"].item() == 0.0
    # Without any query inputs as well.
    assert torch.equal(ADCLRLoss(K).double()(student, teacher, 0.04)["loss"], plain)


def test_adclr_loss_total_and_separate_centers():
    torch.manual_seed(4)
    loss_fn = ADCLRLoss(K, lambda_q=0.5).double()
    student = [randn(3, K) for _ in range(3)]
    teacher = [randn(3, K) for _ in range(2)]
    student_q = [randn(3, 5, K) for _ in range(2)]
    teacher_q = [randn(3, 5, K) + 2.0 for _ in range(2)]
    out = loss_fn(student, teacher, 0.04, student_q, teacher_q, query_teacher_temp=0.07)
    zero = torch.zeros(1, K, dtype=torch.float64)
    assert abs(out["cls"].item() - ref_dino(student, teacher, zero, 0.04).item()) < 1e-6
    assert abs(out["query"].item() - ref_query(student_q, teacher_q, zero, 0.07).item()) < 1e-6
    torch.testing.assert_close(out["loss"], out["cls"] + 0.5 * out["query"])
    torch.testing.assert_close(loss_fn.cls.center, ref_center(zero, teacher), atol=1e-12, rtol=0)
    torch.testing.assert_close(loss_fn.query.center, ref_center(zero, teacher_q), atol=1e-12, rtol=0)
    assert not torch.allclose(loss_fn.cls.center, loss_fn.query.center)
    assert torch.equal(loss_fn.patch.center, zero)  # untouched without patch inputs
    state = loss_fn.state_dict()
    assert {"cls.center", "query.center", "patch.center"} <= set(state)
    restored = ADCLRLoss(K).double()
    restored.load_state_dict(state)
    assert torch.equal(restored.query.center, loss_fn.query.center)


def _patch_inputs(seed):
    torch.manual_seed(seed)
    student = [randn(3, 6, K) for _ in range(2)]
    teacher = [randn(3, 6, K) for _ in range(2)]
    masks = [torch.rand(3, 6) < 0.5 for _ in range(2)]
    masks[0][1] = False  # an image with no masked patch
    masks[1][2] = True
    masks[1][0] = torch.tensor([True, False, False, False, False, False])
    return student, teacher, masks


def test_ibot_patch_loss_matches_loop_reference_with_an_empty_mask():
    student, teacher, masks = _patch_inputs(5)
    loss_fn = IBOTPatchLoss(K).double()
    loss_fn.center.copy_(torch.randn(1, K, dtype=torch.float64) * 0.1)
    center = loss_fn.center.clone()
    loss = loss_fn(student, teacher, masks, 0.05)
    assert torch.isfinite(loss)
    assert abs(loss.item() - ref_patch(student, teacher, masks, center, 0.05).item()) < 1e-6
    torch.testing.assert_close(loss_fn.center, ref_center(center, teacher), atol=1e-12, rtol=0)


def test_ibot_patch_loss_all_masks_empty_is_zero_not_nan():
    student, teacher, _ = _patch_inputs(6)
    masks = [torch.zeros(3, 6, dtype=torch.bool) for _ in range(2)]
    loss = IBOTPatchLoss(K).double()(student, teacher, masks, 0.05)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student[0].grad, torch.zeros_like(student[0]))


def test_adclr_loss_ibot_variant_adds_patch_term():
    student, teacher, masks = _patch_inputs(7)
    cls_s = [randn(3, K) for _ in range(2)]
    cls_t = [randn(3, K) for _ in range(2)]
    out = ADCLRLoss(K, lambda_q=1.0, lambda_patch=2.0).double()(
        cls_s, cls_t, 0.04, student_patches=student, teacher_patches=teacher, masks=masks, patch_teacher_temp=0.06
    )
    zero = torch.zeros(1, K, dtype=torch.float64)
    assert abs(out["patch"].item() - ref_patch(student, teacher, masks, zero, 0.06).item()) < 1e-6
    torch.testing.assert_close(out["loss"], out["cls"] + 2.0 * out["patch"])
    with pytest.raises(ValueError, match="lambda_patch"):
        ADCLRLoss(K, lambda_patch=1.0)(cls_s, cls_t, 0.04)


def test_gradients_reach_student_outputs_only():
    student, teacher, masks = _patch_inputs(8)
    cls_s = [randn(3, K) for _ in range(3)]
    cls_t = [randn(3, K) for _ in range(2)]
    q_s = [randn(3, 4, K) for _ in range(2)]
    q_t = [randn(3, 4, K) for _ in range(2)]
    loss_fn = ADCLRLoss(K, lambda_patch=1.0).double()
    loss_fn(cls_s, cls_t, 0.04, q_s, q_t, student, teacher, masks)["loss"].backward()
    for t in [*cls_s, *q_s]:
        assert t.grad is not None and t.grad.abs().sum() > 0
    for t in [*cls_t, *q_t, *teacher]:
        assert t.grad is None
    assert not any(b.requires_grad for b in loss_fn.buffers())
    # Student patch grads only at masked positions.
    for s, m in zip(student, masks):
        assert torch.equal(s.grad.abs().sum(-1) > 0, m)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="out_dim=32"):
        DINOClsLoss(K)([torch.randn(2, 16)] * 2, [torch.randn(2, 16)] * 2, 0.04)
    with pytest.raises(ValueError, match="cross-view pair"):
        DINOClsLoss(K)([torch.randn(2, K)], [torch.randn(2, K)], 0.04)
    with pytest.raises(ValueError, match="same \\(B, r\\)"):
        QueryLoss(K)([torch.randn(2, 3, K)] * 2, [torch.randn(2, 4, K)] * 2, 0.04)
    with pytest.raises(ValueError, match="bool"):
        IBOTPatchLoss(K)([torch.randn(2, 3, K)], [torch.randn(2, 3, K)], [torch.ones(2, 3)], 0.04)
    with pytest.raises(ValueError, match="both"):
        ADCLRLoss(K)([torch.randn(2, K)] * 2, [torch.randn(2, K)] * 2, 0.04, student_q=[torch.randn(2, 1, K)] * 2)


# ---- distributed: centers are the EMA of the mean over the union of all ranks' batches ----

BATCH = {0: 3, 1: 5}  # unequal on purpose: the center must still be the union mean


def _rank_inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    b = BATCH[rank]
    cls_t = [torch.randn(b, K, generator=g) + rank for _ in range(2)]
    cls_s = [torch.randn(b, K, generator=g) for _ in range(3)]
    q_t = [torch.randn(b, 4, K, generator=g) - rank for _ in range(2)]
    q_s = [torch.randn(b, 4, K, generator=g) for _ in range(2)]
    p_t = [torch.randn(b, 6, K, generator=g) * (rank + 1) for _ in range(2)]
    p_s = [torch.randn(b, 6, K, generator=g) for _ in range(2)]
    masks = [torch.rand(b, 6, generator=g) < 0.5 for _ in range(2)]
    return cls_s, cls_t, q_s, q_t, p_s, p_t, masks


def _worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        loss_fn = ADCLRLoss(K, lambda_patch=1.0)
        cls_s, cls_t, q_s, q_t, p_s, p_t, masks = _rank_inputs(rank)
        loss_fn(cls_s, cls_t, 0.04, q_s, q_t, p_s, p_t, masks)
        torch.save(loss_fn.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_centers_are_all_reduced_over_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    inputs = [_rank_inputs(r) for r in range(2)]
    zero = torch.zeros(1, K)
    teacher_index = {"cls.center": 1, "query.center": 3, "patch.center": 5}
    for name, i in teacher_index.items():
        union = ref_center(zero, inputs[0][i] + inputs[1][i])
        rank0_alone = ref_center(zero, inputs[0][i])
        assert torch.equal(states[0][name], states[1][name]), name
        torch.testing.assert_close(states[0][name], union, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(states[0][name], rank0_alone, atol=1e-3), name


def test_tf32_matmuls_are_allowed_only_inside_and_the_setting_comes_back_even_after_an_error():
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        with losses._tf32_matmuls(True):
            assert matmul.allow_tf32
        assert not matmul.allow_tf32
        with pytest.raises(ValueError), losses._tf32_matmuls(True):
            raise ValueError("inside")
        assert not matmul.allow_tf32
        matmul.allow_tf32 = True  # a caller who allowed TF32 keeps it
        with losses._tf32_matmuls(False):
            assert matmul.allow_tf32
        assert matmul.allow_tf32
    finally:
        matmul.allow_tf32 = before
