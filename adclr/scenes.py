"""Fashion-MNIST items and multi-object scenes built from them: real images, offline, for a small dense study.

A global task needs one object per image (the items themselves); a dense task needs several objects per image with
per-pixel labels. Scenes paste 2-4 tinted items at random positions and scales over a seeded textured background, so
the same items give both tasks with exact masks and no download. Fashion-MNIST (MIT) comes from the Debian package
``dataset-fashion-mnist`` (idx ``.gz`` files under ``/usr/share/datasets/fashion-mnist``); only numpy and gzip read it.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InvalidSettingError, MissingFileError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
#: Scene labels: 0 = background, item class + 1 for the visible foreground of an item.
NUM_SCENE_CLASSES = len(CLASSES) + 1
#: Fixed scene seeds per item split, so train and test scenes never share a layout.
SCENE_SEEDS = {"train": 0, "test": 1}
ITEM_SIZE = 28

# idx type codes -> big-endian numpy dtypes (the idx format's full list)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """An idx file (gzip-compressed or raw) as an array; a wrong magic, ndim or byte count raises ValueError."""
    path = Path(path)
    fix = f"the file is corrupt or not an idx file; reinstall it (e.g. `sudo apt-get install --reinstall " \
          f"dataset-fashion-mnist`) or replace {path}"
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise InvalidSettingError(f"cannot decompress {path} ({type(error).__name__}: {error}): {fix}") from error
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise InvalidSettingError(f"{path} does not start with an idx magic number (00 00 <type> <ndim>): {fix}")
    dtype, dims = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    if ndim is not None and dims != ndim:
        raise InvalidSettingError(f"{path} holds a {dims}-d idx array, expected {ndim}-d: {fix}")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise InvalidSettingError(f"{path} ends inside its idx header: {fix}")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidSettingError(f"{path} has {len(raw)} bytes after decompression, its idx header {shape} needs "
                                  f"{expected}: {fix}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "train", root: str | os.PathLike = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """-> images uint8 (N, 28, 28), labels int64 (N,) of the 'train' (60000) or 'test' (10000) split."""
    if split not in FILES:
        raise InvalidSettingError(f"split={split!r} is not a Fashion-MNIST split; use one of {sorted(FILES)}")
    root = Path(root)
    paths = [root / name for name in FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise MissingFileError(
            f"Fashion-MNIST files {missing} not found under {root}: install them with "
            f"`sudo apt-get install dataset-fashion-mnist` (files land in {DEFAULT_ROOT}) or pass root=<folder "
            f"holding {', '.join(FILES[split])}>")
    images, labels = read_idx(paths[0], ndim=3), read_idx(paths[1], ndim=1)
    if images.dtype != np.uint8 or images.shape[1:] != (ITEM_SIZE, ITEM_SIZE):
        raise InvalidSettingError(f"{paths[0]} holds {images.dtype} images of shape {images.shape[1:]}, expected uint8 "
                                  f"28x28 Fashion-MNIST items; replace the file")
    if len(labels) != len(images) or (len(labels) and labels.max() >= len(CLASSES)):
        raise InvalidSettingError(f"{paths[1]} does not match {paths[0]}: {len(labels)} labels (max "
                                  f"{labels.max() if len(labels) else '-'}) for {len(images)} images; replace both "
                                  "files")
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (N, H, W, C) -> (N, *size, C), bilinear with antialiasing when shrinking."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def items_to_rgb(items: np.ndarray, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Gray items uint8 (N, H, W) -> RGB uint8 (N, H, W, 3), optionally resized (bilinear) to ``size``."""
    if items.ndim != 3 or items.dtype != np.uint8:
        raise InvalidSettingError(f"items must be uint8 (N, H, W), got {items.dtype} {items.shape}; "
                                  "pass load_fashion_mnist()[0]")
    rgb = np.repeat(items[..., None], 3, axis=-1)
    if size is None:
        return rgb
    size = (size, size) if isinstance(size, int) else tuple(size)
    return rgb if rgb.shape[1:3] == size else _resize(rgb, size)


