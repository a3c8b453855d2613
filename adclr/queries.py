"""Query-token injection with one-way attention: the ADCLR part of the backbone forward.

Each query crop becomes one extra token made by the ViT's own patch embedding. Query rows read the
[CLS]/register + image columns (and, by ``query_attends``, query columns); no prefix or image row reads a
query column, so the image stream is exactly ``vit.forward_features``. The plain timm model is used as
is: no parameters, no wrappers, no hooks.

Efficient form: per block, norm1 + qkv run once over ``[prefix + image + queries]``; the prefix/image rows
go through the unmasked fused SDPA over their own keys (as timm computes them), and the ``r`` query rows are
one small extra SDPA over all keys with an ``(r, T)`` boolean mask, the query rows of
:func:`one_way_attention_mask`. Extra cost over ``forward_features`` is about ``r / N``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from timm.layers import Attention, PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer

QUERY_ATTENDS = ('self', 'all_queries', 'none')  # what a query row may read besides [CLS]+image columns
QUERY_POS = ('none', 'cls')


def one_way_attention_mask(
        num_prefix_and_image: int,
        num_queries: int,
        query_attends: str = 'self',
        bidirectional_ablation: bool = False,
        *,
        device: torch.device | None = None,
) -> Tensor:
    """Full ``(T, T)`` boolean mask (True = may attend) for ``[prefix + image + queries]``, ``T = S + r``.

    Every row reads the S prefix/image columns. Query rows read query columns as ``query_attends`` says.
    Prefix/image rows read query columns only under ``bidirectional_ablation`` (a known collapse route).
    """
    if query_attends not in QUERY_ATTENDS:
        raise ValueError(f'query_attends={query_attends!r} is not supported; use one of {QUERY_ATTENDS}.')
    s, r = num_prefix_and_image, num_queries
    mask = torch.zeros(s + r, s + r, dtype=torch.bool, device=device)
    mask[:, :s] = True
    mask[:s, s:] = bidirectional_ablation
    if query_attends == 'self':
        mask[s:, s:] = torch.eye(r, dtype=torch.bool, device=device)
    elif query_attends == 'all_queries':
        mask[s:, s:] = True
    return mask


def embed_queries(vit: VisionTransformer, queries: Tensor, *, query_pos: str = 'none') -> Tensor:
    """Query crops ``(B, r, 3, q, q)`` -> query tokens ``(B, r, C)`` through ``vit.patch_embed`` (proj + norm).

    ``q`` equal to the patch size gives one token; a multiple gives a ``k x k`` grid that is mean-pooled.
    ``query_pos='cls'`` adds the [CLS] position embedding; the default ``'none'`` adds nothing.
    """
    patch_embed = _checked_patch_embed(vit)
    if queries.ndim != 5:
        raise ValueError(f'queries must be (B, r, C, q, q), got shape {tuple(queries.shape)}; '
                         'stack the r query crops of each image along dim 1.')
    batch, num_queries, _, qh, qw = queries.shape
    ph, pw = patch_embed.patch_size
    if qh != qw or qh % ph or qw % pw:
        raise ValueError(f'query crops are {qh}x{qw} px but must be square with a side that is a multiple of the '
                         f'patch size {ph}x{pw}; resize the crops to query_size = k * {ph} (k >= 1).')
    if query_pos not in QUERY_POS:
        raise ValueError(f'query_pos={query_pos!r} is not supported; use one of {QUERY_POS}.')
    if query_pos == 'cls' and (vit.cls_token is None or vit.pos_embed is None or vit.no_embed_class):
        raise ValueError("query_pos='cls' needs a ViT with a class token that has its own position embedding "
                         "(class_token=True, no_embed_class=False, a pos_embed); use query_pos='none'.")

    grid = patch_embed.proj(queries.flatten(0, 1))
    tokens = patch_embed.norm(rearrange(grid, 'n c h w -> n (h w) c')).mean(dim=1)
    tokens = tokens.unflatten(0, (batch, num_queries))
    if query_pos == 'cls':
        tokens = tokens + vit.pos_embed[:, :1]
    return tokens


def forward_with_queries(
        vit: VisionTransformer,
        images: Tensor,
        queries: Tensor,
        query_attends: str = 'self',
        *,
        query_pos: str = 'none',
        bidirectional_ablation: bool = False,
        patch_mask: Tensor | None = None,
        mask_token: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Images ``(B, 3, H, W)`` + queries ``(B, r, 3, q, q)`` -> ``(tokens, query_tokens)``, both after ``vit.norm``.

    ``tokens`` (B, num_prefix + N, C) equal ``vit.forward_features(images)`` unless ``bidirectional_ablation``
    (the named ablation where prefix/image rows also read query columns). ``patch_mask`` (B, N) + ``mask_token``
    (iBOT): masked patch embeddings are replaced before the position embedding is added. Query tokens go
    through ``pos_drop`` and ``norm_pre`` like every other token.
    """
    _check_supported(vit)
    x = _image_tokens(vit, images, patch_mask, mask_token)
    query_tokens = vit.pos_drop(embed_queries(vit, queries, query_pos=query_pos))
    num_image = x.shape[1]
    rows_mask = one_way_attention_mask(num_image, query_tokens.shape[1], query_attends, bidirectional_ablation,
                                       device=x.device)[num_image:]
    x = vit.norm_pre(torch.cat([x, query_tokens], dim=1))
    for blk in vit.blocks:
        if vit.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(_block_forward, blk, x, rows_mask, bidirectional_ablation, use_reentrant=False)
        else:
            x = _block_forward(blk, x, rows_mask, bidirectional_ablation)
    x = vit.norm(x)
    return x[:, :num_image], x[:, num_image:]


