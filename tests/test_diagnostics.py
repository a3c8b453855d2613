import math

import pytest
import torch

from adclr.train import losses
from adclr.train.diagnostics import collapse_state, entropy, read_back
from adclr.train.losses import ADCLRLoss, DINOClsLoss

K = 64


def ref_kl(p, q):
    """KL(p || q) of two distributions, float64, written out term by term."""
    return sum(float(pi) * (math.log(float(pi)) - math.log(float(qi))) for pi, qi in zip(p, q) if pi > 0)


def test_entropy_of_uniform_and_one_hot():
    assert entropy(torch.full((K,), 1.0 / K, dtype=torch.float64)).item() == pytest.approx(math.log(K))
    assert entropy(torch.nn.functional.one_hot(torch.tensor(3), K).double()).item() == 0.0


@pytest.mark.parametrize("block", [None, 2 * K])  # the loss's default; softmaxes over 2 rows and a short last block
def test_cls_loss_stats_match_an_explicit_reference(block, monkeypatch):
    if block:
        monkeypatch.setattr(losses, "SOFTMAX_BLOCK", block)
    torch.manual_seed(0)
    student = [torch.randn(5, K, dtype=torch.float64) for _ in range(3)]
    teacher = [torch.randn(5, K, dtype=torch.float64) for _ in range(2)]
    loss = DINOClsLoss(K)
    loss(student, teacher, teacher_temp=0.5)
    stats = read_back(loss.stats)
    p = [torch.softmax(t / 0.5, -1) for t in teacher]  # center is zero on the first call
    q = [torch.softmax(s / 0.1, -1) for s in student]
    kls = [ref_kl(p[a][n], q[b][n]) for a in range(2) for b in range(3) if a != b for n in range(5)]
    rows = torch.cat(p)
    mean_row_entropy = sum(-sum(float(x) * math.log(float(x)) for x in row) for row in rows) / len(rows)
    batch_mean = rows.mean(0)
    assert stats["kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-6)
    assert stats["teacher_entropy"] == pytest.approx(mean_row_entropy, rel=1e-6)
    assert stats["batch_entropy"] == pytest.approx(-sum(float(x) * math.log(float(x)) for x in batch_mean))


def test_uniform_and_one_hot_teachers_are_named():
    torch.manual_seed(0)
    student = [torch.randn(8, K) for _ in range(2)]
    loss = DINOClsLoss(K)
    loss(student, [torch.zeros(8, K)] * 2, teacher_temp=0.04)  # identical logits: uniform teacher
    stats = read_back(loss.stats)
    assert stats["teacher_entropy"] == pytest.approx(math.log(K), rel=1e-6)
    assert collapse_state(stats["teacher_entropy"], stats["batch_entropy"], K) == "uniform"
    spike = torch.zeros(8, K)
    spike[:, 7] = 10.0  # every row on prototype 7, sharpened
    loss = DINOClsLoss(K)
    loss(student, [spike, spike], teacher_temp=0.04)
    stats = read_back(loss.stats)
    assert stats["batch_entropy"] < 1e-6
    assert collapse_state(stats["teacher_entropy"], stats["batch_entropy"], K) == "one-hot"
    diverse = torch.eye(K)[:8] * 10.0  # each row on its own prototype
    loss = DINOClsLoss(K)
    loss(student, [diverse, diverse], teacher_temp=0.04)
    stats = read_back(loss.stats)
    assert stats["batch_entropy"] == pytest.approx(math.log(8), rel=1e-4)
    assert collapse_state(stats["teacher_entropy"], stats["batch_entropy"], K) is None


def test_adclr_loss_reports_stats_per_term_and_only_for_computed_terms():
    torch.manual_seed(0)
    loss = ADCLRLoss(K, lambda_patch=1.0)
    cls_s, cls_t = [torch.randn(4, K) for _ in range(2)], [torch.randn(4, K) for _ in range(2)]
    q_s, q_t = [torch.randn(4, 3, K) for _ in range(2)], [torch.randn(4, 3, K) for _ in range(2)]
    p_s, p_t = [torch.randn(4, 6, K) for _ in range(2)], [torch.randn(4, 6, K) for _ in range(2)]
    masks = [torch.rand(4, 6) < 0.5 for _ in range(2)]
    masks[0][0, 0] = True
    terms = loss(cls_s, cls_t, 0.04, q_s, q_t, p_s, p_t, masks)
    stats = read_back(loss.stats())
    assert all(isinstance(v, float) for v in stats.values())
    assert {f"{t}_{k}" for t in ("cls", "query", "patch")
            for k in ("teacher_entropy", "batch_entropy", "kl")} == set(stats)
    for name in ("cls", "query"):  # a cross-entropy is the teacher's entropy plus the KL
        assert stats[f"{name}_teacher_entropy"] + stats[f"{name}_kl"] == pytest.approx(float(terms[name]), rel=1e-5)
    no_queries = ADCLRLoss(K)
    no_queries(cls_s, cls_t, 0.04, q_s, q_t)
    no_queries(cls_s, cls_t, 0.04)
    assert not any(k.startswith("query") for k in no_queries.stats())


def test_read_back_gives_every_figure_as_a_float():
    figures = {"a": torch.tensor(1.5, dtype=torch.float64), "b": torch.tensor(2, dtype=torch.int64),
               "c": torch.tensor(0.25, requires_grad=True) * 2}
    assert read_back(figures) == {"a": 1.5, "b": 2.0, "c": 0.5}
    assert read_back({}) == {}
