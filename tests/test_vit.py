"""Tests for adclr.vit: the one module that relies on timm's ViT internals."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock

import adclr
from adclr.vit import allow_any_input_size, any_input_size, block_with_mask, check_standard_blocks, check_vit, \
    fixed_input_size, pad_to_patch

INTERNALS = re.compile(r"\._pos_embed\(|strict_img_size|output_fmt|\.qkv\(|\.q_norm\(|patch_embed\.proj\(|"
                       r"\.patch_drop\(|\.norm_pre\(|\bFormat\.NHWC\b")


def tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0, **kwargs).eval()


def test_no_other_module_touches_timm_internals():
    package = Path(adclr.__file__).parent
    offenders = [f"{path.relative_to(package)}:{n}" for path in sorted(package.rglob("*.py")) if path.name != "vit.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if INTERNALS.search(line)]
    assert not offenders


def test_allow_any_input_size_matches_a_model_built_dynamic():
    fixed, dynamic = tiny_vit(), tiny_vit(dynamic_img_size=True)
    assert fixed_input_size(fixed) == (32, 32) and fixed_input_size(dynamic) is None
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        torch.testing.assert_close(allow_any_input_size(fixed).forward_features(x), dynamic.forward_features(x))
    assert fixed_input_size(fixed) is None


def test_any_input_size_restores_the_fixed_size_model():
    vit = tiny_vit()
    with any_input_size(vit):
        assert fixed_input_size(vit) is None
    assert fixed_input_size(vit) == (32, 32)
    with pytest.raises(AssertionError, match="doesn't match model"):
        vit.forward_features(torch.randn(1, 3, 24, 40))


def test_pad_to_patch_pads_right_and_bottom_with_zeros():
    x = torch.ones(1, 3, 9, 17)
    padded = pad_to_patch(tiny_vit(), x)
    assert padded.shape == (1, 3, 16, 24)
    assert padded[..., :9, :17].eq(1).all() and padded[..., 9:, :].eq(0).all() and padded[..., 17:].eq(0).all()


def test_checks_name_what_is_unsupported():
    with pytest.raises(TypeError, match="VisionTransformer"):
        check_vit(torch.nn.Sequential(tiny_vit()))
    with pytest.raises(TypeError, match=r"blocks\[0\] is ResPostBlock.*my reader"):
        check_standard_blocks(tiny_vit(block_fn=ResPostBlock).blocks, "my reader")
    check_standard_blocks(tiny_vit().blocks, "my reader")


def test_block_with_mask_is_the_block_forward_and_applies_the_mask():
    blk = tiny_vit().blocks[0]
    x = torch.randn(2, 6, blk.norm1.normalized_shape[0])
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[:4, 4:] = False  # the first four rows ignore the last two columns
    with torch.no_grad():
        assert torch.equal(block_with_mask(blk, x, None), blk(x))
        masked = block_with_mask(blk, x, mask)
        torch.testing.assert_close(masked, blk(x, attn_mask=mask), atol=1e-6, rtol=0)
        torch.testing.assert_close(masked[:, :4], blk(x[:, :4]), atol=1e-6, rtol=0)  # as if the columns were absent
        torch.testing.assert_close(masked[:, 4:], blk(x)[:, 4:], atol=1e-6, rtol=0)
        assert not torch.allclose(masked[:, :4], blk(x)[:, :4], atol=1e-3)