class Placement(NamedTuple):
    """One pasted item: index into the item array, top-left corner and side in scene pixels, RGB tint in [0, 1]."""
    item: int
    top: int
    left: int
    side: int
    tint: tuple[float, float, float]


def sample_layouts(num_items: int, n: int, size: int = 64, items_per_scene: tuple[int, int] = (2, 4),
                   scale: tuple[float, float] = (0.4, 0.7), seed: int = 0) -> list[list[Placement]]:
    """The placements `make_scenes` renders for the same arguments, in paste order (later ones occlude earlier ones).

    Each scene gets a uniform count in ``items_per_scene``; each item a side of ``scale`` times the scene side
    (uniform), a position that keeps it fully inside the scene, and a random bright tint.
    """
    lo, hi = items_per_scene
    if not 1 <= lo <= hi:
        raise InvalidSettingError(f"items_per_scene={items_per_scene} must satisfy 1 <= min <= max, e.g. (2, 4)")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise InvalidSettingError(f"scale={scale} is the item side as a fraction of the scene side: "
                                  "0 < min <= max <= 1")
    if num_items < 1:
        raise InvalidSettingError("make_scenes needs at least one item to paste")
    rng = np.random.default_rng([seed, 0])
    layouts = []
    for _ in range(n):
        scene = []
        for _ in range(int(rng.integers(lo, hi + 1))):
            side = int(np.clip(round(rng.uniform(*scale) * size), 1, size))
            tint = rng.uniform(0.2, 1.0, 3)
            scene.append(Placement(item=int(rng.integers(num_items)), top=int(rng.integers(size - side + 1)),
                                   left=int(rng.integers(size - side + 1)), side=side,
                                   tint=tuple(float(t) for t in tint / tint.max())))
        layouts.append(scene)
    return layouts


