"""Query-token injection with one-way attention: the ADCLR part of the backbone forward.

Each query crop becomes one extra token made by the ViT's own patch embedding. Query rows read the
[CLS]/register + image columns (and, by ``query_attends``, query columns); no prefix or image row reads a
query column, so the image stream is exactly ``vit.forward_features``. The plain timm model is used as
is: no parameters, no wrappers, no hooks.

Form (`adclr.vit.block_with_mask`): per block, one fused SDPA over ``[prefix + image + queries]`` with the
:func:`one_way_attention_mask`. Extra cost over ``forward_features`` is about ``r / N`` (the masked-out image-row x
query-column entries included); splitting the query rows into an SDPA of their own measured slower (issue #11).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from timm.models.vision_transformer import VisionTransformer

from .errors import InvalidSettingError
from .vit import block_with_mask, check_standard_blocks, check_vit, pooled_patch_tokens, tokens_before_blocks

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
        raise InvalidSettingError(f'query_attends={query_attends!r} is not supported; use one of {QUERY_ATTENDS}.')
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
    patch_embed = check_vit(vit).patch_embed
    if queries.ndim != 5:
        raise InvalidSettingError(f'queries must be (B, r, C, q, q), got shape {tuple(queries.shape)}; '
                                  'stack the r query crops of each image along dim 1.')
    batch, num_queries, _, qh, qw = queries.shape
    ph, pw = patch_embed.patch_size
    if qh != qw or qh % ph or qw % pw:
        raise InvalidSettingError(f'query crops are {qh}x{qw} px but must be square with a side that is a multiple '
                                  f'of the patch size {ph}x{pw}; resize the crops to query_size = k * {ph} (k >= 1).')
    if query_pos not in QUERY_POS:
        raise InvalidSettingError(f'query_pos={query_pos!r} is not supported; use one of {QUERY_POS}.')
    if query_pos == 'cls' and (vit.cls_token is None or vit.pos_embed is None or vit.no_embed_class):
        raise InvalidSettingError("query_pos='cls' needs a ViT with a class token that has its own position embedding "
                                  "(class_token=True, no_embed_class=False, a pos_embed); use query_pos='none'.")

    tokens = pooled_patch_tokens(vit, queries.flatten(0, 1)).unflatten(0, (batch, num_queries))
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
    check_standard_blocks(check_vit(vit).blocks, 'forward_with_queries')
    query_tokens = embed_queries(vit, queries, query_pos=query_pos)
    x = tokens_before_blocks(vit, images, extra=query_tokens, patch_mask=patch_mask, mask_token=mask_token)
    num_image = x.shape[1] - query_tokens.shape[1]
    attn_mask = None  # no query: the blocks run unmasked, exactly as in forward_features
    if query_tokens.shape[1]:
        attn_mask = one_way_attention_mask(num_image, query_tokens.shape[1], query_attends, bidirectional_ablation,
                                           device=x.device)
    for blk in vit.blocks:
        if vit.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block_with_mask, blk, x, attn_mask, use_reentrant=False)
        else:
            x = block_with_mask(blk, x, attn_mask)
    x = vit.norm(x)
    return x[:, :num_image], x[:, num_image:]
