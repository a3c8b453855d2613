"""Query-token injection: image stream untouched, fast path equal to a full-mask reference, one-way flow."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from adclr.queries import QUERY_ATTENDS, embed_queries, forward_with_queries, one_way_attention_mask

ATOL = 1e-5
PATCH = 8

# Tiny ViTs covering: plain [CLS]; registers without [CLS] + qk_norm + layer scale; [CLS] + register with
# no_embed_class + pre-norm + attention output norm.
VIT_KINDS = {
    'cls': {},
    'reg': dict(class_token=False, global_pool='avg', reg_tokens=2, qk_norm=True, init_values=0.1),
    'cls_reg': dict(reg_tokens=1, no_embed_class=True, pre_norm=True, scale_attn_norm=True),
}


def make_vit(seed: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    cfg = dict(img_size=32, patch_size=PATCH, embed_dim=48, depth=2, num_heads=3, num_classes=0)
    cfg.update(kwargs)
    vit = VisionTransformer(**cfg).eval()
    with torch.no_grad():  # timm inits [CLS]/registers near zero; make them matter in the checks
        for token in (vit.cls_token, vit.reg_token):
            if token is not None:
                token.normal_(std=0.5)
    return vit


def inputs(batch: int = 2, num_queries: int = 5, q: int = PATCH, size=(32, 32), seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=gen), torch.randn(batch, num_queries, 3, q, q, generator=gen)


def reference_mask(s: int, r: int, mode: str, bidirectional: bool) -> torch.Tensor:
    """The rule of docs/method.md written entry by entry."""
    allowed = torch.zeros(s + r, s + r, dtype=torch.bool)
    for i in range(s + r):
        for j in range(s + r):
            if j < s:
                allowed[i, j] = True
            elif i < s:
                allowed[i, j] = bidirectional
            else:
                allowed[i, j] = mode == 'all_queries' or (mode == 'self' and i == j)
    return allowed


def prepared_tokens(vit, images, query_tokens):
    x = vit.patch_drop(vit._pos_embed(vit.patch_embed(images)))
    return vit.norm_pre(torch.cat([x, query_tokens], dim=1)), x.shape[1]


def timm_block_reference(vit, images, queries, mode, bidirectional):
    """Full sequence through timm's own blocks with the full boolean mask."""
    x, s = prepared_tokens(vit, images, embed_queries(vit, queries))
    mask = one_way_attention_mask(s, queries.shape[1], mode, bidirectional)
    for blk in vit.blocks:
        x = blk(x, attn_mask=mask)
    x = vit.norm(x)
    return x[:, :s], x[:, s:]


def hand_query_tokens(vit, queries):
    b, r = queries.shape[:2]
    pe = vit.patch_embed
    grid = F.conv2d(queries.reshape(b * r, *queries.shape[2:]), pe.proj.weight, pe.proj.bias, stride=PATCH)
    tokens = pe.norm(grid.flatten(2).transpose(1, 2)).mean(dim=1)
    return tokens.reshape(b, r, -1)


def explicit_softmax_reference(vit, images, queries, mode, bidirectional):
    """Every block written out: explicit scores, -inf where the rule forbids, softmax, values."""
    x, s = prepared_tokens(vit, images, hand_query_tokens(vit, queries))
    b, t, c = x.shape
    allowed = reference_mask(s, queries.shape[1], mode, bidirectional)
    for blk in vit.blocks:
        a = blk.attn
        h = blk.norm1(x)
        qkv = a.qkv(h).reshape(b, t, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = a.q_norm(qkv[0]), a.k_norm(qkv[1]), qkv[2]
        scores = (q @ k.transpose(-2, -1)) / a.head_dim ** 0.5
        scores = scores.masked_fill(~allowed, float('-inf'))
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, c)
        x = x + blk.ls1(a.proj(a.norm(out)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = vit.norm(x)
    return x[:, :s], x[:, s:]


def test_mask_matches_the_rule():
    assert one_way_attention_mask(2, 2, 'self').tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, True, False, True],
    ]
    for mode in QUERY_ATTENDS:
        for bidirectional in (False, True):
            for r in (0, 1, 3):
                got = one_way_attention_mask(5, r, mode, bidirectional)
                assert torch.equal(got, reference_mask(5, r, mode, bidirectional))
    with pytest.raises(ValueError, match='query_attends'):
        one_way_attention_mask(5, 2, 'both')


