"""Pictures of features: RGB of the first principal components of patch maps, heat maps of attention per head.

Pure functions of tensors (no model runs here): `adclr.features` produces the maps, these turn them into uint8 RGB
arrays ready for ``PIL.Image.fromarray``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from .errors import InvalidSettingError
from .vit import check_vit


def _nearest(picture: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Upscale (or shrink) an (h, w, ...) picture to ``size`` = (H, W) by nearest neighbour; None keeps it."""
    if size is None:
        return picture
    height, width = size
    rows = np.arange(height) * picture.shape[0] // height
    cols = np.arange(width) * picture.shape[1] // width
    return picture[rows][:, cols]


def _principal_components(x: Tensor, k: int) -> Tensor:
    """Projections (n, k) of rows of ``x`` (n, C) on the top-k principal axes; each axis' largest loading is > 0."""
    centred = x - x.mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    axes = vectors[:, -k:].flip(1)
    axes = axes * axes.gather(0, axes.abs().argmax(0, keepdim=True)).sign()
    return centred @ axes


def _min_max(x: Tensor) -> Tensor:
    """Scale each column to [0, 1]; a constant column becomes 0."""
    low, high = x.min(0).values, x.max(0).values
    return (x - low) / (high - low).clamp_min(1e-12)


def pca_image(patch_features: Tensor | Sequence[Tensor], *, foreground_threshold: float | None = None,
              size: tuple[int, int] | None = None) -> np.ndarray | list[np.ndarray]:
    """RGB picture of the first three principal components of patch features; uint8 (B, h', w', 3).

    One PCA basis is shared by all the maps given, and each component is min-max scaled over all of them, so equal
    features get equal colours across images. ``patch_features``: (B, C, h, w) -> (B, h', w', 3); (C, h, w) ->
    (h', w', 3); a list of (C, h, w) maps of different grids -> a list of (h', w', 3) pictures.
    ``foreground_threshold`` t in (0, 1): the first component, min-max scaled to [0, 1], splits the patches into
    foreground (value > t) and the rest; its sign is chosen so that the foreground is the smaller side (objects are
    usually the minority of patches). Background patches are black and the colours come from a PCA of the
    foreground patches alone. ``size`` = (H, W) upscales each picture with nearest neighbour (e.g. (h*p, w*p)).
    """
    if isinstance(patch_features, Tensor):
        if patch_features.ndim not in (3, 4):
            raise InvalidSettingError("patch features must be (B, C, h, w) or (C, h, w), got "
                                      f"{tuple(patch_features.shape)}")
        maps = list(patch_features) if patch_features.ndim == 4 else [patch_features]
    else:
        maps = list(patch_features)
        if not maps or any(m.ndim != 3 for m in maps):
            raise InvalidSettingError("a list of patch features must hold (C, h, w) maps, at least one")
    if maps[0].shape[0] < 3 or len({m.shape[0] for m in maps}) != 1:
        raise InvalidSettingError("all maps need the same number C >= 3 of channels, got "
                                  f"{sorted({m.shape[0] for m in maps})}")
    flat = torch.cat([rearrange(m, "c h w -> (h w) c") for m in maps]).detach().cpu().double()
    keep = torch.ones(len(flat), dtype=torch.bool)
    if foreground_threshold is not None:
        if not 0 < foreground_threshold < 1:
            raise InvalidSettingError(f"foreground_threshold={foreground_threshold} must lie in (0, 1), e.g. 0.5")
        first = _min_max(_principal_components(flat, 1))[:, 0]
        high, low = first > foreground_threshold, 1 - first > foreground_threshold
        keep = high if high.sum() <= low.sum() else low
    colours = torch.zeros(len(flat), 3, dtype=torch.float64)
    if keep.any():
        colours[keep] = _min_max(_principal_components(flat[keep], 3))
    pixels = (colours * 255).round().to(torch.uint8).numpy()
    pictures, start = [], 0
    for m in maps:
        h, w = m.shape[-2:]
        pictures.append(_nearest(pixels[start:start + h * w].reshape(h, w, 3), size))
        start += h * w
    if not isinstance(patch_features, Tensor):
        return pictures
    return np.stack(pictures) if patch_features.ndim == 4 else pictures[0]


_HEAT = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=np.float64)  # black-red-yellow-white


def _heat(values: np.ndarray) -> np.ndarray:
    """[0, 1] values -> uint8 RGB along black -> red -> yellow -> white (brighter = larger)."""
    stops = np.linspace(0, 1, len(_HEAT))
    rgb = np.stack([np.interp(values, stops, _HEAT[:, c]) for c in range(3)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def attention_image(maps: Tensor | np.ndarray, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """(heads, h, w) maps -> uint8 (h', heads * w', 3): heads side by side, each min-max scaled, as a heat map.

    ``size`` = (H, W) upscales every head's tile with nearest neighbour.
    """
    maps = torch.as_tensor(maps).detach().cpu().double()
    if maps.ndim != 3:
        raise InvalidSettingError(f"attention maps must be (heads, h, w), got shape {tuple(maps.shape)}")
    scaled = _min_max(rearrange(maps, "n h w -> (h w) n"))
    tiles = rearrange(scaled, "(h w) n -> n h w", h=maps.shape[1]).numpy()
    return np.concatenate([_nearest(_heat(tile), size) for tile in tiles], axis=1)


def pixel_pca(model: nn.Module, patch: Tensor, input_size: tuple[int, int]) -> np.ndarray:
    """PCA picture of one (C, h, w) map at pixel scale, cropped to the (H, W) input it came from (padding dropped)."""
    ph, pw = check_vit(model).patch_embed.patch_size
    h, w = patch.shape[-2:]
    return pca_image(patch, size=(h * ph, w * pw))[:input_size[0], :input_size[1]]
