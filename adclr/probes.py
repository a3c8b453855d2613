"""Probes on frozen features, as pure tensor functions: DINO's weighted k-NN, a linear probe, a linear dense probe.

Features in, scores out: the backbone never trains and never runs here (`adclr.evaluate` extracts the features), and
the probes are single linear layers, so a score measures the representation and not a head.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import InvalidSettingError

#: Mask value that segmentation losses and scores skip (the ADE20K / mmseg convention).
IGNORE_INDEX = 255


def count_classes(num_classes: int | None, *labels: torch.Tensor, ignore_index: int | None = None) -> int:
    valid = [t[t != ignore_index] if ignore_index is not None else t for t in labels]
    largest = max(int(t.max()) for t in valid if t.numel())
    if min(int(t.min()) for t in valid if t.numel()) < 0:
        raise InvalidSettingError("labels must be >= 0 (class indices)")
    if num_classes is None:
        return largest + 1
    if largest >= num_classes:
        raise InvalidSettingError(f"a label is {largest} but num_classes={num_classes}; pass num_classes > {largest}")
    return num_classes


def _check_pairs(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 label_dims: int) -> None:
    for name, x, y in (("train", train, train_labels), ("test", test, test_labels)):
        if len(x) != len(y) or len(x) == 0:
            raise InvalidSettingError(f"{name}: {len(x)} feature rows for {len(y)} labels; pass one label per row, "
                                      ">= 1 row")
        if y.ndim != label_dims:
            raise InvalidSettingError(f"{name} labels must be {label_dims}-d, got shape {tuple(y.shape)}")
    if train.shape[1] != test.shape[1]:
        raise InvalidSettingError(f"train features have {train.shape[1]} channels, test {test.shape[1]}; extract "
                                  "both with the same model")


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int = 256) -> float:
    """Top-1 % of DINO's weighted k-NN: cosine similarity, the k nearest vote with weight exp(sim / T) per class."""
    _check_pairs(train_feats, train_labels, test_feats, test_labels, label_dims=1)
    if not 1 <= k <= len(train_feats):
        raise InvalidSettingError(f"k={k} must be between 1 and the {len(train_feats)} training samples; lower k")
    num_classes = count_classes(num_classes, train_labels, test_labels)
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
        raise InvalidSettingError(f"optimizer={optimizer!r} is not supported; use 'adamw' or 'sgd'")
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
    num_classes = count_classes(num_classes, train_labels, test_labels)
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
    ``fg_iou`` is the IoU of "not class 0" with every other class merged: with class 0 the background, it asks only
    whether a probe finds the objects, which moves long before the per-class mIoU does on weak features.
    """
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = union > 0
    foreground_hits = confusion[1:, 1:].sum()
    foreground_union = confusion[1:].sum() + confusion[:, 1:].sum() - foreground_hits
    return {"miou": 100.0 * float((hits[present] / union[present]).mean()),
            "pixel_acc": 100.0 * float(hits.sum() / confusion.sum()),
            "fg_iou": 100.0 * float(foreground_hits / foreground_union) if foreground_union > 0 else float("nan")}


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
    num_classes = count_classes(num_classes, train_masks, test_masks, ignore_index=ignore_index)
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
