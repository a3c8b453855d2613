"""Semantic segmentation on the ViT pyramid: the lightest FPN head that uses every level."""
import torch
import torch.nn.functional as F
from torch import nn

from adclr.detection.pyramid import SimpleFeaturePyramid


class SegmentationHead(nn.Module):
    """Pyramid levels upsampled to the finest one and summed, a 1x1 conv to classes, logits at input size.

    Owns the pyramid, so `forward(images)` returns (B, num_classes, H, W); the 'pool' level is not used.
    """

    def __init__(self, pyramid: SimpleFeaturePyramid, num_classes: int) -> None:
        super().__init__()
        if not isinstance(pyramid, SimpleFeaturePyramid):
            raise TypeError(f'SegmentationHead needs a SimpleFeaturePyramid, got {type(pyramid).__name__}; '
                            'wrap the ViT first: SegmentationHead(SimpleFeaturePyramid(vit), num_classes)')
        self.pyramid = pyramid
        self.levels = [name for name in pyramid.strides if name != 'pool']
        self.classifier = nn.Conv2d(pyramid.out_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.pyramid(x)
        finest = feats[self.levels[0]]
        fused = sum(F.interpolate(feats[k], size=finest.shape[-2:], mode='bilinear', align_corners=False)
                    for k in self.levels)
        logits = self.classifier(fused)
        # the pyramid padded the input right/bottom: upsample to the padded size, then crop the padding off
        stride = self.pyramid.strides[self.levels[0]]
        padded = (finest.shape[-2] * stride, finest.shape[-1] * stride)
        logits = F.interpolate(logits, size=padded, mode='bilinear', align_corners=False)
        return logits[..., :x.shape[-2], :x.shape[-1]]
