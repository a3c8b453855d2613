"""Per-iteration schedules as plain arrays (DINO style): resuming at step s is just indexing at s."""
from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int, warmup_epochs: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from `warmup_start` to `base`, then a half cosine from `base` to `final`."""
    total = epochs * iters_per_epoch
    warmup_iters = min(warmup_epochs * iters_per_epoch, total)
    warmup = np.linspace(warmup_start, base, warmup_iters, endpoint=False)
    steps = np.arange(total - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int,
                          iters_per_epoch: int) -> np.ndarray:
    """Linear warm-up of the teacher temperature over `warmup_epochs`, then constant."""
    warmup_iters = min(warmup_epochs, epochs) * iters_per_epoch
    warmup = np.linspace(warmup_temp, temp, warmup_epochs * iters_per_epoch)[:warmup_iters]
    return np.concatenate([warmup, np.full(epochs * iters_per_epoch - warmup_iters, temp)])
