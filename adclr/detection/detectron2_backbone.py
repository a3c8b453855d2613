"""detectron2 backbone for ViTDet LazyConfigs; importing this module requires detectron2.

    from adclr.detection.detectron2_backbone import ADCLRViTDetBackbone
    model.backbone = L(ADCLRViTDetBackbone)(backbone='adclr_vit_base', out_channels=256)

Outputs 'p2'..'p6' (named by log2 of the stride), as detectron2's own ViTDet configs expect.
"""
import math
from typing import Any

import torch

try:
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import Backbone
except ImportError as err:
    raise ImportError(
        'adclr.detection.detectron2_backbone needs detectron2, which has no PyPI wheel: install it with '
        "pip install 'git+https://github.com/facebookresearch/detectron2.git' (builds against your torch), "
        'or use adclr.detection.faster_rcnn / mask_rcnn (torchvision) instead') from err

from adclr.detection.pyramid import SimpleFeaturePyramid


class ADCLRViTDetBackbone(Backbone):
    """SimpleFeaturePyramid behind detectron2's Backbone interface; keyword args are the pyramid's."""

    def __init__(self, backbone: Any = 'adclr_vit_small', **pyramid_kw: Any) -> None:
        super().__init__()
        self.pyramid = SimpleFeaturePyramid(backbone, **pyramid_kw)
        self._names = {k: f'p{int(math.log2(s))}' for k, s in self.pyramid.strides.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self._names[k]: v for k, v in self.pyramid(x).items()}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {self._names[k]: ShapeSpec(channels=self.pyramid.out_channels, stride=s)
                for k, s in self.pyramid.strides.items()}

    @property
    def size_divisibility(self) -> int:
        """Largest pyramid stride before the top block, as detectron2's ViTDet pads."""
        return max(s for k, s in self.pyramid.strides.items() if k != 'pool')
