"""Tests for adclr.train.data: multi-crop views (float or uint8), query crops, image modes, the tolerant ImageFolder."""

import io
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps
from skimage import data as skdata
from torch.utils.data import DataLoader

from adclr.images import ImageFolder, to_rgb
from adclr.train.data import (IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation, QueryCropSampler, collate_multicrop,
                              normalize_uint8, resized_crops)
from adclr.train.photometric import DinoPhotometric

SAMPLE_PHOTOS = {"astronaut": skdata.astronaut(), "coffee": skdata.coffee(), "chelsea": skdata.chelsea()}
MEAN = (0.3, 0.5, 0.7)
STD = (0.2, 0.25, 0.3)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def reference_query(photo: np.ndarray, box, size: int, mean=MEAN, std=STD) -> torch.Tensor:
    """Crop the box and resize by hand with PIL, then normalise: an independent reference for one query."""
    x1, y1, x2, y2 = (int(v) for v in box)
    crop = Image.fromarray(photo).crop((x1, y1, x2, y2)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(crop, dtype=np.float64) / 255.0
    normed = (pixels - np.array(mean)) / np.array(std)
    return torch.from_numpy(normed.transpose(2, 0, 1)).float()


def small_aug(**kwargs) -> MultiCropAugmentation:
    settings = dict(global_size=32, local_size=16, num_local=2, num_queries=3, query_size=8)
    settings.update(kwargs)
    return MultiCropAugmentation(**settings)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "global_size, local_size, num_local, num_queries, query_size",
    [(64, 32, 3, 4, 16), (48, 24, 0, 2, 16), (40, 16, 2, 0, 16), (64, 32, 1, 3, 32)],
)
def test_multicrop_output_shapes_and_dtypes(global_size, local_size, num_local, num_queries, query_size):
    seed_all(0)
    aug = MultiCropAugmentation(
        global_size=global_size,
        local_size=local_size,
        num_local=num_local,
        num_queries=num_queries,
        query_size=query_size,
    )
    out = aug(Image.fromarray(SAMPLE_PHOTOS["chelsea"]))
    assert set(out) == {"global", "local", "queries"}
    assert out["global"].shape == (2, 3, global_size, global_size)
    assert out["local"].shape == (num_local, 3, local_size, local_size)
    assert out["queries"].shape == (num_queries, 3, query_size, query_size)
    for value in out.values():
        assert type(value) is torch.Tensor and value.dtype == torch.float32
        assert torch.isfinite(value).all()


def test_query_sampler_zero_queries():
    crops, boxes = QueryCropSampler(num_queries=0, size=16)(Image.fromarray(SAMPLE_PHOTOS["coffee"]))
    assert crops.shape == (0, 3, 16, 16) and crops.dtype == torch.float32
    assert boxes.shape == (0, 4)


def test_views_and_queries_share_mean_std():
    """A constant image: queries (no photometric by default) are exactly the normalised colour; views lie in range."""
    colour = np.array([200, 100, 50], dtype=np.uint8)
    image = Image.fromarray(np.broadcast_to(colour, (40, 60, 3)).copy())
    seed_all(1)
    out = small_aug(mean=MEAN, std=STD, num_queries=4)(image)
    expected = (torch.tensor(colour / 255.0) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out["queries"], expected.float().view(1, 3, 1, 1).expand(4, 3, 8, 8))
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    for views in (out["global"], out["local"]):
        per_channel = views.transpose(0, 1).reshape(3, -1)
        assert (per_channel >= low[:, None] - 1e-5).all() and (per_channel <= high[:, None] + 1e-5).all()


# ---------------------------------------------------------------- query crops


@pytest.mark.parametrize("name", sorted(SAMPLE_PHOTOS))
def test_query_boxes_inside_image_with_area_and_ratio_in_range(name):
    photo = SAMPLE_PHOTOS[name]
    height, width = photo.shape[:2]
    scale, ratio = (0.05, 0.25), (3 / 4, 4 / 3)
    seed_all(2)
    _, boxes = QueryCropSampler(num_queries=300, scale=scale, ratio=ratio, size=8)(Image.fromarray(photo))
    x1, y1, x2, y2 = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= width).all() and (y2 <= height).all()
    w, h = x2 - x1, y2 - y1
    # each side is rounded to whole pixels: allow half a pixel per side
    slack = (w + h) / 2 + 0.25
    assert (w * h >= scale[0] * height * width - slack).all() and (w * h <= scale[1] * height * width + slack).all()
    aspect = w / h
    assert (aspect >= (ratio[0] * h - 1) / (h + 1)).all() and (aspect <= (ratio[1] * h + 1) / (h - 1)).all()
    # the draws cover the ranges, not one corner of them
    fraction = w * h / (height * width)
    assert fraction.min() < 0.07 and fraction.max() > 0.23
    assert aspect.min() < 0.8 and aspect.max() > 1.25


