"""Evaluation on frozen features: DINO's weighted k-NN, a linear probe, a linear dense (segmentation) probe.

The backbone never trains here: features are extracted once (no grad, eval mode) and the probes are single linear
layers, so a score measures the representation and not a head. ``evaluate`` ties model loading, data and probe into one
call that returns a JSON-able record; ``adclr eval`` is a thin layer over it.
"""
from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_model_data_config
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import scenes as fashion
from .images import ImageFolder
from .load import load_model
from .vit import fixed_input_size

TASKS = ("knn", "linear", "seg")
#: Mask value that segmentation losses and scores skip (the ADE20K / mmseg convention).
IGNORE_INDEX = 255

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
              size: tuple[int, int] | None, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) arrays -> normalised float (B, 3, H, W); float tensors are taken as normalised already."""
    if isinstance(batch, np.ndarray):
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"numpy images must be uint8 (N, H, W, 3), got {batch.dtype} {batch.shape}; convert "
                             "gray items with adclr.scenes.items_to_rgb")
        x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
    elif isinstance(batch, torch.Tensor) and batch.is_floating_point() and batch.ndim == 4 and batch.shape[1] == 3:
        x = batch.to(device)
    else:
        got = f"{batch.dtype} {tuple(batch.shape)}" if hasattr(batch, "shape") else type(batch).__name__
        raise ValueError(f"images must be uint8 (N, H, W, 3) numpy arrays or normalised float (N, 3, H, W) tensors, "
                         f"got {got}")
    if size is not None and tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.inference_mode()
def _extract(model: nn.Module, images: Images, forward: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
             size: int | tuple[int, int] | None, progress: bool, desc: str) -> torch.Tensor:
    """Run ``forward`` over all images on the model's device in eval mode; float32 CPU output; the model's
    train/eval mode is restored."""
    device = next(model.parameters()).device
    config = resolve_model_data_config(model)
    mean = torch.tensor(config["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(config["std"], device=device).view(1, 3, 1, 1)
    size = (size, size) if isinstance(size, int) else (tuple(size) if size else fixed_input_size(model))
    if isinstance(images, np.ndarray | torch.Tensor):
        total = math.ceil(len(images) / batch_size)
    else:
        total = len(images) if hasattr(images, "__len__") else None
    was_training = model.training
    model.eval()
    try:
        outputs = [forward(_to_input(b, mean, std, size, device)).float().cpu()
                   for b in tqdm(_batches(images, batch_size), total=total, desc=desc, disable=not progress)]
    finally:
        model.train(was_training)
    if not outputs:
        raise ValueError("no images to extract features from; pass at least one image")
    return torch.cat(outputs)


def extract_global(model: nn.Module, images: Images, batch_size: int = 128, size: int | tuple[int, int] | None = None,
                   progress: bool = False) -> torch.Tensor:
    """(N, C) image features: the model's pooled pre-logits output ([CLS] token after the final norm for a ViT).

    ``images``: uint8 (N, H, W, 3) numpy (normalised with the model's data config), normalised float (N, 3, H, W)
    tensor, or a DataLoader of those (or of (image, label) pairs). Inputs are resized (bilinear) to ``size``, by
    default to the input size of a fixed-size ViT; other models see the images as given.
    """
    def forward(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)
    return _extract(model, images, forward, batch_size, size, progress, "global features")


def extract_dense(model: nn.Module, images: Images, batch_size: int = 128, size: int | tuple[int, int] | None = None,
                  progress: bool = False) -> torch.Tensor:
    """(N, C, h, w) patch feature maps of the last block after the final norm; inputs as for `extract_global`."""
    if not hasattr(model, "forward_intermediates"):
        raise TypeError(f"{type(model).__name__} has no forward_intermediates; use a timm model that has it (any ViT)")

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[-1]
    return _extract(model, images, forward, batch_size, size, progress, "patch features")


# ---------------------------------------------------------------- probes


def _num_classes(num_classes: int | None, *labels: torch.Tensor, ignore_index: int | None = None) -> int:
    valid = [t[t != ignore_index] if ignore_index is not None else t for t in labels]
    largest = max(int(t.max()) for t in valid if t.numel())
    if min(int(t.min()) for t in valid if t.numel()) < 0:
        raise ValueError("labels must be >= 0 (class indices)")
    if num_classes is None:
        return largest + 1
    if largest >= num_classes:
        raise ValueError(f"a label is {largest} but num_classes={num_classes}; pass num_classes > {largest}")
    return num_classes


def _check_pairs(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 label_dims: int) -> None:
    for name, x, y in (("train", train, train_labels), ("test", test, test_labels)):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"{name}: {len(x)} feature rows for {len(y)} labels; pass one label per row, >= 1 row")
        if y.ndim != label_dims:
            raise ValueError(f"{name} labels must be {label_dims}-d, got shape {tuple(y.shape)}")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train features have {train.shape[1]} channels, test {test.shape[1]}; extract both with "
                         "the same model")


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int = 256) -> float:
    """Top-1 % of DINO's weighted k-NN: cosine similarity, the k nearest vote with weight exp(sim / T) per class."""
    _check_pairs(train_feats, train_labels, test_feats, test_labels, label_dims=1)
    if not 1 <= k <= len(train_feats):
        raise ValueError(f"k={k} must be between 1 and the {len(train_feats)} training samples; lower k")
    num_classes = _num_classes(num_classes, train_labels, test_labels)
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    correct = 0
    for rows, labels in zip(test.split(chunk_size), test_labels.split(chunk_size)):
        sims, idx = (rows @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(rows), num_classes, device=rows.device)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        correct += int((votes.argmax(1) == labels).sum())
    return 100.0 * correct / len(test)


def _standardise(train: torch.Tensor, test: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero mean, unit variance per feature / channel, with the train statistics (a scale-free lr for the probe)."""
    mean, std = train.float().mean(dims, keepdim=True), train.float().std(dims, keepdim=True).clamp_min(1e-6)
    return (train.float() - mean) / std, (test.float() - mean) / std


def _fit(layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
         loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], epochs: int, lr: float, weight_decay: float,
         batch_size: int, optimizer: str, generator: torch.Generator, progress: bool, desc: str) -> None:
    """Minibatch training of a probe: AdamW or SGD (momentum 0.9), cosine schedule, seeded shuffling."""
    if optimizer == "adamw":
        opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer={optimizer!r} is not supported; use 'adamw' or 'sgd'")
    steps = epochs * math.ceil(len(inputs) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    layer.train()
    for _ in tqdm(range(epochs), desc=desc, disable=not progress):
        for idx in torch.randperm(len(inputs), generator=generator).to(inputs.device).split(batch_size):
            loss = loss_fn(layer(inputs[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    layer.eval()


def _init_probe(layer: nn.Linear | nn.Conv2d, generator: torch.Generator) -> nn.Module:
    """DINO's linear-eval init (weights N(0, 0.01), zero bias), drawn from the probe's own generator."""
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.01)
        layer.bias.zero_()
    return layer


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, epochs: int = 100, lr: float = 1e-3, weight_decay: float = 1e-4,
                 batch_size: int = 256, optimizer: str = "adamw", num_classes: int | None = None, seed: int = 0,
                 progress: bool = False) -> float:
    """Top-1 % of a linear classifier trained on frozen, standardised features (runs on the features' device)."""
    _check_pairs(train_feats, train_labels, test_feats, test_labels, label_dims=1)
    num_classes = _num_classes(num_classes, train_labels, test_labels)
    train, test = _standardise(train_feats, test_feats, dims=(0,))
    generator = torch.Generator().manual_seed(seed)
    layer = _init_probe(nn.Linear(train.shape[1], num_classes), generator).to(train.device)
    _fit(layer, train, train_labels, F.cross_entropy, epochs, lr, weight_decay, batch_size, optimizer, generator,
         progress, "linear probe")
    with torch.no_grad():
        predictions = torch.cat([layer(rows).argmax(1) for rows in test.split(4096)])
    return 100.0 * float((predictions == test_labels).float().mean())


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU and pixel accuracy in % from a (K, K) confusion matrix (rows: ground truth, columns: prediction).

    mIoU averages IoU over the classes present in the ground truth or the prediction (union > 0), background
    included when it is a class; classes absent from both are left out rather than counted as 0 or 100.
    """
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = union > 0
    return {"miou": 100.0 * float((hits[present] / union[present]).mean()),
            "pixel_acc": 100.0 * float(hits.sum() / confusion.sum())}


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 pixel counts, rows ground truth, columns prediction; ``ignore_index`` pixels are skipped."""
    keep = target != ignore_index
    flat = target[keep].long() * num_classes + prediction[keep].long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes).cpu()


def dense_probe(train_maps: torch.Tensor, train_masks: torch.Tensor, test_maps: torch.Tensor,
                test_masks: torch.Tensor, num_classes: int | None = None, epochs: int = 50, lr: float = 1e-2,
                weight_decay: float = 1e-4, batch_size: int = 32, optimizer: str = "adamw",
                ignore_index: int = IGNORE_INDEX, seed: int = 0, progress: bool = False,
                return_predictions: bool = False) -> dict[str, Any]:
    """A 1x1 linear layer on frozen, channel-standardised patch maps (N, C, h, w), trained with cross-entropy on
    its logits upsampled bilinearly to the mask size (N, H, W); -> {'miou', 'pixel_acc'} in % on the test set
    (plus 'predictions' (N, H, W) for the test set with `return_predictions`, e.g. to draw them)."""
    _check_pairs(train_maps, train_masks, test_maps, test_masks, label_dims=3)
    num_classes = _num_classes(num_classes, train_masks, test_masks, ignore_index=ignore_index)
    train, test = _standardise(train_maps, test_maps, dims=(0, 2, 3))
    train_masks, test_masks = train_masks.long(), test_masks.long()
    generator = torch.Generator().manual_seed(seed)
    layer = _init_probe(nn.Conv2d(train.shape[1], num_classes, kernel_size=1), generator).to(train.device)

    def upsampled(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def loss_fn(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(upsampled(logits, masks.shape[-2:]), masks, ignore_index=ignore_index)

    _fit(layer, train, train_masks, loss_fn, epochs, lr, weight_decay, batch_size, optimizer, generator, progress,
         "dense probe")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    predictions = []
    with torch.no_grad():
        for maps, masks in zip(test.split(batch_size), test_masks.split(batch_size)):
            prediction = upsampled(layer(maps), masks.shape[-2:]).argmax(1)
            confusion += confusion_matrix(prediction, masks, num_classes, ignore_index)
            predictions.append(prediction)
    scores = segmentation_scores(confusion)
    return scores | {"predictions": torch.cat(predictions)} if return_predictions else scores


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
        return splits, _num_classes(None, *(targets for _, targets in splits.values()), ignore_index=ignore)
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
    given, else at a fixed-size ViT's input size (bilinear resize per batch), else as they are. ``batch_size`` is
    the extraction batch; probe settings left as None take the probe function's defaults; the record states the
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
