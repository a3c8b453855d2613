"""ADCLR backbones registered with timm.

The backbones are plain timm `VisionTransformer`s (ADCLR adds no parameters), so every timm feature works on them:
`features_only`, `forward_intermediates`, `dynamic_img_size`, `img_size`/`patch_size` overrides. Pretrained cfgs are
generated from the weights manifest; `pretrained=True` resolves the manifest entry, downloads and verifies the file
(`adclr.weights`), then hands timm a local file so that its usual filter and adaptation path loads it.
"""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import checkpoint_filter_fn

from .errors import WeightsUnavailableError
from .manifest import WeightsEntry, load_manifest
from .weights import embedded_path, fetch_verified

#: The timm built-in architecture of each ADCLR arch: exported folders name it (with the exact dims as model_args),
#: so plain timm loads them through `hf-hub:` / `local-dir:` without adclr installed.
TIMM_EQUIVALENT: dict[str, str] = {
    "adclr_vit_tiny": "vit_tiny_patch16_224",
    "adclr_vit_small": "vit_small_patch16_224",
    "adclr_vit_base": "vit_base_patch16_224",
    "adclr_vit_mini_patch8": "vit_tiny_patch16_224",
}

#: Pretrained-cfg fields that differ from the ImageNet 224 px defaults, per arch.
ARCH_CFG: dict[str, dict[str, Any]] = {
    "adclr_vit_mini_patch8": dict(input_size=(3, 64, 64), crop_pct=1.0),
}

MANIFEST: dict[str, WeightsEntry] = load_manifest()


def _cfg(**kwargs) -> dict[str, Any]:
    return {
        "num_classes": 0,
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "paper_ids": "arXiv:2306.13337",
        "paper_name": "Patch-Level Contrasting without Patch Correspondence for Accurate and Dense Contrastive "
                      "Representation Learning",
        **kwargs,
    }


def _entry_cfg(entry: WeightsEntry) -> dict[str, Any]:
    """The cfg names the weights' source (the packaged file, or the pinned Hub file) so that timm counts the entry as
    pretrained (`has_weights`, `list_pretrained`); loading still goes through `fetch_verified`."""
    source = dict(file=str(embedded_path(entry))) if entry.embedded else dict(
        hf_hub_id=f"{entry.hf_hub_id}@{entry.revision}", hf_hub_filename=entry.filename)
    return _cfg(**ARCH_CFG.get(entry.arch, {}), **source, license=entry.license,
                description=entry.description or None)


def _default_cfgs() -> dict[str, dict[str, Any]]:
    """Manifest entries first (the first tag of an arch is its default), then a weightless cfg per remaining arch."""
    cfgs = {name: _entry_cfg(entry) for name, entry in MANIFEST.items() if entry.arch in TIMM_EQUIVALENT}
    with_weights = {entry.arch for entry in MANIFEST.values()}
    cfgs.update({arch: _cfg(**ARCH_CFG.get(arch, {}), license="apache-2.0")
                 for arch in TIMM_EQUIVALENT if arch not in with_weights})
    return cfgs


default_cfgs = generate_default_cfgs(_default_cfgs())


def tags_of(arch: str) -> list[str]:
    return [entry.tag for entry in MANIFEST.values() if entry.arch == arch]


def manifest_entry(arch: str, tag: str | None) -> WeightsEntry:
    """The manifest entry that `pretrained=True` means for `arch[.tag]`; a clear error when there is none."""
    tags = tags_of(arch)
    if not tags:
        raise WeightsUnavailableError(
            f"No published weights for {arch}: the weights manifest lists none. Use pretrained=False, train your own "
            f"(`adclr train --arch {arch} ...`), or convert a checkpoint (`adclr convert`) and load it with "
            f"timm.create_model('{arch}', pretrained=True, pretrained_cfg_overlay=dict(file=PATH)).")
    tag = tag or tags[0]
    if tag not in tags:
        raise WeightsUnavailableError(f"Unknown pretrained tag '{tag}' for {arch}; known tags: {', '.join(tags)}.")
    return MANIFEST[f"{arch}.{tag}"]


def _local_weights_overlay(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Download and verify the manifest file unless the caller already pointed timm at local weights."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    if overlay.get("file") or overlay.get("state_dict"):
        return overlay
    cfg = kwargs.get("pretrained_cfg")
    if isinstance(cfg, dict):
        return overlay  # an explicit cfg dict names its own source; timm resolves it
    entry = manifest_entry(variant, cfg)
    overlay["file"] = str(fetch_verified(entry))
    return overlay


def _create_adclr_vit(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = _local_weights_overlay(variant, kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


@register_model
def adclr_vit_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ADCLR ViT-Ti/16: for experiments and smoke runs."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_adclr_vit("adclr_vit_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def adclr_vit_mini_patch8(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ADCLR ViT-Ti width, 6 blocks, patch 8 at 64 px: the CPU-sized study model (and the embedded demo model)."""
    model_args = dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3)
    return _create_adclr_vit("adclr_vit_mini_patch8", pretrained, **dict(model_args, **kwargs))


@register_model
def adclr_vit_small(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ADCLR ViT-S/16 (the paper's ADCLR-DINO backbone)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_adclr_vit("adclr_vit_small", pretrained, **dict(model_args, **kwargs))


@register_model
def adclr_vit_base(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ADCLR ViT-B/16 (the paper's ADCLR-iBOT backbone)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_adclr_vit("adclr_vit_base", pretrained, **dict(model_args, **kwargs))
