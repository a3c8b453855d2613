"""torchvision Faster/Mask R-CNN on the ViT pyramid, with anchors and RoI pooling matched to its levels."""
import inspect
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from adclr.detection.pyramid import SimpleFeaturePyramid

PYRAMID_ARGS = frozenset(inspect.signature(SimpleFeaturePyramid).parameters) - {'backbone'}
ANCHORS_PER_STRIDE = 8  # stride 4 -> 32 px ... stride 64 -> 512 px, torchvision's FPN sizes


def _pyramid(backbone: str | VisionTransformer | SimpleFeaturePyramid, kw: dict[str, Any]) -> SimpleFeaturePyramid:
    pyramid_kw = {k: kw.pop(k) for k in list(kw) if k in PYRAMID_ARGS}
    if not isinstance(backbone, SimpleFeaturePyramid):
        return SimpleFeaturePyramid(backbone, **pyramid_kw)
    if pyramid_kw:
        raise ValueError(f'{sorted(pyramid_kw)} configure a new pyramid, but a built SimpleFeaturePyramid was '
                         'passed; set them when building it or pass the ViT instead')
    return backbone


def _detector(cls: type[FasterRCNN], backbone, num_classes: int | None, kw: dict[str, Any]) -> FasterRCNN:
    pyramid = _pyramid(backbone, kw)
    levels = [name for name in pyramid.strides if name != 'pool']
    sizes = tuple((ANCHORS_PER_STRIDE * s,) for s in pyramid.strides.values())
    kw.setdefault('rpn_anchor_generator', AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)))
    kw.setdefault('box_roi_pool', MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2))
    if cls is MaskRCNN:
        kw.setdefault('mask_roi_pool', MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2))
    cfg = getattr(pyramid.backbone, 'pretrained_cfg', None) or {}  # normalise as the ViT was pretrained
    kw.setdefault('image_mean', list(cfg.get('mean', IMAGENET_DEFAULT_MEAN)))
    kw.setdefault('image_std', list(cfg.get('std', IMAGENET_DEFAULT_STD)))
    kw.setdefault('min_size', 800)
    kw.setdefault('max_size', 1333)
    return cls(pyramid, num_classes=num_classes, **kw)


def faster_rcnn(backbone: str | VisionTransformer | SimpleFeaturePyramid = 'adclr_vit_small',
                num_classes: int | None = 91, **kw: Any) -> FasterRCNN:
    """Faster R-CNN; keyword args naming SimpleFeaturePyramid options build the pyramid, the rest go to FasterRCNN."""
    return _detector(FasterRCNN, backbone, num_classes, kw)


def mask_rcnn(backbone: str | VisionTransformer | SimpleFeaturePyramid = 'adclr_vit_small',
              num_classes: int | None = 91, **kw: Any) -> MaskRCNN:
    """Mask R-CNN; keyword args naming SimpleFeaturePyramid options build the pyramid, the rest go to MaskRCNN."""
    return _detector(MaskRCNN, backbone, num_classes, kw)