@pytest.mark.parametrize("name, size", [("astronaut", 16), ("coffee", 32), ("chelsea", 16)])
def test_query_crops_equal_hand_resized_boxes(name, size):
    photo = SAMPLE_PHOTOS[name]
    seed_all(3)
    crops, boxes = QueryCropSampler(num_queries=6, size=size, mean=MEAN, std=STD)(Image.fromarray(photo))
    assert crops.shape == (6, 3, size, size)
    for crop, box in zip(crops, boxes):
        torch.testing.assert_close(crop, reference_query(photo, box, size), atol=1e-5, rtol=0)


def test_query_photometric_option_is_applied_to_each_crop():
    photo = SAMPLE_PHOTOS["astronaut"]
    seed_all(4)
    sampler = QueryCropSampler(num_queries=3, size=16, photometric=ImageOps.invert, mean=(0, 0, 0), std=(1, 1, 1))
    crops, boxes = sampler(Image.fromarray(photo))
    for crop, box in zip(crops, boxes):
        torch.testing.assert_close(crop, 1 - reference_query(photo, box, 16, (0, 0, 0), (1, 1, 1)), atol=1e-5, rtol=0)


def test_query_sampler_accepts_tensors_with_the_same_boxes():
    photo = SAMPLE_PHOTOS["coffee"]
    sampler = QueryCropSampler(num_queries=5, size=16, mean=MEAN, std=STD)
    seed_all(5)
    pil_crops, pil_boxes = sampler(Image.fromarray(photo))
    seed_all(5)
    tensor_crops, tensor_boxes = sampler(torch.from_numpy(photo).permute(2, 0, 1))
    seed_all(5)
    float_crops, _ = sampler(torch.from_numpy(photo).permute(2, 0, 1).float() / 255)
    assert torch.equal(pil_boxes, tensor_boxes)
    # tensor and PIL resampling differ by rounding only
    assert (tensor_crops - pil_crops).abs().mean() < 0.01
    assert (float_crops - pil_crops).abs().mean() < 0.01
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        sampler(torch.zeros(4, 20, 20))


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="scale"):
        QueryCropSampler(scale=(0.3, 0.1))
    with pytest.raises(ValueError, match="num_queries"):
        QueryCropSampler(num_queries=-1)
    with pytest.raises(ValueError, match="num_local"):
        MultiCropAugmentation(num_local=-1)
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropAugmentation(global_scale=(0.0, 1.0))
    with pytest.raises(TypeError, match="PIL"):
        small_aug()(np.zeros((8, 8, 3), dtype=np.uint8))


# ---------------------------------------------------------------- randomness


def test_same_seed_same_output_different_seed_differs():
    image = Image.fromarray(SAMPLE_PHOTOS["astronaut"])
    aug = small_aug(num_local=2, num_queries=3)
    seed_all(7)
    first = aug(image)
    seed_all(7)
    again = aug(image)
    seed_all(8)
    other = aug(image)
    for key in ("global", "local", "queries"):
        assert torch.equal(first[key], again[key])
        assert not torch.equal(first[key], other[key])


def test_photometric_probabilities_per_view():
    """Grayscale (p=0.2) hits every view type; solarize (p=0.2) only the second global view.

    Solarize: on a bright image (all channels >= 220) no jitter draw brings a pixel below 128, so a
    view whose mean falls below 0.5 has been solarized. Grayscale: on a mid-tone image (no jitter draw
    saturates every pixel), a view with identical channels has been converted to grayscale.
    """
    rng = np.random.default_rng(0)
    bright = Image.fromarray(rng.integers(220, 256, size=(24, 24, 3), dtype=np.uint8))
    midtone = Image.fromarray(rng.integers(60, 180, size=(24, 24, 3), dtype=np.uint8))
    aug = small_aug(global_size=16, local_size=16, num_local=1, num_queries=0, mean=(0, 0, 0), std=(1, 1, 1))

    def views(image):  # global1, global2, local
        out = aug(image)
        return torch.cat([out["global"], out["local"]])

    seed_all(9)
    draws = 200
    solarized = sum((views(bright).mean(dim=(1, 2, 3)) < 0.5).float() for _ in range(draws))
    gray = sum(
        ((v[:, 0] == v[:, 1]) & (v[:, 1] == v[:, 2])).flatten(1).all(1).float()
        for v in (views(midtone) for _ in range(draws))
    )
    assert solarized[0] == 0 and solarized[2] == 0
    assert 0.1 * draws < solarized[1] < 0.3 * draws
    assert ((0.1 * draws < gray) & (gray < 0.3 * draws)).all()


