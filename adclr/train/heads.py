"""DINO projection head, shared by the [CLS] token and the ADCLR query tokens (no new parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normed linear layer onto `out_dim` prototypes.

    Accepts any leading dims, e.g. `(B, C)` [CLS] features or `(B, r, C)` query tokens. With
    `norm_last_layer=True` the weight-norm magnitude `g` is fixed to 1 and frozen, so the logits are
    cosine similarities to the prototypes (DINO's recipe for stable training).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}; use nlayers=1 for a single linear "
                             "bottleneck.")
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            layers: list[nn.Module] = []
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.mlp.apply(_init_linear)
        _init_linear(last)
        self.last_layer = weight_norm(last)
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor, last_layer: bool = True) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim) logits; with ``last_layer=False`` the L2-normalised bottleneck features
        (..., bottleneck_dim), for a loss that applies `last_layer.weight` itself (`losses.ADCLRLoss.fused`)."""
        # BatchNorm1d wants (N, C), so all leading dims are folded into one for the MLP.
        # Explicit sizes (no -1) keep r = 0 query tensors (B, 0, C) working.
        *lead, dim = x.shape
        x = self.mlp(x.reshape(-1, dim))
        x = F.normalize(x, dim=-1)
        if last_layer:
            x = self.last_layer(x)
        return x.reshape(*lead, x.shape[-1])


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def cancel_last_layer_gradients(module: nn.Module) -> None:
    """Drop the gradients of every `DINOHead.last_layer` inside `module` (DINO freezes it in epoch 1).

    Works on a bare head, a student wrapper or a DDP-wrapped model. Gradients are set to None rather
    than zero so that the optimizer skips those parameters entirely (no weight decay, no moment update).
    """
    for sub in module.modules():
        if isinstance(sub, DINOHead):
            for p in sub.last_layer.parameters():
                p.grad = None
