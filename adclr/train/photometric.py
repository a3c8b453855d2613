"""DINO's photometric augmentations applied to a batch of views at once, each view with its own random draws.

Per view, in DINO's order: horizontal flip (p=0.5); colour jitter (p=0.8: brightness 0.4, contrast 0.4, saturation
0.2, hue 0.1, the four in a random order); grayscale (p=0.2); Gaussian blur (p=``blur_p``, sigma uniform in 0.1-2.0,
13-tap kernel, reflect padding); solarize (p=``solarize_p``, pixels >= 128/255 inverted). The operations follow
torchvision's tensor definitions (ITU-R 601 luma for gray and contrast, a hexcone HSV hue shift) on float images in
[0, 1]. At the sizes of multi-crop views (16-224 px) the per-call overhead, not the arithmetic, is what costs, so
one call does for all views what torchvision does one view and one operation at a time: brightness, contrast and
saturation are one blend ``clamp(f x + (1 - f) t)`` (t = 0, the mean luma, the luma image), so each step of the
random jitter order is one blend over every view (f = 1 where a view does something else) plus a hue shift of the
views whose step it is. Every draw goes through torch's generator, the same draws per call whatever is applied, so
``torch.manual_seed`` fixes the result.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidSettingError

__all__ = ["DinoPhotometric", "adjust_hue", "blend", "gaussian_blur", "grayscale", "solarize"]

LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
SOLARIZE_THRESHOLD = 128 / 255
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # the colour-jitter operations, as numbered in the random order


def _per_view(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def grayscale(views: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    return (views * views.new_tensor(LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def blend(views: Tensor, factor: Tensor, operation: Tensor) -> Tensor:
    """Brightness, contrast or saturation per view: ``clamp(f x + (1 - f) t, 0, 1)``, as torchvision defines them.

    ``operation`` (N,) holds BRIGHTNESS (t = 0), CONTRAST (t = the view's mean luma) or SATURATION (t = its luma
    image); ``factor`` (N,) is f. Computed as ``f x + c1 luma + c0`` with per-view c1, c0: three passes over the views.
    """
    luma = grayscale(views)
    factor = _per_view(factor.to(views.dtype))
    to_luma = (1 - factor) * _per_view(operation == SATURATION)
    to_mean = (1 - factor) * _per_view(operation == CONTRAST) * luma.mean(dim=(1, 2, 3), keepdim=True)
    return torch.addcmul(to_mean, views, factor).add_(luma * to_luma).clamp_(0, 1)


def adjust_hue(views: Tensor, shift: Tensor) -> Tensor:
    """Rotate each view's HSV hue by ``shift`` (N,) turns (in [-0.5, 0.5]); value and saturation are kept."""
    red, green, blue = views.unbind(1)
    value = views.amax(dim=1)
    chroma = value - views.amin(dim=1)
    sector = torch.where(value == red, green - blue,
                         torch.where(value == green, 2 * chroma + blue - red, 4 * chroma + red - green))
    # hue in sixths of a turn, shifted: 6 H = sector / C + 6 shift
    hue6 = sector.div_(chroma.clamp(min=torch.finfo(views.dtype).tiny)).add_(6 * shift.to(views.dtype).view(-1, 1, 1))
    # hexcone HSV -> RGB: channel n of (R, G, B) = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6, n = 5, 3, 1
    k = hue6.unsqueeze(1).add(views.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)).remainder_(6)
    return torch.minimum(k, 4 - k).clamp_(0, 1).mul_(-chroma.unsqueeze(1)).add_(value.unsqueeze(1))


