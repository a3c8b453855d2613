"""detectron2 ViTDet checkpoint keys <-> timm VisionTransformer keys, without importing detectron2.

detectron2's ViTDet keeps the ViT at `backbone.net.` with timm's block layout (norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2), no [CLS] token, no final norm, and a pos-embed that may or may not carry a [CLS]
position (`pretrain_use_cls_token`). Both directions detect the input pos-embed layout and emit the one asked
for; a missing [CLS] position is filled with zeros (detectron2 discards it anyway).
"""
import logging
import math
import re

import torch

log = logging.getLogger(__name__)

D2_PREFIX = 'backbone.net.'
SHARED = re.compile(r'(patch_embed\.proj|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2))'
                    r'\.(weight|bias)')
TIMM_ONLY = frozenset({'cls_token', 'norm.weight', 'norm.bias'})  # detectron2's ViT has no slot for these


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def _pos_embed(pos: torch.Tensor, cls_position: bool) -> torch.Tensor:
    """(1, N or 1 + N, C) square-grid pos-embed -> with or without a leading [CLS] position."""
    n = pos.shape[1]
    has_cls = not _is_square(n)
    if has_cls and not _is_square(n - 1):
        raise ValueError(f'pos_embed with {n} positions is neither a square grid nor a square grid plus [CLS]; '
                         'only square pretraining grids can be converted')
    if has_cls == cls_position:
        return pos
    return pos[:, 1:] if has_cls else torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)


def _report(unmapped: list[str], strict: bool, why: str) -> None:
    if not unmapped:
        return
    if strict:
        raise ValueError(f'{len(unmapped)} key(s) have no counterpart ({why}): {unmapped[:6]}; '
                         'pass strict=False to drop them')
    log.warning('dropped %d key(s) without counterpart (%s): %s', len(unmapped), why, unmapped[:6])


def detectron2_to_timm(state_dict: dict[str, torch.Tensor], *, cls_position: bool = True,
                       prefix: str = D2_PREFIX, strict: bool = True) -> dict[str, torch.Tensor]:
    """ViT weights of a detectron2 checkpoint as timm keys; neck and head keys (outside `prefix`) are ignored.

    `cls_position`: whether the target timm pos_embed has a [CLS] position (class_token and not
    no_embed_class). timm's `cls_token` and final `norm` are absent: load with strict=False.
    """
    out, unmapped = {}, []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name == 'pos_embed':
            out[name] = _pos_embed(value, cls_position)
        elif SHARED.fullmatch(name):
            out[name] = value
        else:
            unmapped.append(key)
    _report(unmapped, strict, "e.g. ViTDet's relative-position or residual blocks")
    return out


def timm_to_detectron2(state_dict: dict[str, torch.Tensor], *, cls_position: bool = True,
                       prefix: str = D2_PREFIX, strict: bool = True) -> dict[str, torch.Tensor]:
    """timm ViT weights as detectron2 ViTDet backbone keys; `cls_token` and the final norm are dropped.

    `cls_position`: whether detectron2's pos_embed has a [CLS] position (its `pretrain_use_cls_token`).
    """
    out, unmapped = {}, []
    for name, value in state_dict.items():
        if name == 'pos_embed':
            out[prefix + name] = _pos_embed(value, cls_position)
        elif SHARED.fullmatch(name):
            out[prefix + name] = value
        elif name not in TIMM_ONLY:
            unmapped.append(name)
    _report(unmapped, strict, 'e.g. register tokens, layer scale or a pre-norm')
    return out
