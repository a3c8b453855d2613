"""Fashion-MNIST idx reading and the multi-object scenes, checked against hand-written files and a hand paste."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from adclr import scenes
from adclr.scenes import (DEFAULT_ROOT, fashion_scenes, items_to_rgb, load_fashion_mnist, make_scenes, read_idx,
                          sample_layouts, write_item_sample, write_scene_sample)


needs_fashion_mnist = pytest.mark.skipif(not (DEFAULT_ROOT / scenes.FILES["test"][0]).is_file(),
                                         reason=f"Fashion-MNIST is not installed under {DEFAULT_ROOT} "
                                                "(sudo apt-get install dataset-fashion-mnist)")


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx encoding written out by hand: 0, 0, type code 0x08 (uint8), ndim, big-endian dims, then the data."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def synthetic_items(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise items: about half the pixels 0, the rest uniform in 1..255, so the foreground threshold matters."""
    rng = np.random.default_rng(seed)
    items = rng.integers(1, 256, size=(n, 28, 28)).astype(np.uint8)
    items[rng.random(items.shape) < 0.5] = 0
    return items, rng.integers(0, 10, size=n).astype(np.int64)


@pytest.fixture
def fake_root(tmp_path):
    """A Fashion-MNIST folder with the real file names holding synthetic items (gzip, as the Debian package)."""
    for split, (images_name, labels_name) in scenes.FILES.items():
        items, labels = synthetic_items(300 if split == "train" else 200, seed=len(split))
        (tmp_path / images_name).write_bytes(gzip.compress(idx_bytes(items)))
        (tmp_path / labels_name).write_bytes(gzip.compress(idx_bytes(labels.astype(np.uint8))))
    return tmp_path


# ---------------------------------------------------------------- idx files


def test_read_idx_raw_and_gzip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(array))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(array)))
    for name in ("a.idx", "a.idx.gz"):
        out = read_idx(tmp_path / name, ndim=3)
        assert out.dtype == np.uint8 and np.array_equal(out, array)
    # a big-endian int32 file: bytes written by hand
    (tmp_path / "b.idx").write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 2) + struct.pack(">ii", -5, 70000))
    assert read_idx(tmp_path / "b.idx").tolist() == [-5, 70000]


def test_read_idx_rejects_corrupt_files(tmp_path):
    good = idx_bytes(np.zeros((4, 5), dtype=np.uint8))
    cases = {
        "truncated.idx": (good[:-3], "bytes"),
        "extra.idx": (good + b"\x00", "bytes"),
        "magic.idx": (b"\x01\x02" + good[2:], "magic"),
        "header.idx": (good[:6], "header"),
        "truncated.gz": (gzip.compress(good)[:-6], "decompress"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            read_idx(tmp_path / name)
    (tmp_path / "good.idx").write_bytes(good)
    with pytest.raises(ValueError, match="2-d idx array, expected 3-d"):
        read_idx(tmp_path / "good.idx", ndim=3)


def test_load_fashion_mnist_from_a_folder(fake_root):
    images, labels = load_fashion_mnist("test", root=fake_root)
    expected_items, expected_labels = synthetic_items(200, seed=len("test"))
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(images, expected_items) and np.array_equal(labels, expected_labels)
    assert load_fashion_mnist("train", root=fake_root)[0].shape == (300, 28, 28)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=fake_root)


def test_load_fashion_mnist_errors(tmp_path, fake_root):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path / "missing")
    # labels that do not match the images: one label short
    labels_path = fake_root / scenes.FILES["test"][1]
    labels_path.write_bytes(gzip.compress(idx_bytes(np.zeros(199, dtype=np.uint8))))
    with pytest.raises(ValueError, match="199 labels"):
        load_fashion_mnist("test", root=fake_root)
    # a 3-d labels file has the images' magic number, not the labels' one
    labels_path.write_bytes(gzip.compress(idx_bytes(np.zeros((200, 1, 1), dtype=np.uint8))))
    with pytest.raises(ValueError, match="expected 1-d"):
        load_fashion_mnist("test", root=fake_root)


# ---------------------------------------------------------------- scenes


def hand_paste(items, labels, layout, size, threshold=30):
    """Reference render: every scene pixel looked up in its item with plain loops, later items on top."""
    mask = np.zeros((size, size), dtype=np.int64)
    colour = np.full((size, size, 3), -1.0)
    for p in layout:
        for y in range(p.side):
            for x in range(p.side):
                sy = min(int((y + 0.5) * 28 / p.side), 27)
                sx = min(int((x + 0.5) * 28 / p.side), 27)
                value = int(items[p.item, sy, sx])
                if value > threshold:
                    mask[p.top + y, p.left + x] = labels[p.item] + 1
                    colour[p.top + y, p.left + x] = 255 * (0.3 + 0.7 * value / 255) * np.array(p.tint)
    return mask, colour


