"""Evaluation data sources and the one-call run: Fashion-MNIST items and scenes, class folders, arrays -> a score.

``evaluate`` loads a backbone (`adclr.load`), feeds the data through the one extractor (`adclr.features`) and scores
the frozen features with a probe (`adclr.probes`); it returns a JSON-able record and ``adclr eval`` is a thin layer
over it.
"""
from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import create_transform, resolve_model_data_config
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import scenes as fashion
from .features import extract_features
from .images import ImageFolder
from .load import load_model
from .probes import IGNORE_INDEX, count_classes, dense_probe, knn_accuracy, linear_probe
from .vit import fixed_input_size

TASKS = ("knn", "linear", "seg")

Images = np.ndarray | torch.Tensor | Iterable


# ---------------------------------------------------------------- features


def _batches(images: Images, batch_size: int) -> Iterator[np.ndarray | torch.Tensor]:
    """Array/tensor -> slices of batch_size; a DataLoader -> its batches (the image part of (image, label) pairs)."""
    if isinstance(images, np.ndarray | torch.Tensor):
        for start in range(0, len(images), batch_size):
            yield images[start:start + batch_size]
        return
    for batch in images:
        yield batch[0] if isinstance(batch, tuple | list) else batch


def _to_input(batch: np.ndarray | torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) arrays -> normalised float (B, 3, H, W); float tensors are taken as normalised already."""
    if isinstance(batch, np.ndarray):
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"numpy images must be uint8 (N, H, W, 3), got {batch.dtype} {batch.shape}; convert "
                             "gray items with adclr.scenes.items_to_rgb")
        return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
    if isinstance(batch, torch.Tensor) and batch.is_floating_point() and batch.ndim == 4 and batch.shape[1] == 3:
        return batch.to(device)
    got = f"{batch.dtype} {tuple(batch.shape)}" if hasattr(batch, "shape") else type(batch).__name__
    raise ValueError(f"images must be uint8 (N, H, W, 3) numpy arrays or normalised float (N, 3, H, W) tensors, "
                     f"got {got}")


def _extract(model: nn.Module, images: Images, key: str, batch_size: int, size: int | tuple[int, int] | None,
             progress: bool, desc: str) -> torch.Tensor:
    """``extract_features(...)[key]`` over all images, float32 on the CPU; size: int -> square, default the fixed
    input size of a fixed-size ViT, else the images' own."""
    device = next(model.parameters()).device
    config = resolve_model_data_config(model)
    mean = torch.tensor(config["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(config["std"], device=device).view(1, 3, 1, 1)
    size = (size, size) if isinstance(size, int) else (tuple(size) if size else fixed_input_size(model))
    if isinstance(images, np.ndarray | torch.Tensor):
        total = math.ceil(len(images) / batch_size)
    else:
        total = len(images) if hasattr(images, "__len__") else None
    outputs = [extract_features(model, _to_input(b, mean, std, device), size=size, batch_size=batch_size)[key]
               .float().cpu() for b in tqdm(_batches(images, batch_size), total=total, desc=desc, disable=not progress)]
    if not outputs:
        raise ValueError("no images to extract features from; pass at least one image")
    return torch.cat(outputs)


def extract_global(model: nn.Module, images: Images, batch_size: int = 128, size: int | tuple[int, int] | None = None,
                   progress: bool = False) -> torch.Tensor:
    """(N, C) image features: ``extract_features``'s ``cls`` (the [CLS] token after the final norm for a ViT).

    ``images``: uint8 (N, H, W, 3) numpy (normalised with the model's data config), normalised float (N, 3, H, W)
    tensor, or a DataLoader of those (or of (image, label) pairs). Inputs are resized as `adclr.features` resizes
    them, to ``size`` (an int is a square side), by default to the input size of a fixed-size ViT.
    """
    return _extract(model, images, "cls", batch_size, size, progress, "global features")


def extract_dense(model: nn.Module, images: Images, batch_size: int = 128, size: int | tuple[int, int] | None = None,
                  progress: bool = False) -> torch.Tensor:
    """(N, C, h, w) patch feature maps of the last block after the final norm; inputs as for `extract_global`."""
    return _extract(model, images, "patch", batch_size, size, progress, "patch features")


# ---------------------------------------------------------------- data and the one-call evaluation


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """A seeded random subset of ``limit`` indices in increasing order (all indices when limit is None)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def _folder_splits(root: Path, model: nn.Module, image_size: int | None, batch_size: int, num_workers: int,
                   limits: tuple[int | None, int | None], seed: int) -> tuple[dict[str, Any], int]:
    """ROOT/train and ROOT/val (or ROOT/test) with one sub-folder per class -> DataLoaders, labels by train names."""
    test_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise FileNotFoundError(f"image folder {root} needs train/ and val/ (or test/) sub-folders, each with one "
                                f"sub-folder of images per class; or use data='fashion-mnist'")
    config = resolve_model_data_config(model)
    if image_size:
        config["input_size"] = (3, image_size, image_size)
    transform = create_transform(**config, is_training=False)
    train = ImageFolder(root / "train", transform, labels="parent_dir")
    test = ImageFolder(test_dir, transform, labels="parent_dir")
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown:
        raise ValueError(f"{test_dir} has classes {unknown} that {root / 'train'} lacks; give both the same classes")
    remap = [train.class_to_idx[name] for name in test.classes]
    splits = {}
    for name, dataset, limit in (("train", train, limits[0]), ("test", test, limits[1])):
        idx = _subset(len(dataset), limit, seed)
        targets = torch.tensor(dataset.targets)[idx]
        targets = targets if dataset is train else torch.tensor(remap)[targets]
        loader = DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, num_workers=num_workers)
        splits[name] = (loader, targets)
    return splits, len(train.classes)


def _load_data(data: str | os.PathLike | Mapping, task: str, model: nn.Module, *, data_root: str | os.PathLike | None,
               image_size: int | None, limits: tuple[int | None, int | None], scene_args: tuple[int, int, int],
               batch_size: int, num_workers: int, seed: int) -> tuple[dict[str, Any], int]:
    """-> ({'train': (images, targets), 'test': (...)}, num_classes); targets are labels (N,) or masks (N, H, W)."""
    root = fashion.DEFAULT_ROOT if data_root is None else data_root
    if isinstance(data, Mapping):
        if not {"train", "test"} <= data.keys():
            raise ValueError(f"a data mapping needs 'train' and 'test' entries of (images, targets), got {list(data)}")
        splits = {name: (data[name][0], torch.as_tensor(np.asarray(data[name][1]), dtype=torch.int64))
                  for name in ("train", "test")}
        ignore = IGNORE_INDEX if task == "seg" else None
        return splits, count_classes(None, *(targets for _, targets in splits.values()), ignore_index=ignore)
    if data == "fashion-scenes":
        if task != "seg":
            raise ValueError("data='fashion-scenes' is for the seg task; use data='fashion-mnist' for knn/linear")
        n_train, n_test, size = scene_args
        splits = {}
        for split, n in (("train", n_train), ("test", n_test)):
            images, masks = fashion.fashion_scenes(split, n, size=size, root=root)
            splits[split] = (images, torch.from_numpy(masks))
        return splits, fashion.NUM_SCENE_CLASSES
    if task == "seg":
        raise ValueError(f"the seg task needs data='fashion-scenes' or a mapping of (images, masks); got {data!r}")
    if data == "fashion-mnist":
        splits = {}
        for split, limit in zip(("train", "test"), limits):
            items, labels = fashion.load_fashion_mnist(split, root)
            idx = _subset(len(items), limit, seed)
            splits[split] = (fashion.items_to_rgb(items[idx]), torch.from_numpy(labels[idx]))
        return splits, len(fashion.CLASSES)
    if Path(data).is_dir():
        return _folder_splits(Path(data), model, image_size, batch_size, num_workers, limits, seed)
    raise ValueError(f"data={data!r} is neither 'fashion-mnist', 'fashion-scenes' nor an existing image folder")


def evaluate(model_spec: str | os.PathLike | nn.Module, task: str, data: str | os.PathLike | Mapping | None = None,
             *, pretrained: bool = False, data_root: str | os.PathLike | None = None, image_size: int | None = None,
             limit_train: int | None = None, limit_test: int | None = None, n_train: int = 2000, n_test: int = 500,
             scene_size: int = 64, k: int = 20, temperature: float = 0.07, epochs: int | None = None,
             lr: float | None = None, weight_decay: float | None = None, optimizer: str = "adamw",
             batch_size: int = 128, num_workers: int = 0, device: str | torch.device | None = None, seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
    """Load a backbone (see `load_model`), extract frozen features and score one task; -> a JSON-able record.

    task 'knn' / 'linear': data='fashion-mnist' (the default; items, optional seeded ``limit_train``/``limit_test``
    subsets), an image folder ROOT with train/ and val/ (or test/) class sub-folders, or {'train': (uint8 (N, H, W, 3),
    labels), 'test': ...}. task 'seg': data='fashion-scenes' (the default; ``n_train``/``n_test`` scenes of
    ``scene_size`` px, fixed seeds) or the same mapping with (N, H, W) masks. Images are fed at ``image_size`` if
    given, else at a fixed-size ViT's input size, else as they are (resized as `adclr.features` resizes).
    ``batch_size`` is the extraction batch; probe settings left as None take the probe function's defaults; the record states the
    values used.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; use one of {TASKS}")
    start = time.perf_counter()
    if data is None:
        data = "fashion-scenes" if task == "seg" else "fashion-mnist"
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(model_spec, pretrained=pretrained).to(device)
    splits, num_classes = _load_data(data, task, model, data_root=data_root, image_size=image_size,
                                      limits=(limit_train, limit_test), scene_args=(n_train, n_test, scene_size),
                                      batch_size=batch_size, num_workers=num_workers, seed=seed)
    extract = extract_dense if task == "seg" else extract_global
    feats = {name: extract(model, images, batch_size=batch_size, size=image_size, progress=progress).to(device)
             for name, (images, _) in splits.items()}
    train, test = feats["train"], feats["test"]
    train_targets, test_targets = (splits[name][1].to(device) for name in ("train", "test"))
    settings: dict[str, Any] = {"seed": seed}
    if task == "knn":
        settings.update(k=k, temperature=temperature)
        scores = {"top1": knn_accuracy(train, train_targets, test, test_targets, k, temperature, num_classes)}
    else:
        probe = linear_probe if task == "linear" else dense_probe
        defaults = {name: p.default for name, p in inspect.signature(probe).parameters.items()}
        given = {"epochs": epochs, "lr": lr, "weight_decay": weight_decay}
        settings.update({name: defaults[name] if value is None else value for name, value in given.items()},
                        batch_size=defaults["batch_size"], optimizer=optimizer)
        result = probe(train, train_targets, test, test_targets, num_classes=num_classes, progress=progress,
                       **settings)
        scores = {"top1": result} if task == "linear" else result
    return {
        "task": task,
        "model": type(model_spec).__name__ if isinstance(model_spec, nn.Module) else os.fspath(model_spec),
        "pretrained": pretrained,
        "data": "arrays" if isinstance(data, Mapping) else os.fspath(data),
        **scores,
        "num_classes": num_classes,
        "n_train": len(train),
        "n_test": len(test),
        "feature_shape": list(train.shape[1:]),
        "image_size": [image_size] * 2 if image_size else fixed_input_size(model),
        "settings": settings,
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 2),
    }


def bundled_scenes_probe(model_spec: str | os.PathLike | nn.Module, *, n_train: int = 192, epochs: int = 50,
                         seed: int = 0) -> dict[str, Any]:
    """The dense probe on the 256 labelled held-out Fashion-MNIST scenes shipped in `adclr/assets` (train on the
    first `n_train`, score the rest): a dense-feature check that needs no data set installed."""
    from importlib import resources

    with resources.as_file(resources.files("adclr.assets") / "fashion-scenes-test-256.npz") as path:
        scenes = np.load(path)
        images, masks = scenes["images"], scenes["masks"].astype(np.int64)
    data = {"train": (images[:n_train], masks[:n_train]), "test": (images[n_train:], masks[n_train:])}
    return evaluate(model_spec, "seg", data, epochs=epochs, seed=seed, progress=False)
