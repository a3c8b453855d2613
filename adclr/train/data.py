"""Training data for ADCLR: DINO multi-crop views and query crops of the raw image (images come from `adclr.images`).

Views are cut from the decoded image as one uint8 tensor (torchvision's RandomResizedCrop, bicubic, antialiased) and
augmented together, all views of a kind in one batch (`photometric.DinoPhotometric`): per-view PIL transforms spent
most of a worker's time on call overhead. ``normalize=False`` returns uint8 views and query crops, a quarter of the
bytes to collate, pin and copy; the trainer then normalises on its device with `normalize_uint8`.

Every random draw goes through torch's generator (torchvision's transforms do too), so
``torch.manual_seed`` alone makes a sample reproducible, and DataLoader workers get distinct streams.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from ..errors import InvalidSettingError
from ..images import to_rgb
from .photometric import DinoPhotometric

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropAugmentation",
    "QueryCropSampler",
    "collate_multicrop",
    "normalize_uint8",
    "resized_crops",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Image.Image | torch.Tensor


def normalize_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> normalised float32: what ``normalize=False`` leaves to the trainer's device."""
    if images.dtype != torch.uint8 or images.ndim < 3 or images.shape[-3] != 3:
        raise InvalidSettingError(f"normalize_uint8 takes uint8 (..., 3, H, W) images, got {images.dtype} "
                                  f"{tuple(images.shape)}; views from MultiCropAugmentation(normalize=True) are "
                                  "normalised already")
    return TF.normalize(images.float().div_(255), list(mean), list(std))


def _finish(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], normalize: bool) -> torch.Tensor:
    """uint8 or [0, 1] float images -> normalised float32, or uint8 (rounded) when ``normalize`` is False."""
    if images.dtype == torch.uint8:
        return normalize_uint8(images, mean, std) if normalize else images
    if normalize:
        return TF.normalize(images.float(), list(mean), list(std))
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def _check_interval(name: str, interval: Sequence[float], low: float, high: float) -> tuple[float, float]:
    lo, hi = (float(v) for v in interval)
    if not low < lo <= hi <= high:
        raise InvalidSettingError(
            f"{name}={tuple(interval)} must satisfy {low} < min <= max <= {high}; pass e.g. {name}=(0.05, 0.25)"
        )
    return lo, hi


def _check_count(name: str, value: int, minimum: int) -> int:
    if value < minimum:
        raise InvalidSettingError(f"{name}={value} must be >= {minimum}")
    return int(value)


