"""Training data for ADCLR: DINO multi-crop views and query crops of the raw image (images come from `adclr.images`).

Every random draw goes through torch's generator (torchvision's transforms do too), so
``torch.manual_seed`` alone makes a sample reproducible, and DataLoader workers get distinct streams.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from ..errors import InvalidSettingError
from ..images import to_rgb

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropAugmentation",
    "QueryCropSampler",
    "collate_multicrop",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Image.Image | torch.Tensor


def _normalizer(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """PIL / uint8 / [0, 1] float image -> normalised float32 tensor; shared by views and queries."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


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
    ) -> None:
        self.num_queries = _check_count("num_queries", num_queries, 0)
        self.size = _check_count("size", size, 1)
        self.scale = _check_interval("scale", scale, 0.0, 1.0)
        self.ratio = _check_interval("ratio", ratio, 0.0, math.inf)
        self.photometric = photometric
        self.interpolation = interpolation
        self.normalize = _normalizer(mean, std)

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
        crops = [self._crop(image, box) for box in boxes.tolist()]
        if not crops:
            return torch.empty(0, 3, self.size, self.size), boxes
        return torch.stack(crops), boxes

    def _crop(self, image: ImageLike, box: list[float]) -> torch.Tensor:
        x1, y1, x2, y2 = (int(v) for v in box)
        crop = TF.resized_crop(image, y1, x1, y2 - y1, x2 - x1, [self.size, self.size], self.interpolation)
        if self.photometric is not None:
            crop = self.photometric(crop)
        return self.normalize(crop).as_subclass(torch.Tensor)


def _photometric(blur_p: float, solarize_p: float = 0.0) -> list[v2.Transform]:
    """DINO's per-view photometric set; only the blur and solarize probabilities differ between views."""
    sigma = (0.1, 2.0)
    steps: list[v2.Transform] = [
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        # kernel covers +-3 sigma of the largest sigma
        v2.RandomApply([v2.GaussianBlur(kernel_size=2 * math.ceil(3 * sigma[1]) + 1, sigma=sigma)], p=blur_p),
    ]
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    return steps


class MultiCropAugmentation:
    """One image -> 2 global views, ``num_local`` local views and the query crops they all share.

    Views follow DINO: random resized crop (bicubic), flip, colour jitter (p=0.8), grayscale (p=0.2),
    Gaussian blur with p=1.0 / 0.1 / 0.5 for global 1 / global 2 / locals, solarize (p=0.2) on global 2.
    Query crops come from the unaugmented image, normalised with the same mean/std.
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
    ) -> None:
        self.num_local = _check_count("num_local", num_local, 0)
        self.global_size = _check_count("global_size", global_size, 1)
        self.local_size = _check_count("local_size", local_size, 1)
        normalize = _normalizer(mean, std)

        def view(size: int, scale: Sequence[float], name: str, **photometric: float) -> v2.Compose:
            scale = _check_interval(name, scale, 0.0, 1.0)
            crop = v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC)
            return v2.Compose([crop, *_photometric(**photometric), normalize])

        self.global_views = [
            view(global_size, global_scale, "global_scale", blur_p=1.0),
            view(global_size, global_scale, "global_scale", blur_p=0.1, solarize_p=0.2),
        ]
        self.local_view = view(local_size, local_scale, "local_scale", blur_p=0.5)
        self.query_sampler = QueryCropSampler(
            num_queries, query_scale, size=query_size, photometric=query_photometric, mean=mean, std=std
        )

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """-> {'global': (2, 3, G, G), 'local': (num_local, 3, L, L), 'queries': (r, 3, q, q)}."""
        image = to_rgb(image)
        queries, _ = self.query_sampler(image)
        local = torch.empty(0, 3, self.local_size, self.local_size)
        if self.num_local:
            local = torch.stack([self.local_view(image) for _ in range(self.num_local)]).as_subclass(torch.Tensor)
        return {
            "global": torch.stack([view(image) for view in self.global_views]).as_subclass(torch.Tensor),
            "local": local,
            "queries": queries,
        }


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
