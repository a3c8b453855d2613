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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import create_transform, resolve_model_data_config
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .errors import InvalidSettingError, MissingFileError
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
            raise InvalidSettingError(f"numpy images must be uint8 (N, H, W, 3), got {batch.dtype} {batch.shape}; "
                                      "convert gray items with adclr.scenes.items_to_rgb")
        return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
    if isinstance(batch, torch.Tensor) and batch.is_floating_point() and batch.ndim == 4 and batch.shape[1] == 3:
        return batch.to(device)
    got = f"{batch.dtype} {tuple(batch.shape)}" if hasattr(batch, "shape") else type(batch).__name__
    raise InvalidSettingError("images must be uint8 (N, H, W, 3) numpy arrays or normalised float (N, 3, H, W) "
                              f"tensors, got {got}")


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
        raise InvalidSettingError("no images to extract features from; pass at least one image")
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


def _folder_splits(root: Path, model: nn.Module, cfg: EvalConfig) -> tuple[dict[str, Any], int]:
    """ROOT/train and ROOT/val (or ROOT/test) with one sub-folder per class -> DataLoaders, labels by train names."""
    test_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise MissingFileError(f"image folder {root} needs train/ and val/ (or test/) sub-folders, each with one "
                               f"sub-folder of images per class; or use data='fashion-mnist'")
    config = resolve_model_data_config(model)
    if cfg.image_size:
        config["input_size"] = (3, cfg.image_size, cfg.image_size)
    transform = create_transform(**config, is_training=False)
    train = ImageFolder(root / "train", transform, labels="parent_dir")
    test = ImageFolder(test_dir, transform, labels="parent_dir")
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown:
        raise InvalidSettingError(f"{test_dir} has classes {unknown} that {root / 'train'} lacks; give both the "
                                  "same classes")
    remap = [train.class_to_idx[name] for name in test.classes]
    splits = {}
    for name, dataset, limit in (("train", train, cfg.limit_train), ("test", test, cfg.limit_test)):
        idx = _subset(len(dataset), limit, cfg.seed)
        targets = torch.tensor(dataset.targets)[idx]
        targets = targets if dataset is train else torch.tensor(remap)[targets]
        loader = DataLoader(Subset(dataset, idx.tolist()), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        splits[name] = (loader, targets)
    return splits, len(train.classes)


def _load_data(data: str | os.PathLike | Mapping, task: str, model: nn.Module,
               cfg: EvalConfig) -> tuple[dict[str, Any], int]:
    """-> ({'train': (images, targets), 'test': (...)}, num_classes); targets are labels (N,) or masks (N, H, W)."""
    root = fashion.DEFAULT_ROOT if cfg.data_root is None else cfg.data_root
    if isinstance(data, Mapping):
        if not {"train", "test"} <= data.keys():
            raise InvalidSettingError("a data mapping needs 'train' and 'test' entries of (images, targets), got "
                                      f"{list(data)}")
        splits = {name: (data[name][0], torch.as_tensor(np.asarray(data[name][1]), dtype=torch.int64))
                  for name in ("train", "test")}
        ignore = IGNORE_INDEX if task == "seg" else None
        return splits, count_classes(None, *(targets for _, targets in splits.values()), ignore_index=ignore)
    if data == "fashion-scenes":
        if task != "seg":
            raise InvalidSettingError("data='fashion-scenes' is for the seg task; use data='fashion-mnist' for "
                                      "knn/linear")
        splits = {}
        for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
            images, masks = fashion.fashion_scenes(split, n, size=cfg.scene_size, root=root)
            splits[split] = (images, torch.from_numpy(masks))
        return splits, fashion.NUM_SCENE_CLASSES
    if task == "seg":
        raise InvalidSettingError("the seg task needs data='fashion-scenes' or a mapping of (images, masks); got "
                                  f"{data!r}")
    if data == "fashion-mnist":
        splits = {}
        for split, limit in (("train", cfg.limit_train), ("test", cfg.limit_test)):
            items, labels = fashion.load_fashion_mnist(split, root)
            idx = _subset(len(items), limit, cfg.seed)
            splits[split] = (fashion.items_to_rgb(items[idx]), torch.from_numpy(labels[idx]))
        return splits, len(fashion.CLASSES)
    if Path(data).is_dir():
        return _folder_splits(Path(data), model, cfg)
    raise MissingFileError(f"data folder {data} does not exist; pass an image folder with train/ and val/ class "
                           "sub-folders, or fashion-mnist / fashion-scenes")


def _setting(default: Any, help: str, type: type | None = None, **argparse: Any) -> Any:
    """A dataclass field whose metadata holds its command-line help (and its type where the default is None)."""
    return field(default=default, metadata={"help": help, "type": type, **argparse})


@dataclass
class EvalConfig:
    """Every knob of ``evaluate`` in one place; ``adclr eval`` makes one flag per field (--limit-train for
    limit_train), as ``adclr train`` does from ``TrainConfig``. Probe settings left as None take the probe's
    defaults."""
    pretrained: bool = _setting(False, "load the timm name's pretrained weights")
    data_root: str | None = _setting(None, "folder of the Fashion-MNIST idx files "
                                           "(default /usr/share/datasets/fashion-mnist)", str)
    image_size: int | None = _setting(None, "feed images at this size (default: the model's fixed input size)", int)
    limit_train: int | None = _setting(None, "seeded random subset of the training images", int)
    limit_test: int | None = _setting(None, "seeded random subset of the test images", int)
    n_train: int = _setting(2000, "seg: training scenes")
    n_test: int = _setting(500, "seg: test scenes")
    scene_size: int = _setting(64, "seg: scene side in pixels")
    k: int = _setting(20, "knn: neighbours")
    temperature: float = _setting(0.07, "knn: vote temperature")
    epochs: int | None = _setting(None, "probe epochs (default 100 linear, 50 seg)", int)
    lr: float | None = _setting(None, "probe learning rate (default 1e-3 linear, 1e-2 seg)", float)
    weight_decay: float | None = _setting(None, "probe weight decay (default 1e-4)", float)
    optimizer: str = _setting("adamw", "probe optimizer", choices=("adamw", "sgd"))
    batch_size: int = _setting(128, "images per feature-extraction batch")
    num_workers: int = _setting(0, "DataLoader workers for image folders")
    device: str | None = _setting(None, "cuda or cpu (default: cuda when available)", str)
    seed: int = _setting(0, "seed of the subsets and the probe")
    progress: bool = _setting(True, "show progress bars")

    def __post_init__(self) -> None:
        bad = [f"--{name.replace('_', '-')} {value}" for name, value in vars(self).items()
               if name in _AT_LEAST_ONE and value is not None and value < 1]
        bad += [f"--num-workers {self.num_workers}"] * (self.num_workers < 0)
        bad += [f"--temperature {self.temperature}"] * (self.temperature <= 0)
        if bad:
            raise InvalidSettingError(f"{', '.join(bad)}: sizes and counts must be >= 1, num_workers >= 0 and "
                                      "temperature > 0; pass such a value or leave the default")
        if self.optimizer not in ("adamw", "sgd"):
            raise InvalidSettingError(f"optimizer={self.optimizer!r} is not supported; use adamw or sgd")


_AT_LEAST_ONE = {"image_size", "limit_train", "limit_test", "n_train", "n_test", "scene_size", "k", "epochs",
                 "batch_size"}


def evaluate(model_spec: str | os.PathLike | nn.Module, task: str, data: str | os.PathLike | Mapping | None = None,
             config: EvalConfig | None = None, **settings: Any) -> dict[str, Any]:
    """Load a backbone (see `load_model`), extract frozen features and score one task; -> a JSON-able record.

    task 'knn' / 'linear': data='fashion-mnist' (the default; items, optional seeded ``limit_train``/``limit_test``
    subsets), an image folder ROOT with train/ and val/ (or test/) class sub-folders, or {'train': (uint8 (N, H, W, 3),
    labels), 'test': ...}. task 'seg': data='fashion-scenes' (the default; ``n_train``/``n_test`` scenes of
    ``scene_size`` px, fixed seeds) or the same mapping with (N, H, W) masks. Images are fed at ``image_size`` if
    given, else at a fixed-size ViT's input size, else as they are (resized as `adclr.features` resizes).
    Settings: an `EvalConfig`, and/or its fields as keywords (``k=10``), which override it; the record states the
    values used.
    """
    known = {f.name for f in fields(EvalConfig)}
    if set(settings) - known:
        raise InvalidSettingError(f"unknown evaluate setting(s) {sorted(set(settings) - known)}; known: "
                                  f"{sorted(known)}")
    cfg = replace(config or EvalConfig(), **settings)
    if task not in TASKS:
        raise InvalidSettingError(f"task={task!r} is not supported; use one of {TASKS}")
    start = time.perf_counter()
    if data is None:
        data = "fashion-scenes" if task == "seg" else "fashion-mnist"
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(model_spec, pretrained=cfg.pretrained).to(device)
    splits, num_classes = _load_data(data, task, model, cfg)
    extract = extract_dense if task == "seg" else extract_global
    feats = {name: extract(model, images, batch_size=cfg.batch_size, size=cfg.image_size,
                           progress=cfg.progress).to(device)
             for name, (images, _) in splits.items()}
    train, test = feats["train"], feats["test"]
    train_targets, test_targets = (splits[name][1].to(device) for name in ("train", "test"))
    used: dict[str, Any] = {"seed": cfg.seed}
    if task == "knn":
        used.update(k=cfg.k, temperature=cfg.temperature)
        scores = {"top1": knn_accuracy(train, train_targets, test, test_targets, cfg.k, cfg.temperature, num_classes)}
    else:
        probe = linear_probe if task == "linear" else dense_probe
        defaults = {name: p.default for name, p in inspect.signature(probe).parameters.items()}
        given = {"epochs": cfg.epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay}
        used.update({name: defaults[name] if value is None else value for name, value in given.items()},
                    batch_size=defaults["batch_size"], optimizer=cfg.optimizer)
        result = probe(train, train_targets, test, test_targets, num_classes=num_classes, progress=cfg.progress,
                       **used)
        scores = {"top1": result} if task == "linear" else result
    return {
        "task": task,
        "model": type(model_spec).__name__ if isinstance(model_spec, nn.Module) else os.fspath(model_spec),
        "pretrained": cfg.pretrained,
        "data": "arrays" if isinstance(data, Mapping) else os.fspath(data),
        **scores,
        "num_classes": num_classes,
        "n_train": len(train),
        "n_test": len(test),
        "feature_shape": list(train.shape[1:]),
        "image_size": [cfg.image_size] * 2 if cfg.image_size else fixed_input_size(model),
        "settings": used,
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _bundled(name: str) -> dict[str, np.ndarray]:
    """The arrays of one .npz file shipped in `adclr/assets`."""
    from importlib import resources

    with resources.as_file(resources.files("adclr.assets") / name) as path, np.load(path) as arrays:
        return dict(arrays)


def bundled_scenes_probe(model_spec: str | os.PathLike | nn.Module, *, n_train: int = 192, epochs: int = 50,
                         seed: int = 0) -> dict[str, Any]:
    """The dense probe on the 256 labelled held-out Fashion-MNIST scenes shipped in `adclr/assets` (train on the
    first `n_train`, score the rest): a dense-feature check that needs no data set installed."""
    scenes = _bundled("fashion-scenes-test-256.npz")
    images, masks = scenes["images"], scenes["masks"].astype(np.int64)
    data = {"train": (images[:n_train], masks[:n_train]), "test": (images[n_train:], masks[n_train:])}
    return evaluate(model_spec, "seg", data, epochs=epochs, seed=seed, progress=False)


def bundled_items_knn(model_spec: str | os.PathLike | nn.Module, *, n_train: int = 800) -> dict[str, Any]:
    """k-NN on the 1000 Fashion-MNIST test items shipped in `adclr/assets` (100 per class, gray on black; the first
    `n_train` are the memory bank, the rest are scored): a global-feature check that needs no data set installed."""
    sample = _bundled("fashion-items-test-1000.npz")
    images, labels = fashion.items_to_rgb(sample["items"]), sample["labels"].astype(np.int64)
    data = {"train": (images[:n_train], labels[:n_train]), "test": (images[n_train:], labels[n_train:])}
    return evaluate(model_spec, "knn", data, progress=False)
