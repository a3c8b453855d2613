"""ViT backbones inside detectors: ViTDet pyramid, torchvision builders, fine-tuning helpers.

The detectron2 and mmdet shims are separate modules (`adclr.detection.detectron2_backbone`,
`adclr.detection.mmdet_backbone`), imported only when asked for because they need those frameworks.
"""
from adclr.detection.builders import faster_rcnn, mask_rcnn
from adclr.detection.d2_keys import detectron2_to_timm, timm_to_detectron2
from adclr.detection.layer_decay import param_groups_lrd, vit_layer_id
from adclr.detection.pyramid import SimpleFeaturePyramid
from adclr.detection.segmentation import SegmentationHead

__all__ = ['SimpleFeaturePyramid', 'faster_rcnn', 'mask_rcnn', 'param_groups_lrd', 'vit_layer_id',
           'detectron2_to_timm', 'timm_to_detectron2', 'SegmentationHead']