# ---------------------------------------------------------------- image modes


def test_to_rgb_rescales_high_bit_depth_and_drops_alpha():
    rgb = SAMPLE_PHOTOS["astronaut"][:64, :64]
    gray8 = np.asarray(Image.fromarray(rgb).convert("L"))
    sixteen = Image.fromarray(gray8.astype(np.uint16) * 257)  # 255 -> 65535
    assert sixteen.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(to_rgb(sixteen)), np.repeat(gray8[..., None], 3, axis=2))
    floats = Image.fromarray(gray8.astype(np.float32) / 255.0)
    assert floats.mode == "F"
    np.testing.assert_array_equal(np.asarray(to_rgb(floats)), np.repeat(gray8[..., None], 3, axis=2))
    rgba = Image.fromarray(rgb).convert("RGBA")
    np.testing.assert_array_equal(np.asarray(to_rgb(rgba)), rgb)


@pytest.mark.parametrize("mode", ["L", "LA", "1", "RGBA", "CMYK", "P", "I;16", "I", "F"])
def test_every_image_mode_gives_three_channel_floats(mode):
    rgb = SAMPLE_PHOTOS["chelsea"][:80, :96]
    if mode == "I;16":
        image = Image.fromarray(np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257)
    else:
        image = Image.fromarray(rgb).convert(mode)
    assert image.mode == mode
    seed_all(10)
    out = small_aug()(image)
    assert out["global"].shape == (2, 3, 32, 32) and out["global"].dtype == torch.float32
    assert out["local"].shape == (2, 3, 16, 16)
    assert out["queries"].shape == (3, 3, 8, 8)
    if mode == "I;16":  # 16-bit data is rescaled, not clipped to white
        assert out["queries"].std() > 0.1


# ---------------------------------------------------------------- ImageFolder


