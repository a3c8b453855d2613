"""DINO's ViT written out plainly (pre-norm blocks, qkv bias, LayerNorm eps 1e-6, exact GELU, DINO's key names):
the independent reference that conversion tests and the inference benchmark compare timm against."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class ReferenceAttention(nn.Module):
    """Softmax attention as in the DINO repository: one qkv linear, (q @ k^T) * scale, softmax, @ v."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj(rearrange(weights @ v, "b h n d -> b n (h d)"))


class ReferenceMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ReferenceBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ReferenceAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ReferenceMlp(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchProjection(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "b c h w -> b (h w) c")


class DinoViT(nn.Module):
    """Returns the normed [CLS] + patch tokens (B, 1 + N, C), like DINO's get_intermediate_layers(x, 1)[0]."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, patch: int = 16, img_size: int = 224,
                 hidden: int | None = None):
        super().__init__()
        self.patch = patch
        self.patch_embed = PatchProjection(patch, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2 + 1, embed_dim))
        self.blocks = nn.ModuleList(ReferenceBlock(embed_dim, num_heads, hidden or 4 * embed_dim)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def pos_encoding(self, rows: int, cols: int) -> Tensor:
        """DINO's interpolate_pos_encoding: bicubic with scale factors (rows + 0.1) / side, (cols + 0.1) / side."""
        n = self.pos_embed.shape[1] - 1
        if rows * cols == n and rows == cols:
            return self.pos_embed
        side = int(math.sqrt(n))
        grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
        assert grid.shape[-2:] == (rows, cols)
        patches = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([self.pos_embed[:, :1], patches], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        rows, cols = x.shape[2] // self.patch, x.shape[3] // self.patch
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_encoding(rows, cols)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)