def _checked_patch_embed(vit: VisionTransformer) -> PatchEmbed:
    """Queries reuse the patch projection directly, so only timm's conv ``PatchEmbed`` fits."""
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f'expected a timm VisionTransformer, got {type(vit).__name__}; pass the plain backbone, '
                        'not a wrapper around it.')
    if not isinstance(vit.patch_embed, PatchEmbed):
        raise TypeError(f'vit.patch_embed is {type(vit.patch_embed).__name__}; query tokens need timm\'s '
                        'PatchEmbed (conv projection), so build the ViT with the default embed_layer.')
    return vit.patch_embed


def _check_supported(vit: VisionTransformer) -> None:
    """The fast path re-implements Block/Attention.forward, so any other block type would be silently wrong."""
    _checked_patch_embed(vit)
    for i, blk in enumerate(vit.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(f'vit.blocks[{i}] is {type(blk).__name__} with {type(getattr(blk, "attn", None)).__name__};'
                            ' forward_with_queries supports only timm\'s standard Block with the standard Attention '
                            '(block_fn=Block, attn_layer=Attention).')


def _image_tokens(vit: VisionTransformer, images: Tensor, patch_mask: Tensor | None,
                  mask_token: Tensor | None) -> Tensor:
    """Prefix + image tokens as ``forward_features`` prepares them, with optional iBOT masking before pos embed."""
    if (patch_mask is None) != (mask_token is None):
        raise ValueError('patch_mask and mask_token go together: give both (iBOT masking) or neither.')
    x = vit.patch_embed(images)
    if patch_mask is not None:
        grid = x.shape[1:-1]
        if patch_mask.shape != (x.shape[0], grid.numel()):
            raise ValueError(f'patch_mask has shape {tuple(patch_mask.shape)} but the images give '
                             f'{(x.shape[0], grid.numel())} (B, N) patches; build it on the patch grid {tuple(grid)}.')
        if mask_token.numel() != x.shape[-1]:
            raise ValueError(f'mask_token has {mask_token.numel()} values but the embed dim is {x.shape[-1]}; '
                             'pass a (1, 1, C) or (C,) tensor.')
        replace = patch_mask.to(torch.bool).reshape(x.shape[:-1]).unsqueeze(-1)
        x = torch.where(replace, mask_token.reshape(-1).to(x.dtype), x)
    x = vit._pos_embed(x)
    return vit.patch_drop(x)


def _block_forward(blk: Block, x: Tensor, rows_mask: Tensor, bidirectional_ablation: bool) -> Tensor:
    """One timm ``Block`` over ``[prefix + image + queries]``; ``rows_mask`` (r, T) is what query rows may read."""
    x = x + blk.drop_path1(blk.ls1(_attention(blk.attn, blk.norm1(x), rows_mask, bidirectional_ablation)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def _attention(attn: Attention, x: Tensor, rows_mask: Tensor, bidirectional_ablation: bool) -> Tensor:
    """timm ``Attention.forward`` split into an unmasked fused call for image rows and a masked one for queries."""
    num_image = x.shape[1] - rows_mask.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, 'gate', None) is not None else None
    q, k, v = rearrange(attn.qkv(x), 'b t (three h d) -> three b h t d', three=3, h=attn.num_heads)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout_p = attn.attn_drop.p if attn.training else 0.
    image_keys = slice(None) if bidirectional_ablation else slice(0, num_image)
    out = F.scaled_dot_product_attention(
        q[:, :, :num_image], k[:, :, image_keys], v[:, :, image_keys], dropout_p=dropout_p)
    if rows_mask.shape[0]:
        out_queries = F.scaled_dot_product_attention(
            q[:, :, num_image:], k, v, attn_mask=rows_mask, dropout_p=dropout_p)
        out = torch.cat([out, out_queries], dim=2)
    out = attn.norm(rearrange(out, 'b h t d -> b t (h d)'))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))