def test_scenes_match_a_hand_paste():
    items, labels = synthetic_items(50)
    images, masks = make_scenes(items, labels, n=6, size=48, seed=3)
    layouts = sample_layouts(len(items), n=6, size=48, seed=3)
    assert images.shape == (6, 48, 48, 3) and images.dtype == np.uint8
    assert masks.shape == (6, 48, 48) and masks.dtype == np.int64
    for image, mask, layout in zip(images, masks, layouts):
        assert 2 <= len(layout) <= 4
        for p in layout:
            assert round(0.4 * 48) <= p.side <= round(0.7 * 48)
            assert 0 <= p.top <= 48 - p.side and 0 <= p.left <= 48 - p.side
        expected_mask, expected_colour = hand_paste(items, labels, layout, 48)
        assert np.array_equal(mask, expected_mask)
        foreground = expected_mask > 0
        assert np.abs(image[foreground] - expected_colour[foreground]).max() <= 1
        # every item not fully hidden by later ones shows its label
        assert set(np.unique(mask)) <= {0} | {labels[p.item] + 1 for p in layout}


def test_scenes_are_deterministic_and_labelled_0_to_10():
    items, labels = synthetic_items(100)
    a_images, a_masks = make_scenes(items, labels, n=20, seed=7)
    b_images, b_masks = make_scenes(items, labels, n=20, seed=7)
    c_images, c_masks = make_scenes(items, labels, n=20, seed=8)
    assert np.array_equal(a_images, b_images) and np.array_equal(a_masks, b_masks)
    assert not np.array_equal(a_images, c_images) and not np.array_equal(a_masks, c_masks)
    assert a_masks.min() >= 0 and a_masks.max() <= 10
    assert all(0 < len(np.unique(m[m > 0])) <= 4 for m in a_masks)
    # background pixels are textured, not flat
    assert all(image[mask == 0].std() > 2 for image, mask in zip(a_images, a_masks))


def test_scene_arguments_are_checked():
    items, labels = synthetic_items(5)
    with pytest.raises(ValueError, match="items_per_scene"):
        make_scenes(items, labels, n=1, items_per_scene=(3, 2))
    with pytest.raises(ValueError, match="scale"):
        make_scenes(items, labels, n=1, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="one label each"):
        make_scenes(items, labels[:4], n=1)


def test_items_to_rgb():
    items, _ = synthetic_items(3)
    rgb = items_to_rgb(items)
    assert rgb.shape == (3, 28, 28, 3) and all(np.array_equal(rgb[..., c], items) for c in range(3))
    assert items_to_rgb(items, size=(40, 56)).shape == (3, 40, 56, 3)
    flat = np.full((2, 28, 28), 77, dtype=np.uint8)
    assert np.all(items_to_rgb(flat, size=64) == 77)
    with pytest.raises(ValueError, match="uint8"):
        items_to_rgb(items.astype(np.float32))


def test_write_scene_sample(tmp_path, fake_root):
    path = write_scene_sample(tmp_path / "out", n=256, split="test", root=fake_root)
    assert path.stat().st_size < 2 * 2**20
    with np.load(path) as sample:
        images, masks = fashion_scenes("test", 256, root=fake_root)
        assert np.array_equal(sample["images"], images)
        assert np.array_equal(sample["masks"], masks)
    # the fixed split seeds: train and test scenes differ
    train_masks = fashion_scenes("train", 4, root=fake_root)[1]
    assert not np.array_equal(train_masks, fashion_scenes("test", 4, root=fake_root)[1])


def test_write_item_sample_interleaves_the_first_items_of_each_class(tmp_path, fake_root):
    items, labels = load_fashion_mnist("test", fake_root)
    path = write_item_sample(tmp_path, per_class=6, split="test", root=fake_root)
    assert path.name == "fashion-items-test-60.npz"
    with np.load(path) as sample:
        assert sample["labels"].tolist() == list(range(10)) * 6
        for c in range(10):  # class c's items, in split order
            assert np.array_equal(sample["items"][c::10], items[labels == c][:6])
    with pytest.raises(ValueError, match="per_class"):
        write_item_sample(tmp_path, per_class=200, split="test", root=fake_root)


@needs_fashion_mnist
def test_bundled_item_sample_is_what_write_item_sample_writes(tmp_path):
    from importlib import resources
    with resources.as_file(resources.files("adclr.assets") / "fashion-items-test-1000.npz") as shipped, \
            np.load(shipped) as bundled, np.load(write_item_sample(tmp_path)) as fresh:
        assert all(np.array_equal(bundled[k], fresh[k]) for k in ("items", "labels"))


@needs_fashion_mnist
def test_real_fashion_mnist(tmp_path):
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    assert len(load_fashion_mnist("train")[0]) == 60000
    scene_images, masks = make_scenes(images[:500], labels[:500], n=32)
    assert set(np.unique(masks)) <= set(range(11)) and (masks > 0).mean() > 0.1
    assert write_scene_sample(tmp_path, n=256).stat().st_size < 2 * 2**20


def test_item_scenes_hold_one_labelled_item_over_a_textured_background(fake_root):
    images, labels = scenes.item_scenes("test", 40, root=fake_root)
    items, item_labels = synthetic_items(200, seed=len("test"))
    _, masks = make_scenes(items, item_labels, 40, items_per_scene=(1, 1), scale=(0.6, 0.9), seed=101)
    assert images.shape == (40, 64, 64, 3) and images.dtype == np.uint8
    present = [set(np.unique(m)) - {0} for m in masks]
    assert all(p == {label + 1} for p, label in zip(present, labels))  # the label is the one item's class
    background = images[masks == 0]
    assert background.std() > 10 and background.mean() > 10  # texture, not a black field
    train_images, _ = scenes.item_scenes("train", 40, root=fake_root)
    assert not np.array_equal(train_images, images)