class QueryCropSampler:
    """Cuts r random crops from the original image: the ADCLR query patches shared by all views.

    Box sampling follows RandomResizedCrop (area fraction uniform in ``scale``, aspect ratio w/h
    log-uniform in ``ratio``) but never falls back to the whole image: a side longer than the image
    (only for images more elongated than about 3:1) is clamped to the image instead.
    ``normalize=False`` returns the crops as uint8 (see `normalize_uint8`).
    """

    def __init__(
        self,
        num_queries: int = 10,
        scale: Sequence[float] = (0.05, 0.25),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        size: int = 16,
        photometric: Callable[[Any], Any] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: InterpolationMode = InterpolationMode.BICUBIC,
        normalize: bool = True,
    ) -> None:
        self.num_queries = _check_count("num_queries", num_queries, 0)
        self.size = _check_count("size", size, 1)
        self.scale = _check_interval("scale", scale, 0.0, 1.0)
        self.ratio = _check_interval("ratio", ratio, 0.0, math.inf)
        self.photometric = photometric
        self.interpolation = interpolation
        self.mean, self.std, self.normalize = tuple(mean), tuple(std), normalize

    def sample_boxes(self, height: int, width: int) -> torch.Tensor:
        """(r, 4) float boxes x1, y1, x2, y2 in pixels, x2/y2 exclusive (PIL's crop convention)."""
        r = self.num_queries
        area = torch.empty(r).uniform_(*self.scale) * (height * width)
        aspect = torch.empty(r).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1])).exp()
        w = (area * aspect).sqrt().round().clamp(1, width)
        h = (area / aspect).sqrt().round().clamp(1, height)
        x1 = (torch.rand(r) * (width - w + 1)).floor()
        y1 = (torch.rand(r) * (height - h + 1)).floor()
        return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)

    def __call__(self, image: ImageLike) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL image (any mode) or (3, H, W) tensor (uint8, or float in [0, 1]) -> crops (r, 3, s, s), boxes (r, 4)."""
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise InvalidSettingError(
                    f"query crops need a (3, H, W) image tensor, got shape {tuple(image.shape)}; "
                    "repeat a gray channel with .expand(3, -1, -1) or pass a PIL image"
                )
        else:
            image = to_rgb(image)
        height, width = TF.get_size(image)
        boxes = self.sample_boxes(height, width)
        if not len(boxes):
            dtype = torch.float32 if self.normalize else torch.uint8
            return torch.empty(0, 3, self.size, self.size, dtype=dtype), boxes
        places = [(y1, x1, y2 - y1, x2 - x1) for x1, y1, x2, y2 in boxes.int().tolist()]  # top, left, height, width
        if isinstance(image, torch.Tensor):
            crops = resized_crops(image, places, self.size, self.interpolation)
        else:
            crops = [TF.resized_crop(image, *place, [self.size, self.size], self.interpolation) for place in places]
        if self.photometric is not None:
            crops = [self.photometric(crop) for crop in crops]
        if isinstance(crops, list):
            crops = torch.stack([TF.pil_to_tensor(c) if isinstance(c, Image.Image) else c.as_subclass(torch.Tensor)
                                 for c in crops])
        return _finish(crops, self.mean, self.std, self.normalize), boxes


class MultiCropAugmentation:
    """One image -> 2 global views, ``num_local`` local views and the query crops they all share.

    Views follow DINO: random resized crop (bicubic), flip, colour jitter (p=0.8), grayscale (p=0.2),
    Gaussian blur with p=1.0 / 0.1 / 0.5 for global 1 / global 2 / locals, solarize (p=0.2) on global 2
    (`photometric.DinoPhotometric`). Query crops come from the unaugmented image, normalised with the same
    mean/std; ``query_photometric`` gets each as a uint8 (3, q, q) tensor. ``normalize=False``: every output is uint8
    instead, for `normalize_uint8` on the trainer's device.
    Draws, in this order: query boxes, local boxes, local photometric, global boxes, global photometric.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        num_local: int = 8,
        global_scale: Sequence[float] = (0.25, 1.0),
        local_scale: Sequence[float] = (0.05, 0.25),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_queries: int = 10,
        query_size: int = 16,
        query_scale: Sequence[float] = (0.05, 0.25),
        query_photometric: Callable[[Any], Any] | None = None,
        normalize: bool = True,
    ) -> None:
        self.num_local = _check_count("num_local", num_local, 0)
        self.global_size = _check_count("global_size", global_size, 1)
        self.local_size = _check_count("local_size", local_size, 1)
        self.mean, self.std, self.normalize = tuple(mean), tuple(std), normalize

        def crop(size: int, scale: Sequence[float], name: str) -> v2.RandomResizedCrop:
            """torchvision's transform for its box draws only (`_crops` resizes): area in ``scale``, aspect 3/4-4/3."""
            return v2.RandomResizedCrop(size, scale=_check_interval(name, scale, 0.0, 1.0))

        self.global_crop = crop(global_size, global_scale, "global_scale")
        self.local_crop = crop(local_size, local_scale, "local_scale")
        self.global_photometric = DinoPhotometric(blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2))
        self.local_photometric = DinoPhotometric(blur_p=0.5)
        self.query_sampler = QueryCropSampler(num_queries, query_scale, size=query_size, photometric=query_photometric,
                                              mean=mean, std=std, normalize=normalize)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """-> {'global': (2, 3, G, G), 'local': (num_local, 3, L, L), 'queries': (r, 3, q, q)}."""
        pixels = TF.pil_to_tensor(to_rgb(image))
        queries, _ = self.query_sampler(pixels)
        local = torch.empty(0, 3, self.local_size, self.local_size)
        if self.num_local:
            local = self.local_photometric(self._crops(self.local_crop, pixels, self.num_local))
        global_ = self.global_photometric(self._crops(self.global_crop, pixels, 2))
        return {
            "global": _finish(global_, self.mean, self.std, self.normalize),
            "local": _finish(local, self.mean, self.std, self.normalize),
            "queries": queries,
        }

    @staticmethod
    def _crops(crop: v2.RandomResizedCrop, pixels: torch.Tensor, count: int) -> torch.Tensor:
        """``count`` boxes drawn by torchvision's RandomResizedCrop, cut from uint8 ``pixels`` -> float in [0, 1]."""
        boxes = [crop.make_params([pixels]) for _ in range(count)]
        places = [(box["top"], box["left"], box["height"], box["width"]) for box in boxes]
        return resized_crops(pixels, places, crop.size[0]).float().div_(255)


def resized_crops(image: torch.Tensor, places: Sequence[tuple[int, int, int, int]], size: int,
                  interpolation: InterpolationMode = InterpolationMode.BICUBIC) -> torch.Tensor:
    """(3, H, W) image, boxes as (top, left, height, width) -> (N, 3, size, size) crops of the image's dtype.

    torchvision's resized_crop for tensors (antialiased; on uint8 within 2 levels of PIL's resize of the box), with
    torch's interpolate called directly: torchvision's dispatch costs more than the resize at these sizes.
    """
    antialias = interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
    return torch.cat([F.interpolate(image[None, :, top:top + height, left:left + width], size=(size, size),
                                    mode=interpolation.value, antialias=antialias)
                      for top, left, height, width in places])


def collate_multicrop(samples: Sequence[dict[str, torch.Tensor]],
                      masks: Callable[[int], list[torch.Tensor]] | None = None) -> dict[str, Any]:
    """Per-image dicts -> {'global': 2 x (B, 3, G, G), 'local': num_local x (B, 3, L, L), 'queries': (B, r, 3, q, q)}.

    Views come out as lists so that a ViT can run each resolution as one batch, as DINO does.
    default_collate stacks into shared memory inside DataLoader workers, saving a copy. ``masks`` (iBOT, e.g.
    `ibot_masks.GlobalViewMasks`; bind it with functools.partial) adds 'masks': one (B, N) bool per global view.
    """
    if not samples:
        raise InvalidSettingError("collate_multicrop got an empty batch; use a DataLoader with batch_size >= 1")

    def per_view(key: str) -> list[torch.Tensor]:
        return [default_collate([s[key][v] for s in samples]) for v in range(len(samples[0][key]))]

    batch = {
        "global": per_view("global"),
        "local": per_view("local"),
        "queries": default_collate([s["queries"] for s in samples]),
    }
    if masks is not None:
        batch["masks"] = masks(len(samples))
    return batch
