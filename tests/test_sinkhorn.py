"""The Sinkhorn-Knopp teacher against a float64 reference, its balance, its numerics, two processes, and the losses."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import _free_port

from adclr.errors import InvalidSettingError
from adclr.train import TrainConfig
from adclr.train.losses import ADCLRLoss, DINOClsLoss
from adclr.train.sinkhorn import sinkhorn_knopp


def reference(logits: np.ndarray, temp: float, iterations: int) -> np.ndarray:
    """SwAV's algorithm as printed: Q = exp(scores / eps)^T, normalised to total mass 1, then alternately each
    prototype's row to 1/K and each sample's column to 1/B; the columns times B are the targets."""
    q = np.exp(logits.astype(np.float64) / temp).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


@pytest.mark.parametrize("rows, k, temp", [(32, 16, 0.05), (8, 64, 0.1), (50, 50, 0.02)])
def test_equals_the_float64_reference(rows, k, temp):
    logits = F.normalize(torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)), dim=1)
    out = sinkhorn_knopp(logits, temp)
    assert out.dtype == torch.float32 and out.shape == (rows, k)
    np.testing.assert_allclose(out.double().numpy(), reference(logits.numpy(), temp, 3), rtol=1e-5, atol=1e-7)


def test_rows_are_distributions_and_the_prototypes_share_the_batch():
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) + torch.linspace(0, 3, 16)  # skewed
    out = sinkhorn_knopp(logits, 0.5, iterations=100)
    torch.testing.assert_close(out.sum(1), torch.ones(64))
    torch.testing.assert_close(out.sum(0), torch.full((16,), 64 / 16), rtol=1e-4, atol=1e-4)
    plain = torch.softmax(logits / 0.5, dim=1).sum(0)
    assert plain.max() / plain.min() > 10  # a softmax leaves the batch on a few prototypes; the balance does not


def test_a_low_temperature_neither_overflows_nor_makes_nan():
    logits = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, 0.0], [0.9, 0.8, -1.0]])
    out = sinkhorn_knopp(logits, 0.001)  # exp(2000) overflows without the max subtraction; column 3 underflows
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(1), torch.ones(3))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="flatten"):
        sinkhorn_knopp(torch.randn(2, 3, 4), 0.1)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn_knopp(torch.randn(2, 3), 0.1, iterations=0)
    with pytest.raises(InvalidSettingError, match="centering"):
        TrainConfig(centering="sinkhorn")
    with pytest.raises(ValueError, match="centering"):
        DINOClsLoss(8, centering="sinkhorn")


def test_cls_loss_balances_both_teacher_views_together_and_leaves_the_center():
    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(6, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    student = [torch.randn(6, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    loss_fn = DINOClsLoss(8, centering="sinkhorn_knopp").double()
    loss = loss_fn(student, teacher, 0.1)
    targets = torch.from_numpy(reference(torch.cat(teacher).numpy(), 0.1, 3)).chunk(2)
    pairs = [(a, b) for a in range(2) for b in range(3) if a != b]
    expected = sum(-(targets[a] * F.log_softmax(student[b] / 0.1, dim=1)).sum(1).mean() for a, b in pairs) / len(pairs)
    torch.testing.assert_close(loss, expected)
    assert torch.equal(loss_fn.center, torch.zeros(1, 8))
    assert 0 < float(loss_fn.stats["teacher_entropy"]) < np.log(8)


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        logits = torch.randn(12, 16, generator=torch.Generator().manual_seed(0))
        torch.save(sinkhorn_knopp(logits[:7] if rank == 0 else logits[7:], 0.05), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_balance_the_union_of_their_rows(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    logits = torch.randn(12, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.cat(parts), sinkhorn_knopp(logits, 0.05))


def test_adclr_loss_passes_the_centering_to_every_term():
    loss_fn = ADCLRLoss(8, lambda_patch=1.0, centering="sinkhorn_knopp")
    assert {loss_fn.cls.centering, loss_fn.query.centering, loss_fn.patch.centering} == {"sinkhorn_knopp"}
