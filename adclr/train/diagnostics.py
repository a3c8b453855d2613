"""Collapse diagnostics for self-distillation: is the teacher uniform, one-hot, or teaching something?

DINO fails in two ways (Caron et al. 2021, section 5.3): a *uniform* teacher (every row's entropy near ln K, the loss
sits at ln K and carries no signal) and a *one-hot* teacher (every row on the same prototype, the batch-mean
distribution collapses). Three numbers per loss term tell them apart: the teacher rows' mean entropy, the entropy of
the batch-mean teacher distribution, and the KL from teacher to student (the part of the loss the student can still
remove). All are in nats; divide by ln K to compare runs with different `out_dim`.
"""
from __future__ import annotations

import math

import torch

#: A teacher whose mean row entropy is above this fraction of ln K is called uniform.
UNIFORM_FRACTION = 0.95
#: A batch-mean teacher distribution with less entropy than this (nats) sits on about one prototype: one-hot.
ONE_HOT_NATS = math.log(2.0)

REMEDIES = ("lower the teacher temperature or shorten its warm-up (--warmup-teacher-temp, --teacher-temp, "
            "--warmup-teacher-temp-epochs), lower --momentum-teacher, use fewer prototypes (--out-dim), or change "
            "--lr; the `small` preset (--preset small) is a recipe that learns on a few thousand images")


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each distribution along the last dim (0 * log 0 counted as 0)."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1)


@torch.no_grad()
def teacher_stats(teacher_probs: list[torch.Tensor], cross_entropy: torch.Tensor) -> dict[str, float]:
    """Mean row entropy, batch-mean entropy and teacher->student KL of one loss term.

    `cross_entropy` is the term's value, the mean over rows and view pairs of -sum p log q; every teacher view is
    paired with the same number of student views, so its KL part is that minus the teacher's mean row entropy.
    """
    rows = torch.cat([p.detach().reshape(-1, p.shape[-1]).float() for p in teacher_probs])
    if rows.shape[0] == 0:
        return {}
    mean_entropy = entropy(rows).mean()
    return {"teacher_entropy": float(mean_entropy), "batch_entropy": float(entropy(rows.mean(0))),
            "kl": float(cross_entropy.detach().float() - mean_entropy)}


def collapse_state(teacher_entropy: float, batch_entropy: float, out_dim: int) -> str | None:
    """'uniform', 'one-hot' or None for a teacher that is neither."""
    if teacher_entropy > UNIFORM_FRACTION * math.log(out_dim):
        return "uniform"
    if batch_entropy < ONE_HOT_NATS:
        return "one-hot"
    return None