@pytest.mark.parametrize('kind', VIT_KINDS)
@pytest.mark.parametrize('mode', QUERY_ATTENDS)
@pytest.mark.parametrize('r', [0, 1, 5])
def test_image_tokens_equal_forward_features(kind, mode, r):
    vit = make_vit(**VIT_KINDS[kind])
    images, queries = inputs(num_queries=r)
    with torch.no_grad():
        tokens, query_tokens = forward_with_queries(vit, images, queries, mode)
        expected = vit.forward_features(images)
    assert tokens.shape == expected.shape == (2, vit.num_prefix_tokens + 16, 48)
    assert query_tokens.shape == (2, r, 48)
    torch.testing.assert_close(tokens, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize('kind', VIT_KINDS)
@pytest.mark.parametrize('mode', QUERY_ATTENDS)
@pytest.mark.parametrize('bidirectional', [False, True])
def test_fast_path_equals_full_mask_references(kind, mode, bidirectional):
    vit = make_vit(**VIT_KINDS[kind])
    images, queries = inputs(num_queries=4)
    with torch.no_grad():
        fast = forward_with_queries(vit, images, queries, mode, bidirectional_ablation=bidirectional)
        for reference in (timm_block_reference, explicit_softmax_reference):
            expected = reference(vit, images, queries, mode, bidirectional)
            torch.testing.assert_close(fast[0], expected[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(fast[1], expected[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize('mode', QUERY_ATTENDS)
def test_information_flow_between_queries(mode):
    vit = make_vit()
    images, queries = inputs(num_queries=4)
    perturbed = queries.clone()
    perturbed[:, 2] = torch.randn_like(perturbed[:, 2])
    with torch.no_grad():
        tokens, q_tokens = forward_with_queries(vit, images, queries, mode)
        tokens_p, q_tokens_p = forward_with_queries(vit, images, perturbed, mode)
        bi_tokens, _ = forward_with_queries(vit, images, queries, mode, bidirectional_ablation=True)
        bi_tokens_p, _ = forward_with_queries(vit, images, perturbed, mode, bidirectional_ablation=True)
    torch.testing.assert_close(tokens_p, tokens, atol=0, rtol=0)
    assert (q_tokens_p[:, 2] - q_tokens[:, 2]).abs().max() > 1e-2
    others = [0, 1, 3]
    if mode == 'all_queries':
        assert (q_tokens_p[:, others] - q_tokens[:, others]).abs().amax(dim=-1).min() > 1e-4
    else:
        torch.testing.assert_close(q_tokens_p[:, others], q_tokens[:, others], atol=ATOL, rtol=0)
    assert (bi_tokens_p - bi_tokens).abs().max() > 1e-3


def test_embed_queries_single_patch_and_pooled_grid():
    vit = make_vit(embed_norm_layer=nn.LayerNorm)
    with torch.no_grad():  # a non-trivial embed norm, so "norm then pool" differs from "pool then norm"
        vit.patch_embed.norm.weight.normal_()
        vit.patch_embed.norm.bias.normal_()
    images, _ = inputs(batch=2)
    with torch.no_grad():
        patches = vit.patch_embed(images)  # (B, 16, C), 4 x 4 grid, no pos embed
        one = embed_queries(vit, images[:, None, :, 8:16, 16:24])  # patch row 1, col 2
        pooled = embed_queries(vit, images[:, None, :, 8:24, 0:16])  # rows 1-2, cols 0-1
        both = embed_queries(vit, torch.stack([images[:, :, 8:16, 16:24], images[:, :, 0:8, 0:8]], dim=1))
    torch.testing.assert_close(one[:, 0], patches[:, 1 * 4 + 2], atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled[:, 0], patches[:, [4, 5, 8, 9]].mean(dim=1), atol=ATOL, rtol=0)
    torch.testing.assert_close(both, patches[:, [6, 0]], atol=ATOL, rtol=0)


def test_embed_queries_cls_position_and_errors():
    vit = make_vit()
    _, queries = inputs(num_queries=3)
    with torch.no_grad():
        plain = embed_queries(vit, queries)
        with_pos = embed_queries(vit, queries, query_pos='cls')
    torch.testing.assert_close(with_pos, plain + vit.pos_embed[:, 0], atol=ATOL, rtol=0)
    assert embed_queries(vit, torch.zeros(2, 0, 3, PATCH, PATCH)).shape == (2, 0, 48)

    for bad in (torch.zeros(2, 3, 3, 12, 12), torch.zeros(2, 3, 3, 8, 16)):
        with pytest.raises(ValueError, match='multiple of the patch size'):
            embed_queries(vit, bad)
    with pytest.raises(ValueError, match=r'\(B, r, C, q, q\)'):
        embed_queries(vit, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"query_pos='learned'.*\('none', 'cls'\)"):
        embed_queries(vit, queries, query_pos='learned')
    for kind in ('reg', 'cls_reg'):  # no class token / class token without its own pos embed entry
        with pytest.raises(ValueError, match="query_pos='none'"):
            embed_queries(make_vit(**VIT_KINDS[kind]), queries, query_pos='cls')


def test_query_pos_reaches_forward():
    vit = make_vit()
    images, queries = inputs(num_queries=2)
    with torch.no_grad():
        _, plain = forward_with_queries(vit, images, queries)
        tokens, with_pos = forward_with_queries(vit, images, queries, query_pos='cls')
        torch.testing.assert_close(tokens, vit.forward_features(images), atol=ATOL, rtol=0)
    assert (with_pos - plain).abs().max() > 1e-3


def test_gradients_from_query_loss_reach_backbone_and_no_parameters_added():
    vit = make_vit()
    before = [(name, id(p), p.detach().clone()) for name, p in vit.named_parameters()]
    images, queries = inputs(num_queries=3)
    _, query_tokens = forward_with_queries(vit, images, queries)
    query_tokens.square().sum().backward()
    after = list(vit.named_parameters())
    assert [(n, id(p)) for n, p in after] == [(n, i) for n, i, _ in before]
    for (name, _, value), (_, p) in zip(before, after):
        assert torch.equal(p.detach(), value), name
        assert p.grad is not None and p.grad.abs().sum() > 0, f'no gradient reached {name}'
    assert len(list(vit.modules())) == len(list(make_vit().modules()))


@pytest.mark.parametrize('kind', ['cls', 'dynamic'])
def test_patch_mask_replaces_embeddings_before_pos_embed(kind):
    vit = make_vit(dynamic_img_size=True) if kind == 'dynamic' else make_vit()
    images, queries = inputs(num_queries=2)
    patch_mask = torch.zeros(2, 16, dtype=torch.bool)
    patch_mask[0, [1, 5, 6]] = True
    patch_mask[1, [0, 15]] = True
    mask_token = torch.randn(1, 1, 48)
    with torch.no_grad():
        tokens, _ = forward_with_queries(vit, images, queries, patch_mask=patch_mask, mask_token=mask_token)
        tokens_flat, _ = forward_with_queries(vit, images, queries, patch_mask=patch_mask, mask_token=mask_token[0, 0])
        patches = vit.patch_embed(images).reshape(2, 16, 48)
        patches[patch_mask] = mask_token[0, 0]
        x = vit._pos_embed(patches.reshape(2, 4, 4, 48) if kind == 'dynamic' else patches)
        x = vit.norm_pre(x)
        for blk in vit.blocks:
            x = blk(x)
        expected = vit.norm(x)
    torch.testing.assert_close(tokens, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(tokens_flat, expected, atol=ATOL, rtol=0)
    assert (tokens - vit.forward_features(images)).abs().max() > 1e-3

    with pytest.raises(ValueError, match='both'):
        forward_with_queries(vit, images, queries, patch_mask=patch_mask)
    with pytest.raises(ValueError, match='both'):
        forward_with_queries(vit, images, queries, mask_token=mask_token)
    with pytest.raises(ValueError, match='patch grid'):
        forward_with_queries(vit, images, queries, patch_mask=patch_mask[:, :8], mask_token=mask_token)


@pytest.mark.parametrize('mode', QUERY_ATTENDS)
def test_non_square_images_with_dynamic_img_size(mode):
    vit = make_vit(dynamic_img_size=True)
    images, queries = inputs(num_queries=3, size=(24, 40))
    with torch.no_grad():
        tokens, query_tokens = forward_with_queries(vit, images, queries, mode)
        expected = timm_block_reference(vit, images, queries, mode, False)
        torch.testing.assert_close(tokens, vit.forward_features(images), atol=ATOL, rtol=0)
    assert tokens.shape == (2, 1 + 3 * 5, 48)
    torch.testing.assert_close(query_tokens, expected[1], atol=ATOL, rtol=0)


def test_unsupported_models_raise_type_error():
    images, queries = inputs(num_queries=1)
    for kwargs in (dict(block_fn=ResPostBlock), dict(attn_layer='diff')):
        with pytest.raises(TypeError, match='standard Block'):
            forward_with_queries(make_vit(**kwargs), images, queries)
    with pytest.raises(TypeError, match='VisionTransformer'):
        forward_with_queries(nn.Sequential(make_vit()), images, queries)


def test_training_mode_r0_consumes_randomness_like_forward_features():
    """With no queries the same random draws happen in the same order, so even dropout/DropPath agree."""
    vit = make_vit(attn_drop_rate=0.3, proj_drop_rate=0.2, pos_drop_rate=0.1, drop_path_rate=0.5).train()
    images, queries = inputs(batch=4, num_queries=0)
    torch.manual_seed(7)
    tokens, _ = forward_with_queries(vit, images, queries)
    torch.manual_seed(7)
    expected = vit.forward_features(images)
    torch.testing.assert_close(tokens, expected, atol=ATOL, rtol=0)


def test_attention_dropout_applies_to_query_rows():
    # depth 1: query rows cannot see dropout of image rows, only their own attention dropout
    vit = make_vit(depth=1, attn_drop_rate=0.5)
    images, queries = inputs(num_queries=3)
    outputs = {}
    for training in (False, True):
        vit.train(training)
        with torch.no_grad():
            outputs[training] = [forward_with_queries(vit, images, queries)[1] for _ in range(2)]
    torch.testing.assert_close(outputs[False][0], outputs[False][1], atol=0, rtol=0)
    assert (outputs[True][0] - outputs[True][1]).abs().max() > 1e-3


def test_drop_path_draws_once_per_sample_for_whole_sequence():
    vit = make_vit(depth=1).train()
    vit.blocks[0].drop_path1 = DropPath(0.5)  # timm's linear schedule gives a single block rate 0
    with torch.no_grad():  # silence the MLP branch: the block output is x + drop_path(attn)
        vit.blocks[0].mlp.fc2.weight.zero_()
        vit.blocks[0].mlp.fc2.bias.zero_()
    images, queries = inputs(batch=16, num_queries=3)
    torch.manual_seed(3)
    with torch.no_grad():
        tokens, query_tokens = forward_with_queries(vit, images, queries)
        block_input, s = prepared_tokens(vit, images, embed_queries(vit, queries))
        untouched = vit.norm(block_input)
    image_dropped = (tokens - untouched[:, :s]).abs().amax(dim=(1, 2)) < 1e-6
    query_dropped = (query_tokens - untouched[:, s:]).abs().amax(dim=(1, 2)) < 1e-6
    assert torch.equal(image_dropped, query_dropped)
    assert 0 < int(image_dropped.sum()) < 16


def test_grad_checkpointing_gives_same_outputs_and_gradients():
    images, queries = inputs(num_queries=2)
    results = []
    for enable in (False, True):
        vit = make_vit()
        vit.set_grad_checkpointing(enable)
        tokens, query_tokens = forward_with_queries(vit, images, queries, 'all_queries')
        (tokens.sum() + query_tokens.square().sum()).backward()
        results.append((tokens.detach(), query_tokens.detach(), vit.blocks[0].attn.qkv.weight.grad))
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(checkpointed, plain, atol=ATOL, rtol=0)
