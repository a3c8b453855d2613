"""The registered ADCLR archs are plain timm ViTs with everything timm's own ViTs offer."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import adclr  # noqa: F401


def test_listed_with_timm():
    assert {"adclr_vit_tiny", "adclr_vit_small", "adclr_vit_base",
            "adclr_vit_mini_patch8"} <= set(timm.list_models("adclr*"))


@pytest.mark.parametrize("arch, reference", [
    ("adclr_vit_small", "vit_small_patch16_224"),
    ("adclr_vit_base", "vit_base_patch16_224"),
])
def test_same_parameters_as_timm_vit_without_head(arch, reference):
    ours = timm.create_model(arch)
    theirs = timm.create_model(reference, num_classes=0)
    assert type(ours) is timm.models.VisionTransformer
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.num_classes == 0
    assert tuple(ours.pretrained_cfg["mean"]) == IMAGENET_DEFAULT_MEAN
    assert tuple(ours.pretrained_cfg["std"]) == IMAGENET_DEFAULT_STD


def test_features_only_and_forward_intermediates():
    model = timm.create_model("adclr_vit_tiny", depth=4, features_only=True, out_indices=(1, 3))
    feats = model(torch.randn(2, 3, 224, 224))
    assert [f.shape for f in feats] == [torch.Size([2, 192, 14, 14])] * 2
    vit = timm.create_model("adclr_vit_tiny", depth=4)
    final, inter = vit.forward_intermediates(torch.randn(1, 3, 224, 224), indices=[0, 2])
    assert final.shape == (1, 197, 192) and [t.shape for t in inter] == [torch.Size([1, 192, 14, 14])] * 2


def test_dynamic_img_size_and_overrides():
    vit = timm.create_model("adclr_vit_tiny", depth=2, dynamic_img_size=True).eval()
    assert vit.forward_features(torch.randn(1, 3, 160, 96)).shape == (1, 1 + 10 * 6, 192)
    small = timm.create_model("adclr_vit_tiny", depth=2, img_size=64, patch_size=8)
    assert small.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 1 + 64, 192)


def test_pretrained_without_published_weights_says_so():
    with pytest.raises(RuntimeError,
                       match="No published weights for adclr_vit_base.*adclr train.*pretrained_cfg_overlay"):
        timm.create_model("adclr_vit_base", pretrained=True)


def test_local_file_overlay_goes_through_the_checkpoint_filter(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("adclr_vit_tiny", depth=1).eval()
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), path)
    loaded = timm.create_model("adclr_vit_tiny", depth=1, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(source(x), loaded(x))
    # the same file at another resolution: timm's filter resamples the position embedding
    bigger = timm.create_model("adclr_vit_tiny", depth=1, img_size=288, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    assert bigger.pos_embed.shape == (1, 1 + 18 * 18, 192)
    assert torch.equal(bigger.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_embedded_weights_count_as_pretrained_and_load():
    from safetensors.torch import load_file

    from adclr.weights import embedded_path

    assert timm.list_pretrained("adclr*") == ["adclr_vit_mini_patch8.demo"]  # the only entry of the packaged manifest
    assert timm.models.get_pretrained_cfg("adclr_vit_mini_patch8.demo").has_weights
    assert not timm.models.get_pretrained_cfg("adclr_vit_small").has_weights
    model = timm.create_model("adclr_vit_mini_patch8.demo", pretrained=True)
    expected = load_file(embedded_path(adclr.models.MANIFEST["adclr_vit_mini_patch8.demo"]))
    state = model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())
