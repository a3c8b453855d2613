"""Collapse diagnostics for self-distillation: is the teacher uniform, one-hot, or teaching something?

DINO fails in two ways (Caron et al. 2021, section 5.3): a *uniform* teacher (every row's entropy near ln K, the loss
sits at ln K and carries no signal) and a *one-hot* teacher (every row on the same prototype, the batch-mean
distribution collapses). Three numbers per loss term tell them apart: the teacher rows' mean entropy, the entropy of
the batch-mean teacher distribution, and the KL from teacher to student (the part of the loss the student can still
remove). All are in nats; divide by ln K to compare runs with different `out_dim`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

#: A teacher whose mean row entropy is above this fraction of ln K is called uniform.
UNIFORM_FRACTION = 0.95
#: A batch-mean teacher distribution with less entropy than this (nats) sits on about one prototype: one-hot.
ONE_HOT_NATS = math.log(2.0)

REMEDIES = ("lower the teacher temperature or shorten its warm-up (--warmup-teacher-temp, --teacher-temp, "
            "--warmup-teacher-temp-epochs), lower --momentum-teacher, use fewer prototypes (--out-dim), balance "
            "small batches over the prototypes (--centering sinkhorn_knopp), or change --lr; on a few thousand images "
            "start from the `small` preset (--preset small)")


#: Elements per partial dot product in `dot`.
DOT_CHUNK = 2 ** 18


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of ``a * b`` over all elements without the full-size product: dot products of 2^18 elements, summed.

    One fp32 dot over a loss term's ~10M elements (query rows x 65536 prototypes) keeps too few partial sums on CPU:
    measured up to 2e-5 off, relative to float64. In chunks the query loss is within 1e-6 of float64, no worse than
    with ``(a * b).sum()``, at a quarter of that's time.
    """
    chunks = zip(a.reshape(-1).split(DOT_CHUNK), b.reshape(-1).split(DOT_CHUNK))
    return torch.stack([torch.dot(x, y) for x, y in chunks]).sum()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each distribution along the last dim (0 * log 0 counted as 0)."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1)


@torch.no_grad()
def teacher_stats(teacher_probs: Sequence[torch.Tensor], entropy_sum: torch.Tensor,
                  cross_entropy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean row entropy, batch-mean entropy and teacher->student KL of one loss term, as 0-dim tensors.

    `entropy_sum` is the sum of the teacher rows' entropies (the loss computes it with the probabilities, from the
    logits). `cross_entropy` is the term's value, the mean over rows and view pairs of -sum p log q; every teacher view
    is paired with the same number of student views, so its KL part is that minus the teacher's mean row entropy. The
    figures stay on the device until `read_back`.
    """
    rows = sum(p.numel() // p.shape[-1] for p in teacher_probs)
    if rows == 0:
        return {}
    probs_sum = sum(p.reshape(-1, p.shape[-1]).sum(0, dtype=torch.float32) for p in teacher_probs)
    return stats_from_sums(rows, entropy_sum, probs_sum, cross_entropy)


@torch.no_grad()
def stats_from_sums(rows: int, entropy_sum: torch.Tensor, probs_sum: torch.Tensor, cross_entropy: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """`teacher_stats` from the sums over the teacher's rows of their entropies and of their probabilities, for a
    loss that never holds all rows at once."""
    mean_entropy = entropy_sum.float() / rows
    return {"teacher_entropy": mean_entropy, "batch_entropy": entropy(probs_sum.float() / rows),
            "kl": cross_entropy.detach().float() - mean_entropy}


def read_back(figures: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors -> floats in one device-to-host copy (one host sync a step instead of one per figure)."""
    if not figures:
        return {}
    return dict(zip(figures, torch.stack([v.detach().float() for v in figures.values()]).tolist()))


def collapse_state(teacher_entropy: float, batch_entropy: float, out_dim: int) -> str | None:
    """'uniform', 'one-hot' or None for a teacher that is neither."""
    if teacher_entropy > UNIFORM_FRACTION * math.log(out_dim):
        return "uniform"
    if batch_entropy < ONE_HOT_NATS:
        return "one-hot"
    return None