def gaussian_blur(views: Tensor, sigma: Tensor, kernel_size: int = 13) -> Tensor:
    """Gaussian blur with one sigma per view: torchvision's kernel and reflect border, as two banded matrices.

    Blurring rows then columns is ``B X B^T`` with B (size x size) the kernel on each row's band and the reflected
    border folded in: two batched matmuls, cheaper at view sizes than a depthwise convolution per view and channel.
    """
    offsets = torch.arange(kernel_size, device=views.device) - kernel_size // 2
    kernel = torch.exp(-0.5 * (offsets.to(views.dtype) / sigma.to(views).view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (N, k)

    def banded(size: int) -> Tensor:
        source = (torch.arange(size, device=views.device).view(-1, 1) + offsets).abs()  # reflect at 0 ...
        source = torch.where(source >= size, 2 * (size - 1) - source, source)  # ... and at size - 1
        matrix = views.new_zeros(len(views), size, size)
        return matrix.scatter_add_(2, source.expand(len(views), -1, -1), kernel.view(-1, 1, kernel_size).expand(
            -1, size, -1)).unsqueeze(1)  # (N, 1, size, size)

    height, width = views.shape[-2:]
    if min(height, width) <= kernel_size // 2:
        raise InvalidSettingError(f"cannot blur {height}x{width} px views with a {kernel_size}-tap kernel (reflected "
                                  f"border); use views of at least {kernel_size // 2 + 1} px")
    rows = banded(height)
    return rows @ views @ (rows if width == height else banded(width)).transpose(-1, -2)


def solarize(views: Tensor) -> Tensor:
    return torch.where(views >= SOLARIZE_THRESHOLD, 1 - views, views)


@dataclass(frozen=True)
class DinoPhotometric:
    """One view type's photometric set; only the blur and solarize probabilities differ between DINO's views.

    ``blur_p`` and ``solarize_p`` may be tuples, one probability per view (DINO's two global views differ in both).
    """

    blur_p: float | tuple[float, ...]
    solarize_p: float | tuple[float, ...] = 0.0
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    sigma: tuple[float, float] = (0.1, 2.0)

    @property
    def kernel_size(self) -> int:
        """Covers +-3 sigma of the largest sigma."""
        return 2 * math.ceil(3 * self.sigma[1]) + 1

    def __call__(self, views: Tensor) -> Tensor:
        """(N, 3, H, W) float in [0, 1] -> augmented views, same shape (a new tensor; the input is not changed)."""
        n = len(views)
        blur_p, solarize_p = _per_view_list(self.blur_p, n, "blur_p"), _per_view_list(self.solarize_p, n, "solarize_p")
        # One call draws each view's 14 numbers, whatever gets applied; plain Python then picks the views per operation
        draws = torch.rand(n, 14).tolist()
        spans = ((1 - self.brightness, 1 + self.brightness), (1 - self.contrast, 1 + self.contrast),
                 (1 - self.saturation, 1 + self.saturation), (-self.hue, self.hue))
        factors = [[low + (high - low) * d[6 + op] for op, (low, high) in enumerate(spans)] for d in draws]
        orders = [sorted(range(4), key=d[2:6].__getitem__) if d[1] < self.jitter_p else [] for d in draws]
        sigma = [self.sigma[0] + (self.sigma[1] - self.sigma[0]) * d[12] for d in draws]
        flip = [v for v, d in enumerate(draws) if d[0] < self.flip_p]
        gray = [v for v, d in enumerate(draws) if d[10] < self.grayscale_p]
        blur = [v for v, d in enumerate(draws) if d[11] < blur_p[v]]
        solar = [v for v, d in enumerate(draws) if d[13] < solarize_p[v]]

        views = _apply_to(views.clone(), flip, lambda x, _: x.flip(-1))
        for step in range(4):
            operation = [order[step] if order else None for order in orders]
            blended = [v for v, op in enumerate(operation) if op not in (None, HUE)]
            if blended:  # one pass over every view, f = 1 (an exact no-op) for the others: cheaper than indexing
                factor, kind = [1.0] * n, [BRIGHTNESS] * n
                for v in blended:
                    factor[v], kind[v] = factors[v][operation[v]], operation[v]
                views = blend(views, torch.tensor(factor), torch.tensor(kind))
            hued = [v for v, op in enumerate(operation) if op == HUE]
            views = _apply_to(views, hued, lambda x, chosen: adjust_hue(
                x, torch.tensor([factors[v][HUE] for v in chosen])))
        views = _apply_to(views, gray, lambda x, _: grayscale(x).repeat(1, 3, 1, 1))
        views = _apply_to(views, blur, lambda x, chosen: gaussian_blur(
            x, torch.tensor([sigma[v] for v in chosen]), self.kernel_size))
        return _apply_to(views, solar, lambda x, _: solarize(x))


def _per_view_list(p: float | tuple[float, ...], n: int, name: str) -> list[float]:
    if isinstance(p, int | float):
        return [float(p)] * n
    if len(p) != n:
        raise InvalidSettingError(f"{name} gives {len(p)} per-view probabilities for {n} views; give one per view or "
                                  "one for all")
    return [float(v) for v in p]


def _apply_to(views: Tensor, chosen: list[int], adjust: Callable[[Tensor, list[int]], Tensor]) -> Tensor:
    """``adjust(views[chosen], chosen)`` written back in place; no indexing when every view is chosen."""
    if len(chosen) == len(views):
        return adjust(views, chosen)
    if chosen:
        index = torch.tensor(chosen)
        views[index] = adjust(views[index], chosen)
    return views
