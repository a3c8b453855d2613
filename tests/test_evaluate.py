"""Evaluation: feature extraction from arrays and loaders, checkpoint loading, the one-call evaluate()."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from adclr.evaluate import evaluate, extract_dense, extract_global
from adclr.load import load_model
from adclr.scenes import make_scenes

TINY = dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)


def tiny_vit(img_size=64) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=img_size, num_classes=0, **TINY).eval()


# ---------------------------------------------------------------- features


def normalise(images: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    """By hand, with the mean/std the model's pretrained cfg states (0.5 / 0.5 for vit_tiny_patch16_224)."""
    mean, std = (torch.tensor(model.pretrained_cfg[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std


def test_extract_shapes_and_values():
    model = tiny_vit(64)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    global_feats = extract_global(model, images, batch_size=2)
    dense = extract_dense(model, images, batch_size=2)
    assert global_feats.shape == (5, 48) and dense.shape == (5, 48, 8, 8)
    with torch.no_grad():
        tokens = model.forward_features(normalise(images, model))  # (B, 1 + N, C) after the final norm
    assert torch.allclose(global_feats, tokens[:, 0], atol=1e-5)
    assert torch.allclose(dense, tokens[:, 1:].reshape(5, 8, 8, 48).permute(0, 3, 1, 2), atol=1e-5)
    # a float tensor, and a DataLoader of (image, label) pairs, give the same features
    loader = DataLoader(TensorDataset(normalise(images, model), torch.zeros(5)), batch_size=3)
    assert torch.allclose(extract_global(model, normalise(images, model)), global_feats, atol=1e-5)
    assert torch.allclose(extract_global(model, loader), global_feats, atol=1e-5)
    # 28 px items are resized to the model's fixed 64 px
    assert extract_dense(model, images[:, :28, :28]).shape == (5, 48, 8, 8)
    assert model.training is False
    with pytest.raises(ValueError, match="uint8"):
        extract_global(model, images.astype(np.float32))


def test_extract_non_square():
    model = tiny_vit((32, 64))
    images = np.zeros((2, 32, 64, 3), dtype=np.uint8)
    assert extract_global(model, images).shape == (2, 48)
    assert extract_dense(model, images).shape == (2, 48, 4, 8)


# ---------------------------------------------------------------- evaluate() and checkpoints


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint in the training layout: teacher backbone + head keys, config naming the timm arch."""
    model = tiny_vit(32)
    teacher = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.zeros(4, 48)
    config = {"arch": "vit_tiny_patch16_224", "img_size": 32, "model_kwargs": TINY}
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": teacher, "student": {}, "config": config, "epoch": 3}, path)
    return path, model


def test_load_model_from_checkpoint(checkpoint, tmp_path):
    path, original = checkpoint
    loaded = load_model(path)
    assert loaded.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.state_dict().items())
    broken = torch.load(path, weights_only=True)
    del broken["teacher"]["backbone.norm.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="norm.weight"):
        load_model(tmp_path / "broken.pth")
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match="not an adclr training checkpoint"):
        load_model(tmp_path / "other.pth")


def colour_folder(root, seed=0):
    """train/ and val/ with a red and a blue class of noisy 40 px PNGs."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", 6), ("val", 4)):
        for name, colour in (("blue", (20, 40, 220)), ("red", (220, 30, 20))):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_evaluate_knn_on_an_image_folder(checkpoint, tmp_path):
    path, _ = checkpoint
    record = evaluate(path, "knn", colour_folder(tmp_path / "folder"), k=3, progress=False)
    assert record["top1"] == 100.0
    assert (record["task"], record["model"], record["num_classes"]) == ("knn", str(path), 2)
    assert (record["n_train"], record["n_test"], record["feature_shape"]) == (12, 8, [48])
    limited = evaluate(path, "knn", tmp_path / "folder", k=3, limit_train=5, limit_test=3, progress=False)
    assert (limited["n_train"], limited["n_test"]) == (5, 3)
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        evaluate(path, "knn", tmp_path / "folder" / "train", progress=False)


def test_evaluate_linear_and_seg_on_arrays(checkpoint):
    path, _ = checkpoint
    rng = np.random.default_rng(0)
    items = np.zeros((40, 28, 28), dtype=np.uint8)
    labels = np.arange(40) % 2
    items[labels == 0, 4:24, 4:24] = 200  # class 0: a filled square, class 1: a thin frame
    items[labels == 1, 4:24, 4:7] = items[labels == 1, 4:24, 21:24] = 200
    rgb = np.repeat(items[..., None], 3, axis=-1) + rng.integers(0, 20, (40, 28, 28, 1), dtype=np.uint8)
    record = evaluate(path, "linear", {"train": (rgb[:30], labels[:30]), "test": (rgb[30:], labels[30:])},
                      epochs=20, lr=1e-2, progress=False)
    assert record["top1"] == 100.0 and record["settings"]["epochs"] == 20

    scene_images, masks = make_scenes(items, labels, n=12, size=32, seed=0)
    record = evaluate(path, "seg", {"train": (scene_images[:8], masks[:8]), "test": (scene_images[8:], masks[8:])},
                      epochs=3, progress=False)
    assert record["feature_shape"] == [48, 4, 4] and record["num_classes"] == 3
    assert 0 <= record["miou"] <= 100 and 0 < record["pixel_acc"] <= 100
    with pytest.raises(ValueError, match="fashion-scenes"):
        evaluate(path, "seg", "fashion-mnist", progress=False)
    with pytest.raises(ValueError, match="task"):
        evaluate(path, "detect", progress=False)
