"""Student / teacher network: a plain timm ViT backbone plus the DINO head (plus iBOT's mask token).

ADCLR adds no parameters: the query tokens go through the backbone's own patch embedding, blocks and final norm, and
through the same head as [CLS]. The mask token exists only in the iBOT variant, and only here: export keeps the
backbone.
"""
from __future__ import annotations

from typing import Sequence

import torch
from timm.models import VisionTransformer
from torch import Tensor, nn

from ..load import create_vit
from .heads import DINOHead
from ..queries import forward_with_queries


class SSLNetwork(nn.Module):
    def __init__(self, backbone: VisionTransformer, head: DINOHead, mask_token: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim)) if mask_token else None
        if mask_token:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, global_views: Sequence[Tensor], queries: Tensor | None, local_views: Sequence[Tensor] = (), *,
                masks: Sequence[Tensor] | None = None, query_attends: str = "self", query_pos: str = "none",
                bidirectional_ablation: bool = False, local_queries: bool = False,
                patch_outputs: bool = False, last_layer: bool = True) -> dict[str, list[Tensor]]:
        """Head outputs per view: 'cls' for every view (globals first), 'query' (B, r, K) per view that carries queries,
        'patch' (B, N, K) per global view when `patch_outputs`; and 'embedding', the backbone's [CLS] (B, C) per global
        view (for KoLeo). `queries` (B, r, 3, q, q) or None for no queries; `masks`: (B, N) bool per global view (iBOT).
        With ``last_layer=False`` the head outputs stop at its L2-normalised bottleneck (..., C) and 'prototypes' holds
        the last layer's (K, C) weight: `ADCLRLoss` then applies it block by block (`ADCLRLoss.fused`).

        Every head use ([CLS], queries, patches, local crops) goes through one head call: each layer is one matmul
        over all rows, so the weight-normed last layer (65536 x 256 at DINO's size) and its weight gradient are built
        once per step, not once per use."""
        n_global = len(global_views)
        query_kw = dict(query_attends=query_attends, query_pos=query_pos, bidirectional_ablation=bidirectional_ablation)
        patch_mask = None if masks is None else torch.cat(list(masks))
        view_queries = None if queries is None else queries.repeat(n_global, 1, 1, 1, 1)
        tokens, query_tokens = self._tokens(torch.cat(list(global_views)), view_queries, patch_mask=patch_mask,
                                            **query_kw)
        embedding = self.backbone.forward_head(tokens, pre_logits=True)
        patches = tokens[:, self.backbone.num_prefix_tokens:] if patch_outputs else None
        uses = [("cls", n_global, embedding), ("query", n_global, query_tokens), ("patch", n_global, patches)]
        if local_views:
            n_local = len(local_views)
            local_q = queries.repeat(n_local, 1, 1, 1, 1) if (local_queries and queries is not None) else None
            tokens, query_tokens = self._tokens(torch.cat(list(local_views)), local_q, **query_kw)
            uses += [("cls", n_local, self.backbone.forward_head(tokens, pre_logits=True)),
                     ("query", n_local, query_tokens)]
        uses = [use for use in uses if use[2] is not None]
        out = {"cls": [], "query": [], "patch": [], "embedding": list(embedding.chunk(n_global))}
        for (name, n_views, _), outputs in zip(uses, self._head([x for *_, x in uses], last_layer)):
            out[name] += outputs.chunk(n_views)
        if not last_layer:
            out["prototypes"] = [self.head.last_layer.weight]
        return out

    def _head(self, inputs: list[Tensor], last_layer: bool) -> list[Tensor]:
        """The head over every input (..., C) at once -> (..., K) each (bottleneck features without ``last_layer``)."""
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
        outputs = self.head(rows, last_layer).split([x[..., 0].numel() for x in inputs])
        return [y.reshape(*x.shape[:-1], y.shape[-1]) for x, y in zip(inputs, outputs)]

    def _tokens(self, images: Tensor, queries: Tensor | None, patch_mask: Tensor | None = None,
                **query_kw) -> tuple[Tensor, Tensor | None]:
        if queries is None and patch_mask is None:
            return self.backbone.forward_features(images), None
        if queries is None:
            queries = images.new_zeros(images.shape[0], 0, 3, *self.backbone.patch_embed.patch_size)
        mask_token = self.mask_token if patch_mask is not None else None
        tokens, query_tokens = forward_with_queries(self.backbone, images, queries, patch_mask=patch_mask,
                                                    mask_token=mask_token, **query_kw)
        return tokens, (query_tokens if query_tokens.shape[1] else None)


def build_backbone(cfg, *, drop_path: float = 0.0, dynamic_img_size: bool = True) -> VisionTransformer:
    """The run's timm ViT; training uses `dynamic_img_size` so global and local crops share one position table."""
    kwargs = dict(cfg.model_kwargs)
    if dynamic_img_size:
        kwargs["dynamic_img_size"] = True
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    return create_vit(cfg.arch, img_size=cfg.img_size, **kwargs)


def build_network(cfg, *, drop_path: float = 0.0) -> SSLNetwork:
    backbone = build_backbone(cfg, drop_path=drop_path)
    head = DINOHead(backbone.embed_dim, cfg.out_dim, hidden_dim=cfg.head_hidden_dim,
                    bottleneck_dim=cfg.head_bottleneck_dim, norm_last_layer=cfg.norm_last_layer)
    return SSLNetwork(backbone, head, mask_token=cfg.variant == "ibot")
