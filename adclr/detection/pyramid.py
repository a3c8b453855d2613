"""ViTDet simple feature pyramid: stride-4..64 maps from a plain stride-16 ViT.

FPN-style detectors expect a multi-scale pyramid; a plain ViT has one stride. Following ViTDet (Li et al.,
2022), the last block's map is deconvolved, kept or max-pooled to each stride, so no hierarchical backbone
and no change to the pretrained ViT is needed. The multi-layer variant reads one block per scale instead.
"""
import math
from collections import OrderedDict
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from adclr.detection.layer_decay import vit_layer_id
from adclr.vit import allow_any_input_size, check_vit, pad_to_patch

NORMS = ('LN', '')


def _norm(kind: str, channels: int) -> nn.Module:
    """LayerNorm over channels (ViTDet's choice: detection batches are too small for BatchNorm)."""
    return LayerNorm2d(channels, eps=1e-6) if kind == 'LN' else nn.Identity()


def _resize(dim: int, scale: float, norm: str) -> tuple[nn.Module, int]:
    """Deconvolutions (scale > 1, each halving channels), identity (1) or max-pool (< 1); returns op and channels."""
    steps = round(math.log2(scale))
    if steps >= 0:
        layers: list[nn.Module] = []
        for i in range(steps):
            if i:
                layers += [_norm(norm, dim), nn.GELU()]
            layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
            dim //= 2
        return nn.Sequential(*layers), dim
    return nn.MaxPool2d(kernel_size=2 ** -steps, stride=2 ** -steps), dim


def _stage(dim: int, scale: float, out_channels: int, norm: str) -> nn.Sequential:
    resize, channels = _resize(dim, scale, norm)
    bias = not norm
    stage = nn.Sequential(
        resize,
        nn.Conv2d(channels, out_channels, kernel_size=1, bias=bias), _norm(norm, out_channels),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=bias), _norm(norm, out_channels),
    )
    for m in stage.modules():
        if type(m) is nn.Conv2d:
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return stage


def _as_dynamic_vit(backbone: str | VisionTransformer) -> VisionTransformer:
    """A timm ViT that accepts any patch-multiple input size (pos-embed resampled per call)."""
    if isinstance(backbone, str):
        backbone = timm.create_model(backbone, pretrained=False, dynamic_img_size=True)
    check_vit(backbone)
    ph, pw = backbone.patch_embed.patch_size
    if ph != pw:
        raise ValueError(f'the pyramid needs square patches, the ViT has {ph}x{pw}; use a square patch size')
    if not isinstance(backbone.patch_drop, nn.Identity):
        raise ValueError('patch dropout removes tokens, so no dense map can be formed; create the ViT with '
                         'patch_drop_rate=0')
    return allow_any_input_size(backbone)


def _layer_indices(depth: int, levels: int, multi_layer: bool, given: Sequence[int] | None) -> list[int]:
    if given is None:  # 12 blocks, 4 levels -> 2, 5, 8, 11
        return [(k + 1) * depth // levels - 1 for k in range(levels)] if multi_layer else [depth - 1]
    want = levels if multi_layer else 1
    indices = [i + depth if i < 0 else i for i in given]
    if len(indices) != want or not all(0 <= i < depth for i in indices):
        raise ValueError(f'layer_indices={list(given)} must name {want} block(s) of the {depth}-block ViT '
                         f"({'one per scale factor' if multi_layer else 'single-layer mode reads one block'})")
    if indices != sorted(set(indices)):
        raise ValueError(f'layer_indices={list(given)} must increase: the finest scale reads the earliest block')
    return indices


class SimpleFeaturePyramid(nn.Module):
    """ViTDet adapter: OrderedDict {'0','1',...,'pool'} of (B, out_channels, H/s, W/s) maps, finest first.

    Drop-in torchvision detection backbone (has `out_channels`). The ViT is trimmed to what the pyramid reads
    (later blocks, final norm and head are removed) so DDP finds no unused parameters. Inputs of any size are
    zero-padded on the right/bottom to the patch multiple; `strides` gives each level's stride in pixels.
    `freeze_blocks=N` freezes the stem (patch_embed, tokens, pos_embed) and blocks 0..N-1.
    """

    def __init__(
            self,
            backbone: str | VisionTransformer,
            out_channels: int = 256,
            scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
            top_block: bool = True,
            multi_layer: bool = False,
            layer_indices: Sequence[int] | None = None,
            freeze_backbone: bool = False,
            freeze_blocks: int = 0,
            grad_checkpointing: bool = False,
            norm: str = 'LN',
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not supported; use 'LN' (ViTDet) or '' (no norm, conv bias)")
        vit = _as_dynamic_vit(backbone)
        patch = vit.patch_embed.patch_size[0]
        scales = [float(s) for s in scale_factors]
        for s in scales:
            power_of_two = s > 0 and 2 ** round(math.log2(s)) == s
            if not power_of_two or (patch / s) % 1 or vit.embed_dim % max(s, 1):
                raise ValueError(f'scale factor {s} must be a power of two that divides the patch size {patch} '
                                 f'into an integer stride and the width {vit.embed_dim} into channels')
        if scales != sorted(set(scales), reverse=True):
            raise ValueError(f'scale_factors={tuple(scale_factors)} must decrease (finest level first)')
        self.layer_indices = _layer_indices(len(vit.blocks), len(scales), multi_layer, layer_indices)
        vit.prune_intermediate_layers(self.layer_indices, prune_norm=True, prune_head=True)
        if not 0 <= freeze_blocks <= len(vit.blocks):
            raise ValueError(f'freeze_blocks={freeze_blocks} must lie in 0..{len(vit.blocks)} (blocks in use)')
        for name, p in vit.named_parameters():
            if freeze_backbone or (freeze_blocks and vit_layer_id(name, len(vit.blocks)) <= freeze_blocks):
                p.requires_grad_(False)
        if grad_checkpointing:
            vit.set_grad_checkpointing(True)

        self.backbone = vit
        self.patch_size = patch
        self.out_channels = out_channels
        self.freeze_backbone = freeze_backbone
        self.top_block = top_block
        self.stages = nn.ModuleList(_stage(vit.embed_dim, s, out_channels, norm) for s in scales)
        self.strides: OrderedDict[str, int] = OrderedDict((str(i), int(patch / s)) for i, s in enumerate(scales))
        if top_block:
            self.strides['pool'] = 2 * self.strides[str(len(scales) - 1)]

    def train(self, mode: bool = True) -> 'SimpleFeaturePyramid':
        """A frozen backbone stays in eval mode (no dropout / drop-path noise in features it cannot adapt)."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        maps = self.backbone.forward_intermediates(pad_to_patch(self.backbone, x), indices=self.layer_indices,
                                                   intermediates_only=True)
        if len(maps) == 1:
            maps = maps * len(self.stages)
        out = OrderedDict((str(i), stage(m)) for i, (stage, m) in enumerate(zip(self.stages, maps)))
        if self.top_block:  # stride-2 subsample of the coarsest level, as torchvision's LastLevelMaxPool
            out['pool'] = F.max_pool2d(out[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return out
