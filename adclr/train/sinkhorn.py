"""Sinkhorn-Knopp teacher (SwAV; DINOv2's ``centering: sinkhorn_knopp``): the batch is shared out evenly over the
prototypes instead of being centred by a running mean.

DINO's centre is an EMA over about ten batches: while it catches up, a small batch (64 images against 4096 prototypes
in the study) can fall onto a handful of prototypes, and the student learns to map every image there. Alternating
normalisations of the teacher's ``exp(logits / temp)`` make every row a distribution and give every prototype the same
share of the batch, so no such phase exists. With fewer prototypes than rows in the batch the rows can still be sharp;
with many more, every row is spread over at least K / rows prototypes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _all_reduce(t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """(N, K) teacher logits -> (N, K) rows (fp32 at least) that each sum to 1, balanced over the K prototypes across
    the rows of every process: ``iterations`` rounds of scaling each prototype's column to 1 / K of the mass, then each
    row to 1 / N. (SwAV first scales the whole matrix to mass 1; the first column scaling cancels any overall scale, so
    that pass and its all-reduce are left out.)

    The global maximum logit is subtracted first (it cancels in the normalisations) so that a low temperature cannot
    overflow the exponential; a prototype whose every entry underflows to 0 keeps a share of 0 instead of turning NaN.
    """
    if logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp takes (rows, prototypes) logits, got shape {tuple(logits.shape)}; "
                         "flatten the leading dims first")
    if iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs iterations >= 1, got {iterations}")
    scaled = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)) / temp
    peak = _all_reduce(scaled.max().reshape(1) if scaled.numel() else scaled.new_full((1,), -torch.inf),
                       dist.ReduceOp.MAX)
    q = (scaled - peak).exp_().T  # K x N: one column per row of the batch
    prototypes = q.shape[0]
    rows = _all_reduce(q.new_tensor([q.shape[1]]))
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(iterations):
        q /= _all_reduce(q.sum(1, keepdim=True)).clamp_min(tiny) * prototypes
        q /= q.sum(0, keepdim=True).clamp_min(tiny) * rows
    return (q * rows).T