def _upsample_matrix(cells: int, size: int) -> np.ndarray:
    """(size, cells) linear-interpolation weights: M @ grid @ M.T upsamples a cells x cells grid smoothly."""
    positions = (np.arange(size) + 0.5) * cells / size - 0.5
    return np.stack([np.interp(positions, np.arange(cells), np.eye(cells)[j]) for j in range(cells)], axis=1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour noise, half the time with sinusoidal stripes over it: float (size, size, 3) in [0, 1].

    Quantised to 64 levels per channel (invisible at this scale), which keeps a 256-scene sample file small.
    """
    cells = int(rng.integers(3, 8))
    up = _upsample_matrix(cells, size)
    noise = (up @ rng.random((3, cells, cells)) @ up.T).transpose(1, 2, 0)
    background = rng.uniform(0.05, 0.45) + rng.uniform(0.2, 0.5) * noise
    if rng.random() < 0.5:
        angle, cycles, phase = rng.uniform(0, np.pi), rng.uniform(2, 8), rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:size, 0:size] / size
        wave = np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) + phase)
        background = background + rng.uniform(0.1, 0.25) * wave[..., None] * rng.uniform(0.3, 1.0, 3)
    return np.round(np.clip(background, 0.0, 1.0) * 63) / 63


def nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index of each target pixel for a nearest-neighbour resize (pixel centres aligned)."""
    return np.minimum(((np.arange(target) + 0.5) * source / target).astype(np.int64), source - 1)


def make_scenes(items: np.ndarray, labels: np.ndarray, n: int, size: int = 64,
                items_per_scene: tuple[int, int] = (2, 4), scale: tuple[float, float] = (0.4, 0.7),
                threshold: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """-> images uint8 (n, size, size, 3), masks int64 (n, size, size) with 0 = background, item class + 1 = item.

    Items are resized nearest-neighbour (so a mask pixel is exactly an item pixel) and pasted where their intensity
    exceeds ``threshold``, coloured tint * (0.3 + 0.7 * intensity); later items occlude earlier ones in the image and
    the mask alike. Deterministic in ``seed``; ``sample_layouts`` with the same arguments returns the placements.
    """
    if items.ndim != 3 or items.dtype != np.uint8 or len(items) != len(labels):
        raise InvalidSettingError(f"items must be uint8 (N, H, W) with one label each, got {items.dtype} "
                                  f"{items.shape} and {len(labels)} labels; pass load_fashion_mnist(split)")
    labels = np.asarray(labels, dtype=np.int64)
    layouts = sample_layouts(len(items), n, size, items_per_scene, scale, seed)
    background_rng = np.random.default_rng([seed, 1])
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.int64)
    for i, layout in enumerate(layouts):
        canvas = _background(background_rng, size)
        for p in layout:
            item = items[p.item]
            patch = item[np.ix_(nearest_indices(item.shape[0], p.side), nearest_indices(item.shape[1], p.side))]
            foreground = patch > threshold
            window = np.s_[p.top:p.top + p.side, p.left:p.left + p.side]
            colour = (0.3 + 0.7 * patch[..., None] / 255.0) * np.asarray(p.tint)
            canvas[window] = np.where(foreground[..., None], colour, canvas[window])
            masks[i][window] = np.where(foreground, labels[p.item] + 1, masks[i][window])
        images[i] = np.rint(canvas * 255).astype(np.uint8)
    return images, masks


def fashion_scenes(split: str, n: int, size: int = 64, root: str | os.PathLike = DEFAULT_ROOT,
                   seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scenes from the items of one Fashion-MNIST split, with that split's fixed seed unless ``seed`` is given."""
    items, labels = load_fashion_mnist(split, root)
    return make_scenes(items, labels, n, size=size, seed=SCENE_SEEDS[split] if seed is None else seed)


def item_scenes(split: str, n: int, size: int = 64, scale: tuple[float, float] = (0.6, 0.9),
                root: str | os.PathLike = DEFAULT_ROOT, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One tinted item per image over a textured background: (images uint8 (n, size, size, 3), item classes (n,)).

    The global task with the scenes' clutter: a gray item on black says little about whether a model separates an
    object from its background. Layouts use the split's scene seed + 100, so they differ from the split's scenes.
    """
    items, labels = load_fashion_mnist(split, root)
    seed = SCENE_SEEDS[split] + 100 if seed is None else seed
    images, _ = make_scenes(items, labels, n, size=size, items_per_scene=(1, 1), scale=scale, seed=seed)
    layouts = sample_layouts(len(items), n, size, (1, 1), scale, seed)
    return images, np.asarray([labels[layout[0].item] for layout in layouts], dtype=np.int64)


def write_scene_sample(out_dir: str | os.PathLike, n: int = 256, split: str = "test", seed: int | None = None,
                       size: int = 64, root: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """Write ``fashion-scenes-<split>-<n>.npz`` (images uint8 (n, size, size, 3), masks uint8) and return its path."""
    images, masks = fashion_scenes(split, n, size=size, root=root, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"fashion-scenes-{split}-{n}.npz"
    np.savez_compressed(path, images=images, masks=masks.astype(np.uint8))
    return path


def write_item_sample(out_dir: str | os.PathLike, per_class: int = 100, split: str = "test",
                      root: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """Write ``fashion-items-<split>-<n>.npz``: the first ``per_class`` items of each class, interleaved by class
    (item i has class i mod 10, so every prefix of a multiple of 10 is balanced): items uint8 (n, 28, 28), labels
    uint8."""
    items, labels = load_fashion_mnist(split, root)
    per_label = [np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))]
    if min(len(i) for i in per_label) < per_class:
        raise InvalidSettingError(f"the {split} split has fewer than {per_class} items of some class; pass a smaller "
                                  "per_class")
    order = np.stack(per_label, axis=1).reshape(-1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"fashion-items-{split}-{len(order)}.npz"
    np.savez_compressed(path, items=items[order], labels=labels[order].astype(np.uint8))
    return path