def write_image(path: Path, seed: int, size=(20, 30), fmt=None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


def write_truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(SAMPLE_PHOTOS["coffee"]).save(buffer, format="JPEG", quality=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.fixture
def strict_pil(monkeypatch):
    """Another test module may have switched PIL to tolerate truncation; these tests need the default."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


@pytest.fixture
def folder(tmp_path, strict_pil):
    root = tmp_path / "photos"
    write_image(root / "b" / "z.png", 0)
    write_image(root / "a" / "y.jpg", 1, fmt="JPEG")
    write_image(root / "a" / "deep" / "er" / "x.bmp", 2)
    write_image(root / "c.PPM", 3, fmt="PPM")
    write_image(root / "a" / "w.webp", 4, fmt="WEBP")
    write_truncated_jpeg(root / "a" / "bad.jpg")
    (root / "b" / "fake.png").write_text("this is not a png")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


def relative(ds: ImageFolder) -> list[str]:
    return [p.relative_to(ds.root).as_posix() for p in ds.paths]


def test_image_folder_finds_nested_files_in_sorted_order(folder):
    ds = ImageFolder(folder)
    assert relative(ds) == ["a/bad.jpg", "a/deep/er/x.bmp", "a/w.webp", "a/y.jpg", "b/fake.png", "b/z.png", "c.PPM"]
    assert relative(ImageFolder(folder)) == relative(ds)
    image = ds[relative(ds).index("b/z.png")]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(folder / "b" / "z.png")))
    assert relative(ImageFolder(folder, extensions=("png",))) == ["b/fake.png", "b/z.png"]


def test_image_folder_skips_bad_files_with_one_warning_each(folder):
    ds = ImageFolder(folder, transform=lambda im: np.asarray(im))
    names = relative(ds)
    with pytest.warns(UserWarning, match=r"bad\.jpg"):
        first = ds[names.index("a/bad.jpg")]
    # falls back to the next file in sorted order
    np.testing.assert_array_equal(first, np.asarray(Image.open(folder / "a/deep/er/x.bmp")))
    assert ds.num_skipped == 1 and ds.bad_paths == [folder / "a" / "bad.jpg"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known bad file is skipped silently
        again = ds[names.index("a/bad.jpg")]
    np.testing.assert_array_equal(again, first)
    with pytest.warns(UserWarning, match=r"fake\.png"):
        second = ds[names.index("b/fake.png")]
    np.testing.assert_array_equal(second, np.asarray(Image.open(folder / "b" / "z.png")))
    assert ds.num_skipped == 2
    assert len(ds) == 7  # the index space stays fixed while iterating


def test_image_folder_fallback_wraps_around(tmp_path, strict_pil):
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "z.png").write_text("not an image")
    ds = ImageFolder(tmp_path, transform=lambda im: np.asarray(im))
    with pytest.warns(UserWarning, match=r"z\.png"):
        np.testing.assert_array_equal(ds[1], np.asarray(Image.open(tmp_path / "a.png")))
    with pytest.raises(IndexError):
        ds[2]


def test_image_folder_verify_drops_bad_files(folder):
    ds = ImageFolder(folder)
    with pytest.warns(UserWarning) as record:
        dropped = ds.verify()
    assert dropped == 2
    messages = " ".join(str(w.message) for w in record)
    assert "bad.jpg" in messages and "fake.png" in messages
    assert relative(ds) == ["a/deep/er/x.bmp", "a/w.webp", "a/y.jpg", "b/z.png", "c.PPM"]
    assert ds.num_skipped == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [np.asarray(ds[i]).shape for i in range(len(ds))] == [(20, 30, 3)] * 5
        assert ds.verify() == 0


def test_image_folder_parent_dir_labels(folder):
    ds = ImageFolder(folder, labels="parent_dir")
    assert ds.classes == [".", "a", "a/deep/er", "b"]
    with pytest.warns(UserWarning):
        ds.verify()
    assert [(p.relative_to(folder).as_posix(), t) for p, t in zip(ds.paths, ds.targets)] == [
        ("a/deep/er/x.bmp", 2), ("a/w.webp", 1), ("a/y.jpg", 1), ("b/z.png", 3), ("c.PPM", 0)
    ]
    image, target = ds[3]
    assert isinstance(image, Image.Image) and target == 3
    with pytest.raises(ValueError, match="labels"):
        ImageFolder(folder, labels="folder")


def test_image_folder_empty_or_missing_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError) as info:
        ImageFolder(empty)
    assert str(empty) in str(info.value) and ".jpg" in str(info.value) and ".webp" in str(info.value)
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolder(missing)


def test_image_folder_all_bad_files_error(tmp_path, strict_pil):
    write_truncated_jpeg(tmp_path / "one.jpg")
    (tmp_path / "two.png").write_text("not an image")
    ds = ImageFolder(tmp_path)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="none of the 2 image files"):
        ds[0]
    assert ds.num_skipped == 2
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=str(tmp_path)):
        ImageFolder(tmp_path).verify()


# ---------------------------------------------------------------- collate


@pytest.mark.parametrize("num_local", [2, 0])
def test_collate_multicrop_with_dataloader(tmp_path, num_local):
    for i in range(5):
        write_image(tmp_path / f"d{i % 2}" / f"{i}.png", i, size=(36 + i, 40))
    aug = small_aug(num_local=num_local, num_queries=4, query_size=8)
    loader = DataLoader(ImageFolder(tmp_path, transform=aug), batch_size=2, collate_fn=collate_multicrop, num_workers=0)
    seed_all(11)
    batches = list(loader)
    assert len(batches) == 3
    batch = batches[0]
    assert len(batch["global"]) == 2 and all(v.shape == (2, 3, 32, 32) for v in batch["global"])
    assert len(batch["local"]) == num_local and all(v.shape == (2, 3, 16, 16) for v in batch["local"])
    assert batch["queries"].shape == (2, 4, 3, 8, 8)
    assert batches[-1]["queries"].shape == (1, 4, 3, 8, 8)
    # collation only regroups: view v of image b is the sample's view v
    seed_all(12)
    samples = [aug(Image.open(p)) for p in ImageFolder(tmp_path).paths[:2]]
    regrouped = collate_multicrop(samples)
    for key, count in (("global", 2), ("local", num_local)):
        for v in range(count):
            assert torch.equal(regrouped[key][v], torch.stack([s[key][v] for s in samples]))
    assert torch.equal(regrouped["queries"], torch.stack([s["queries"] for s in samples]))
    with pytest.raises(ValueError, match="empty batch"):
        collate_multicrop([])


# ---------------------------------------------------------------- uint8 pipeline: geometry and output


def pil_resized_crop(photo: np.ndarray, top: int, left: int, height: int, width: int, size: int) -> np.ndarray:
    """The box cut and resized by PIL (bicubic): the independent reference for a view's or a query's pixels."""
    box = (left, top, left + width, top + height)
    return np.asarray(Image.fromarray(photo).crop(box).resize((size, size), Image.BICUBIC)).transpose(2, 0, 1)


@pytest.mark.parametrize("name", sorted(SAMPLE_PHOTOS))
def test_resized_crops_are_pil_resizes_of_each_box(name):
    photo = SAMPLE_PHOTOS[name]
    places = [(0, 0, *photo.shape[:2]), (10, 20, 200, 250), (100, 100, 20, 30), (3, 3, 13, 11)]
    for size in (8, 96, 224):
        crops = resized_crops(torch.from_numpy(photo).permute(2, 0, 1), places, size)
        assert crops.shape == (len(places), 3, size, size) and crops.dtype == torch.uint8
        for crop, place in zip(crops, places):
            difference = np.abs(crop.numpy().astype(int) - pil_resized_crop(photo, *place, size))
            assert difference.max() <= 2 and difference.mean() < 0.5  # PIL rounds its two passes separately


def test_views_are_the_drawn_boxes_cropped():
    """With every photometric operation off, each view is PIL's resize of a box RandomResizedCrop draws, in the
    documented order: query boxes, local boxes, local photometric, global boxes, global photometric."""
    photo = SAMPLE_PHOTOS["coffee"]
    aug = small_aug(global_size=48, local_size=24, num_local=3, global_scale=(0.3, 1.0), local_scale=(0.05, 0.3))
    aug.local_photometric = aug.global_photometric = DinoPhotometric(blur_p=0.0, flip_p=0.0, jitter_p=0.0,
                                                                     grayscale_p=0.0)
    seed_all(13)
    out = aug(Image.fromarray(photo))
    seed_all(13)
    aug.query_sampler.sample_boxes(*photo.shape[:2])
    pixels = torch.from_numpy(photo).permute(2, 0, 1)
    drawn = {}
    for kind, crop, count in (("local", aug.local_crop, 3), ("global", aug.global_crop, 2)):
        drawn[kind] = [crop.make_params([pixels]) for _ in range(count)]
        torch.rand(count, 14)  # that kind's photometric draws
    for kind, size in (("local", 24), ("global", 48)):
        assert len({tuple(box.values()) for box in drawn[kind]}) == len(drawn[kind])  # distinct boxes
        for view, box in zip(out[kind], drawn[kind]):
            expected = pil_resized_crop(photo, box["top"], box["left"], box["height"], box["width"], size)
            normalised = normalize_uint8(torch.tensor(expected), IMAGENET_MEAN, IMAGENET_STD)
            torch.testing.assert_close(view, normalised, atol=2 / 255 / min(IMAGENET_STD) + 1e-5, rtol=0)


def test_uint8_output_is_the_float_output_before_normalisation():
    image = Image.fromarray(SAMPLE_PHOTOS["astronaut"])
    seed_all(14)
    floats = small_aug(mean=MEAN, std=STD)(image)
    seed_all(14)
    raw = small_aug(mean=MEAN, std=STD, normalize=False)(image)
    for key in ("global", "local", "queries"):
        assert raw[key].dtype == torch.uint8 and raw[key].shape == floats[key].shape
        # views are rounded to whole levels; query crops are whole levels before normalising in both
        torch.testing.assert_close(normalize_uint8(raw[key], MEAN, STD), floats[key],
                                   atol=0.5 / 255 / min(STD) + 1e-5, rtol=0)
    batch = collate_multicrop([raw, raw])
    assert batch["global"][0].dtype == torch.uint8 and batch["queries"].shape == (2, 3, 3, 8, 8)
    with pytest.raises(ValueError, match="uint8"):
        normalize_uint8(floats["global"], MEAN, STD)
