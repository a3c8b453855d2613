"""KoLeo regulariser (DINOv2): spread the student's [CLS] embeddings over the sphere within a batch.

The Kozachenko-Leonenko entropy estimator says a set of points is spread out when each point's distance to its
nearest neighbour is large; ``-mean(log d_nn)`` on L2-normalised embeddings pushes every image away from the one it
is closest to. Self-distillation alone lets the backbone's [CLS] features drift together on small data (the centred
teacher then flattens to uniform, see `adclr.train.config.PRESETS`); this term keeps images apart while the DINO
terms pull the views of each image together. Computed per process on the local batch, as DINOv2 does.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def koleo_loss(embeddings: Tensor, eps: float = 1e-8) -> Tensor:
    """``-mean_i log ||x_i - x_nn(i)||`` over the rows of ``embeddings`` (B, C), each L2-normalised first.

    The nearest neighbour is chosen without gradient (largest cosine among the other rows); the distance is
    differentiated. Needs at least two rows.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"koleo_loss needs (B, C) embeddings with B >= 2, got shape {tuple(embeddings.shape)}; "
                         "use a batch of at least two images per process or set koleo_weight=0.")
    x = F.normalize(embeddings.float(), dim=-1, eps=eps)
    with torch.no_grad():
        cosine = x @ x.T
        cosine.fill_diagonal_(-2.0)  # below any real cosine: a row is never its own neighbour
        neighbour = cosine.argmax(dim=1)
    distance = F.pairwise_distance(x, x[neighbour], eps=eps)
    return -torch.log(distance + eps).mean()


def koleo_over_views(per_view: Sequence[Tensor]) -> Tensor:
    """Sum of `koleo_loss` over the global views (DINOv2 sums over its two crops; its weight 0.1 means the same
    here)."""
    return torch.stack([koleo_loss(v) for v in per_view]).sum()
