"""The one place that relies on timm's ViT internals (private methods, attribute switches, the Block/Attention layout).

Everything else in adclr goes through timm's public API or through the functions here, so a timm refactor is fixed
in this file. What is relied on, checked against timm 1.0: ``VisionTransformer._pos_embed``, ``patch_drop``,
``pos_drop``, ``norm_pre``; the dynamic-size switches (``dynamic_img_size`` and ``PatchEmbed.strict_img_size``,
``flatten``, ``output_fmt``); ``PatchEmbed.proj``/``norm``; ``Block`` (norm1, attn, ls1, drop_path1, norm2, mlp, ls2,
drop_path2) and ``Attention`` (qkv, q_norm, k_norm, attn_drop, norm, proj, proj_drop, optional gate).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Attention, Format, PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from .errors import InvalidSettingError, UnsupportedModelError


def check_vit(model: nn.Module, *, conv_patch_embed: bool = True) -> VisionTransformer:
    """``model`` if it is a timm ``VisionTransformer`` (with timm's conv ``PatchEmbed`` unless told otherwise)."""
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(f"expected a timm VisionTransformer, got {type(model).__name__}; pass the plain "
                                    "backbone (timm.create_model or adclr.load.load_model), not a wrapper around it.")
    if conv_patch_embed and not isinstance(model.patch_embed, PatchEmbed):
        raise UnsupportedModelError(f"vit.patch_embed is {type(model.patch_embed).__name__}; this needs timm's "
                                    "PatchEmbed (conv projection), so build the ViT with the default embed_layer.")
    return model


def check_standard_blocks(blocks: Iterable[nn.Module], user: str) -> None:
    """Code that re-implements ``Block``/``Attention.forward`` would be silently wrong on any other block type."""
    for i, blk in enumerate(blocks):
        if type(blk) is not Block or type(getattr(blk, "attn", None)) is not Attention:
            raise UnsupportedModelError(f"vit.blocks[{i}] is {type(blk).__name__} with "
                                        f"{type(getattr(blk, 'attn', None)).__name__};"
                                        f" {user} supports only timm's standard Block with the standard Attention "
                                        "(block_fn=Block, attn_layer=Attention).")


# ---------------------------------------------------------------- input size


def _size_switches(vit: VisionTransformer) -> tuple:
    patch_embed = vit.patch_embed
    return vit.dynamic_img_size, patch_embed.strict_img_size, patch_embed.flatten, patch_embed.output_fmt


def _set_size_switches(vit: VisionTransformer, switches: tuple) -> None:
    patch_embed = vit.patch_embed
    vit.dynamic_img_size, patch_embed.strict_img_size, patch_embed.flatten, patch_embed.output_fmt = switches


def allow_any_input_size(vit: VisionTransformer) -> VisionTransformer:
    """Switch a (fixed-size) ViT to timm's dynamic-size path for good: the switches ``dynamic_img_size=True`` sets
    at construction (pos-embed resampled per call, non-strict NHWC patch embedding)."""
    _set_size_switches(check_vit(vit), (True, False, False, Format.NHWC))
    return vit


@contextmanager
def any_input_size(model: VisionTransformer) -> Iterator[VisionTransformer]:
    """Let a (fixed-size) timm ViT take any input whose sides are patch multiples, for one block of code.

    The four switches are restored afterwards, also on errors. Not for concurrent use of one model from several threads.
    """
    saved = _size_switches(check_vit(model))
    allow_any_input_size(model)
    try:
        yield model
    finally:
        _set_size_switches(model, saved)


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The (H, W) a ViT insists on, or None when it takes any size (dynamic_img_size, non-strict patch embed, CNNs)."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or getattr(model, "dynamic_img_size", False) or not patch_embed.strict_img_size:
        return None
    return tuple(patch_embed.img_size)


def pad_to_patch(vit: VisionTransformer, x: Tensor) -> Tensor:
    """Zero-pad (B, C, H, W) on the right and bottom to multiples of the patch size."""
    ph, pw = vit.patch_embed.patch_size
    return F.pad(x, (0, -x.shape[-1] % pw, 0, -x.shape[-2] % ph))


# ---------------------------------------------------------------- tokens


def pooled_patch_tokens(vit: VisionTransformer, crops: Tensor) -> Tensor:
    """Crops (n, 3, k*p, k*p) -> (n, C): the patch embedding (projection + norm) of each crop, mean over its k x k
    grid."""
    patch_embed = check_vit(vit).patch_embed
    grid = patch_embed.proj(crops)
    return patch_embed.norm(rearrange(grid, "n c h w -> n (h w) c")).mean(dim=1)


def tokens_before_blocks(vit: VisionTransformer, images: Tensor, *, extra: Tensor | None = None,
                         patch_mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
    """``[prefix + image (+ extra)]`` tokens as ``forward_features`` feeds them to the first block.

    ``patch_mask`` (B, N) + ``mask_token`` (iBOT): masked patch embeddings are replaced before the position embedding
    is added. ``extra`` (B, r, C) tokens are appended after ``pos_drop`` of their own and share ``norm_pre``; random
    draws happen in the order image tokens, then extra tokens.
    """
    if (patch_mask is None) != (mask_token is None):
        raise InvalidSettingError("patch_mask and mask_token go together: give both (iBOT masking) or neither.")
    x = vit.patch_embed(images)
    if patch_mask is not None:
        grid = x.shape[1:-1]
        if patch_mask.shape != (x.shape[0], grid.numel()):
            raise InvalidSettingError(f"patch_mask has shape {tuple(patch_mask.shape)} but the images give "
                                      f"{(x.shape[0], grid.numel())} (B, N) patches; build it on the patch grid "
                                      f"{tuple(grid)}.")
        if mask_token.numel() != x.shape[-1]:
            raise InvalidSettingError(f"mask_token has {mask_token.numel()} values but the embed dim is {x.shape[-1]}; "
                                      "pass a (1, 1, C) or (C,) tensor.")
        replace = patch_mask.to(torch.bool).reshape(x.shape[:-1]).unsqueeze(-1)
        x = torch.where(replace, mask_token.reshape(-1).to(x.dtype), x)
    x = vit.patch_drop(vit._pos_embed(x))
    if extra is not None:
        x = torch.cat([x, vit.pos_drop(extra)], dim=1)
    return vit.norm_pre(x)


# ---------------------------------------------------------------- blocks and attention


def _heads(attn: Attention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, T, C) -> q, k, v (B, heads, T, d), with the block's q/k norms applied."""
    q, k, v = rearrange(attn.qkv(x), "b t (three h d) -> three b h t d", three=3, h=attn.num_heads)
    return attn.q_norm(q), attn.k_norm(k), v


def block_with_mask(blk: Block, x: Tensor, attn_mask: Tensor | None) -> Tensor:
    """One standard ``Block`` whose attention reads under ``attn_mask`` (T, T) (True = may attend; None = all).

    ``Block.forward`` as timm computes it, the mask passed to its fused SDPA (timm 1.0.15, the oldest supported, takes
    no mask). One SDPA over all rows computes the masked-out entries too, yet measured faster than splitting off the
    masked rows into an SDPA of their own, whose slices, concatenation and partial gradients cost more than the few
    extra columns (benchmarks/bench_train_step.py).
    """
    x = x + blk.drop_path1(blk.ls1(_masked_attention(blk.attn, blk.norm1(x), attn_mask)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def _masked_attention(attn: Attention, x: Tensor, attn_mask: Tensor | None) -> Tensor:
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = _heads(attn, x)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.)
    out = attn.norm(rearrange(out, "b h t d -> b t (h d)"))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def first_row_attention(blk: Block, x: Tensor) -> Tensor:
    """(B, heads, T): softmax(q k^T * scale) of token 0 ([CLS]) in a standard ``Block`` whose input is ``x``."""
    q, k, _ = _heads(blk.attn, blk.norm1(x))
    return (q[:, :, :1] * blk.attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]
