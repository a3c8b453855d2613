"""mmdet 3.x backbone; importing this module requires mmdet and registers the class in mmdet's MODELS.

In a config:
    custom_imports = dict(imports=['adclr.detection.mmdet_backbone'], allow_failed_imports=False)
    model = dict(backbone=dict(type='ADCLRSimpleFeaturePyramid', backbone='adclr_vit_small', out_channels=256),
                 neck=None, ...)  # rpn_head in_channels=256, anchor strides [4, 8, 16, 32, 64]
"""
from typing import Any

import torch

try:
    from mmdet.registry import MODELS
    from mmengine.model import BaseModule
except ImportError as err:
    raise ImportError(
        'adclr.detection.mmdet_backbone needs mmdet 3.x: pip install -U openmim && '
        "mim install mmengine 'mmcv>=2.0.0rc4,<2.2.0' 'mmdet>=3.0.0', or use adclr.detection.faster_rcnn / "
        'mask_rcnn (torchvision) instead') from err

from adclr.detection.pyramid import SimpleFeaturePyramid


@MODELS.register_module()
class ADCLRSimpleFeaturePyramid(BaseModule):
    """SimpleFeaturePyramid as an mmdet backbone: a tuple of maps, finest first; keyword args are the pyramid's."""

    def __init__(self, backbone: Any = 'adclr_vit_small', init_cfg: dict | None = None, **pyramid_kw: Any) -> None:
        super().__init__(init_cfg=init_cfg)
        self.pyramid = SimpleFeaturePyramid(backbone, **pyramid_kw)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.pyramid(x).values())
