"""Dense features of any image size, PCA / attention pictures, ADCLR region embeddings, `adclr features` and the demo.

References are written plainly here: manual normalisation, a timm ViT built with ``dynamic_img_size=True`` on
manually padded inputs, numpy SVD, a hand-written attention softmax and a full boolean-mask ADCLR forward.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from safetensors.torch import load_file
from skimage import data as skdata
from timm.data import resolve_model_data_config
from timm.models.vision_transformer import VisionTransformer

from adclr.demo import bundled_samples, run_demo
from adclr.export import export_model
from adclr.features import attention_maps, embed_regions, extract_features, write_features
from adclr.pictures import attention_image, pca_image
from adclr.vit import any_input_size

torch.set_num_threads(1)
PATCH = 8


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=PATCH, embed_dim=48, depth=2, num_heads=3, num_classes=0)
    return VisionTransformer(**{**args, **kwargs}).eval()


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    return tiny_vit()


def dynamic_twin(model: VisionTransformer) -> VisionTransformer:
    """The same weights in a ViT built for any size by timm itself: the reference for non-native inputs."""
    twin = tiny_vit(dynamic_img_size=True)
    twin.load_state_dict(model.state_dict())
    return twin


def pad_right_bottom(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, math.ceil(w / PATCH) * PATCH - w, 0, math.ceil(h / PATCH) * PATCH - h))


def normalise(image: Image.Image, model: torch.nn.Module) -> torch.Tensor:
    config = resolve_model_data_config(model)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return (pixels - torch.tensor(config["mean"]).view(3, 1, 1)) / torch.tensor(config["std"]).view(3, 1, 1)


def photo(height: int, width: int, name: str = "astronaut") -> Image.Image:
    return Image.fromarray(getattr(skdata, name)()).resize((width, height), Image.Resampling.BICUBIC)


def state(model: VisionTransformer) -> tuple:
    pe = model.patch_embed
    return model.training, model.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt


# ---------------------------------------------------------------- extract_features


def expected_size(height: int, width: int, size) -> tuple[int, int]:
    if size is None:
        return height, width
    if isinstance(size, tuple):
        return size
    if height <= width:
        return size, round(width * size / height)
    return round(height * size / width), size


@pytest.mark.parametrize("height,width", [(32, 32), (24, 40), (37, 53), (9, 17), (50, 20)])
@pytest.mark.parametrize("size", [None, 16, (20, 44)])
def test_shapes_over_sizes(vit, height, width, size):
    out = extract_features(vit, torch.randn(2, 3, height, width), layers=[0], size=size)
    h, w = expected_size(height, width, size)
    grid = (math.ceil(h / PATCH), math.ceil(w / PATCH))
    assert out["cls"].shape == (2, 48)
    assert out["patch"].shape == out["layer0"].shape == (2, 48, *grid)


def test_native_size_equals_forward_features_and_manual_blocks(vit):
    x = torch.randn(3, 3, 32, 32)
    out = extract_features(vit, x, layers=[0, -1], norm=False)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        manual = torch.cat([vit.cls_token.expand(3, -1, -1), vit.patch_embed.proj(x).flatten(2).transpose(1, 2)], 1)
        after_block0 = vit.blocks[0](manual + vit.pos_embed)
    as_map = lambda t: t[:, 1:].transpose(1, 2).reshape(3, 48, 4, 4)  # noqa: E731
    torch.testing.assert_close(out["cls"], tokens[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["patch"], as_map(tokens), rtol=0, atol=1e-6)
    torch.testing.assert_close(out["layer0"], as_map(after_block0), rtol=0, atol=1e-5)
    normed = extract_features(vit, x, layers=[1], norm=True)
    torch.testing.assert_close(normed["layer1"], normed["patch"], rtol=0, atol=1e-6)
    assert not torch.allclose(out["layer1"], normed["layer1"])  # norm=False really skips the final norm


@pytest.mark.parametrize("height,width", [(37, 53), (16, 48), (40, 24)])
def test_any_size_equals_timm_dynamic_model_on_padded_input(vit, height, width):
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        reference = dynamic_twin(vit).forward_features(pad_right_bottom(x))
    out = extract_features(vit, x)
    grid = out["patch"].shape[-2:]
    torch.testing.assert_close(out["cls"], reference[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["patch"].flatten(2).transpose(1, 2), reference[:, 1:], rtol=0, atol=1e-5)
    assert tuple(grid) == (math.ceil(height / PATCH), math.ceil(width / PATCH))


def test_model_state_restored_even_after_errors():
    model = tiny_vit().train()
    x = torch.randn(1, 3, 32, 32)
    before, params = state(model), {k: v.clone() for k, v in model.state_dict().items()}
    extract_features(model, torch.randn(1, 3, 40, 24))
    attention_maps(model, torch.randn(3, 21, 30))
    embed_regions(model, torch.randn(3, 21, 30), [[0, 0, 8, 8]])
    with pytest.raises(ValueError, match="blocks"):
        extract_features(model, x, layers=[5])
    with pytest.raises(RuntimeError), any_input_size(model):
        raise RuntimeError("inside")
    assert state(model) == before
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    with pytest.raises(AssertionError, match="doesn't match model"):
        model.forward_features(torch.randn(1, 3, 40, 40))  # still a fixed-size model


@pytest.mark.parametrize("cell", [(1, 2), (4, 6), (0, 0), (3, 0)])
def test_patch_grid_mapping(vit, cell):
    """Brightening exactly the pixels of patch (i, j) (cut at the image edge) changes mostly that patch at block 0."""
    height, width = 37, 53  # grid 5 x 7; row 4 and column 6 are partly padding
    i, j = cell
    base = torch.zeros(1, 3, height, width)
    bright = base.clone()
    bright[..., i * PATCH:(i + 1) * PATCH, j * PATCH:(j + 1) * PATCH] = 3.0
    maps = [extract_features(vit, x, layers=[0], norm=False)["layer0"][0] for x in (base, bright)]
    change = (maps[1] - maps[0]).norm(dim=0)
    assert change.shape == (5, 7)
    assert divmod(int(change.argmax()), 7) == cell
    others = change.flatten().sort().values[-2]
    assert change[i, j] > 100 * others


def test_pil_path_and_tensor_inputs_agree(vit, tmp_path):
    image = photo(30, 45)
    path = tmp_path / "photo.png"
    image.save(path)
    tensor = normalise(image, vit)
    for size in (None, 20, (16, 40)):
        results = [extract_features(vit, source, layers=[0], size=size) for source in (image, path, str(path), tensor)]
        for other in results[1:]:
            assert other.keys() == results[0].keys()
            for key in other:
                torch.testing.assert_close(other[key], results[0][key], rtol=0, atol=1e-5)


def test_mixed_size_list_gives_one_dict_per_image(vit):
    images = [photo(32, 40), photo(24, 24, "chelsea"), photo(32, 40, "coffee"), photo(17, 50)]
    out = extract_features(vit, images, layers=[1], batch_size=1)
    assert isinstance(out, list) and len(out) == 4
    assert [tuple(o["patch"].shape) for o in out] == [(1, 48, 4, 5), (1, 48, 3, 3), (1, 48, 4, 5), (1, 48, 3, 7)]
    grouped = extract_features(vit, images, layers=[1])  # the two 32 x 40 images share a batch
    for one, image, together in zip(out, images, grouped):
        alone = extract_features(vit, image, layers=[1])
        for key in ("cls", "patch", "layer1"):
            torch.testing.assert_close(one[key], alone[key], rtol=0, atol=1e-5)
            torch.testing.assert_close(together[key], alone[key], rtol=0, atol=1e-5)


def test_bad_inputs_are_named(vit):
    with pytest.raises(ValueError, match="normalised float"):
        extract_features(vit, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="normalised float"):
        extract_features(vit, torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="B >= 1"):
        extract_features(vit, torch.zeros(0, 3, 32, 32))
    with pytest.raises(ValueError, match="at least one"):
        extract_features(vit, [])
    with pytest.raises(ValueError, match="shorter side"):
        extract_features(vit, torch.zeros(1, 3, 32, 32), size=0)
    with pytest.raises(TypeError, match="VisionTransformer"):
        extract_features(torch.nn.Conv2d(3, 8, 3), torch.zeros(1, 3, 32, 32))
    with pytest.raises(FileNotFoundError):
        extract_features(vit, "/nonexistent/image.png")


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each token (channel dim 1) between two feature maps or [CLS] batches."""
    return F.cosine_similarity(a.float(), b.float(), dim=1)


@pytest.mark.parametrize("dtype", ["bf16", torch.bfloat16, "fp16"])
def test_half_precision_features_are_float32_and_close_to_fp32(vit, dtype):
    images = [photo(40, 40), photo(30, 53, "chelsea")]
    weights = {k: v.clone() for k, v in vit.state_dict().items()}
    reference = extract_features(vit, images, layers=[0])
    half = extract_features(vit, images, layers=[0], dtype=dtype)
    for ref, out in zip(reference, half):
        assert set(out) == set(ref)
        for key in ref:
            assert out[key].shape == ref[key].shape and out[key].dtype == torch.float32
            assert token_cosine(out[key], ref[key]).min() > 0.99
            assert not torch.equal(out[key], ref[key])  # it did run in half precision
    batch = torch.stack([normalise(photo(32, 48), vit)])
    kept = extract_features(vit, batch, dtype="bf16", out_dtype=None)
    assert token_cosine(kept["patch"], extract_features(vit, batch)["patch"]).min() > 0.99
    assert extract_features(vit, batch, dtype="bf16", out_dtype=torch.bfloat16)["cls"].dtype == torch.bfloat16
    # autocast, not a cast model: the weights and their dtype are untouched
    assert all(torch.equal(v, weights[k]) and v.dtype == torch.float32 for k, v in vit.state_dict().items())


@pytest.mark.parametrize("dtype", ["float8", "half", torch.int8])
def test_unknown_dtype_is_named(vit, dtype, tmp_path):
    with pytest.raises(ValueError, match="not a compute precision; use one of fp32, bf16, fp16"):
        extract_features(vit, photo(16, 16), dtype=dtype)
    with pytest.raises(ValueError, match="compute precision"):
        write_features(vit, [tmp_path / "never_read.png"], tmp_path, dtype=dtype, progress=False)


# ---------------------------------------------------------------- pca_image


def structured_features(batch: int, h: int, w: int, channels: int = 16, seed: int = 0) -> torch.Tensor:
    """Rank-3 signal with well separated variances plus small noise: a PCA with a unique answer."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(channels, 3, generator=g))[0]
    coords = torch.randn(batch * h * w, 3, generator=g) * torch.tensor([5.0, 3.0, 1.5])
    flat = coords @ basis.T + 0.05 * torch.randn(batch * h * w, channels, generator=g)
    return flat.reshape(batch, h, w, channels).permute(0, 3, 1, 2)


def test_pca_matches_numpy_svd_up_to_sign():
    feats = structured_features(2, 5, 6)
    pictures = pca_image(feats)
    assert pictures.shape == (2, 5, 6, 3) and pictures.dtype == np.uint8
    flat = feats.permute(0, 2, 3, 1).reshape(-1, 16).double().numpy()
    centred = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projections = centred @ vt[:3].T
    colours = pictures.reshape(-1, 3).astype(np.float64)
    for c in range(3):
        for sign in (1, -1):
            p = sign * projections[:, c]
            scaled = np.round((p - p.min()) / (p.max() - p.min()) * 255)
            if np.abs(scaled - colours[:, c]).max() <= 1:
                break
        else:
            pytest.fail(f"channel {c} is not the min-max scaled principal component {c}")
    assert (pictures.reshape(-1, 3).min(0) == 0).all() and (pictures.reshape(-1, 3).max(0) == 255).all()


def test_pca_basis_and_scale_are_shared_across_images():
    a, b = structured_features(2, 4, 5, seed=1)
    b[:, 0, 0], b[:, 3, 4] = a[:, 1, 2], a[:, 0, 0]
    pair = pca_image(torch.stack([a, b]))
    assert (pair[1, 0, 0] == pair[0, 1, 2]).all() and (pair[1, 3, 4] == pair[0, 0, 0]).all()
    same = pca_image(torch.stack([a, a]))
    assert np.array_equal(same[0], same[1])
    c = structured_features(1, 3, 7, seed=2)[0]
    c[:, 2, 6] = a[:, 1, 2]
    mixed = pca_image([a, c])  # different grids: a list in, a list out, one basis
    assert [p.shape for p in mixed] == [(4, 5, 3), (3, 7, 3)]
    assert (mixed[1][2, 6] == mixed[0][1, 2]).all()
    assert not np.array_equal(pca_image(a), pair[0])  # the batch changes the basis / scaling
    assert pca_image(a).shape == (4, 5, 3)


def test_pca_nearest_upscaling():
    feats = structured_features(1, 3, 4)
    small, big = pca_image(feats), pca_image(feats, size=(9, 8))
    assert big.shape == (1, 9, 8, 3)
    assert np.array_equal(big[0], small[0].repeat(3, axis=0).repeat(2, axis=1))


@pytest.mark.parametrize("num_object", [8, 22])
def test_foreground_threshold_keeps_the_minority_side(num_object):
    g = torch.Generator().manual_seed(3)
    total, channels = 30, 12
    object_vec, background_vec = torch.randn(channels, generator=g) * 4, torch.randn(channels, generator=g) * 4
    is_object = torch.zeros(total, dtype=torch.bool)
    is_object[torch.randperm(total, generator=g)[:num_object]] = True
    flat = torch.where(is_object[:, None], object_vec, background_vec) + 0.3 * torch.randn(total, channels, generator=g)
    feats = flat.reshape(5, 6, channels).permute(2, 0, 1)
    picture = pca_image(feats, foreground_threshold=0.5)
    black = (picture == 0).all(-1).flatten()
    minority = is_object if num_object < total / 2 else ~is_object
    assert torch.equal(torch.from_numpy(~black), minority)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        pca_image(feats, foreground_threshold=1.5)
    with pytest.raises(ValueError, match="C >= 3"):
        pca_image(torch.randn(2, 4, 4))


# ---------------------------------------------------------------- attention


def plain_cls_attention(model: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of the [CLS] row in the last block, from its weights, per head: (heads, T)."""
    block = model.blocks[-1]
    x = F.layer_norm(tokens[0], (48,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    qkv = x @ block.attn.qkv.weight.T + block.attn.qkv.bias
    heads, d = 3, 16
    q = qkv[:, :48].reshape(-1, heads, d).transpose(0, 1)
    k = qkv[:, 48:96].reshape(-1, heads, d).transpose(0, 1)
    return torch.softmax(q[:, 0:1] @ k.transpose(1, 2) / math.sqrt(d), dim=-1)[:, 0]


def test_attention_maps_equal_timm_internals_at_native_size():
    model = tiny_vit()
    model.blocks[-1].attn.fused_attn = False  # timm's explicit path materialises the softmax in attn_drop
    captured = []
    hook = model.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o))
    x = torch.randn(3, 32, 32)
    with torch.no_grad():
        model.forward_features(x[None])
    hook.remove()
    maps = attention_maps(model, x)
    assert maps.shape == (3, 4, 4)
    torch.testing.assert_close(maps, captured[0][0, :, 0, 1:].reshape(3, 4, 4), rtol=0, atol=1e-6)


def test_attention_maps_equal_plain_softmax_on_any_size(vit):
    x = torch.randn(3, 37, 21)
    inputs = []
    twin = dynamic_twin(vit)
    hook = twin.blocks[-1].register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    with torch.no_grad():
        twin.forward_features(pad_right_bottom(x)[None])
        reference = plain_cls_attention(twin, inputs[0])
    hook.remove()
    maps = attention_maps(vit, x)
    assert maps.shape == (3, 5, 3)
    torch.testing.assert_close(maps.flatten(1), reference[:, 1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(maps.sum((1, 2)) + reference[:, 0], torch.ones(3), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one image"):
        attention_maps(vit, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="CLS"):
        attention_maps(tiny_vit(class_token=False, global_pool="avg"), x)


def test_attention_image_tiles_heads_as_a_monotone_heat_map():
    maps = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    maps[1] = maps[1].flip(-1)
    picture = attention_image(maps)
    assert picture.shape == (3, 8, 3) and picture.dtype == np.uint8
    brightness = picture.astype(int).sum(-1)
    first = brightness[:, :4].flatten()
    assert (np.diff(first) > 0).all()  # larger attention, brighter pixel
    assert (picture[0, 0] == 0).all() and (picture[2, 3] == 255).all()  # min black, max white, per head
    assert (picture[0, 7] == 0).all() and (picture[2, 4] == 255).all()
    assert attention_image(maps, size=(6, 12)).shape == (6, 24, 3)
    assert np.array_equal(attention_image(maps, size=(6, 12))[::2, ::3], picture)


# ---------------------------------------------------------------- embed_regions


def test_embed_regions_equal_a_full_mask_adclr_forward():
    """Patch-sized integer boxes are cropped without resampling, so the reference is exact and written by hand."""
    model = tiny_vit(img_size=(40, 48))
    image = torch.randn(3, 40, 48)
    boxes = [[8, 16, 16, 24], [0, 0, 8, 8], [40, 32, 48, 40]]
    embeddings = embed_regions(model, image, torch.tensor(boxes, dtype=torch.float32))
    with torch.no_grad():
        patches = model.patch_embed.proj(image[None]).flatten(2).transpose(1, 2)
        tokens = torch.cat([model.cls_token, patches], dim=1) + model.pos_embed
        crops = torch.stack([image[:, y1:y2, x1:x2] for x1, y1, x2, y2 in boxes])
        queries = model.patch_embed.proj(crops).flatten(1)[None]
        x = torch.cat([tokens, queries], dim=1)
        s, r = tokens.shape[1], len(boxes)
        mask = torch.zeros(s + r, s + r, dtype=torch.bool)
        mask[:, :s] = True
        for i in range(r):
            mask[s + i, s + i] = True
        for block in model.blocks:
            x = block(x, attn_mask=mask)
        reference = model.norm(x)[0, s:]
    assert embeddings.shape == (3, 48)
    torch.testing.assert_close(embeddings, reference, rtol=0, atol=1e-5)


def test_embed_regions_validates_boxes(vit):
    image = torch.randn(3, 32, 40)
    cases = [
        ([0, 0, 8, 8], "shape"),
        ([[0, 0, 8]], "shape"),
        ([[8, 0, 8, 8]], "x2 > x1"),
        ([[0, 9, 8, 3]], "y2 > y1"),
        ([[0, 0, 8, 8], [30, 0, 41, 8]], r"boxes \[1\] leave the 40x32"),
        ([[-1, 0, 8, 8]], "leave"),
        ([[0, 0, float("nan"), 8]], "NaN"),
    ]
    for boxes, message in cases:
        with pytest.raises(ValueError, match=message):
            embed_regions(vit, image, boxes)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        embed_regions(vit, image, [[0, 0, 8, 8]], query_size=12)
    assert embed_regions(vit, image, np.zeros((0, 4))).shape == (0, 48)
    assert embed_regions(vit, image, [[0.5, 1.2, 7.5, 31.9]], query_size=16).shape == (1, 48)


def test_region_embedding_is_nearest_to_the_same_region_after_a_colour_change(vit):
    """9 regions of a real photo; each region's embedding in a brightened, lower-contrast copy is closer (cosine) to
    the same region than to any other region of the original (seed 0: min margin 0.2 with this random-init ViT)."""
    image = photo(96, 96)
    changed = ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(1.2)).enhance(0.9)
    boxes = [[x, y, x + 24, y + 24] for y in range(0, 96, 32) for x in range(0, 96, 32)]
    original = F.normalize(embed_regions(vit, image, boxes), dim=1)
    similarity = F.normalize(embed_regions(vit, changed, boxes), dim=1) @ original.T
    same = similarity.diagonal()
    other = (similarity - 2 * torch.eye(len(boxes))).max(dim=1).values
    assert (same - other).min() > 0.1
    # the read-out depends on the context image, not only on the crop: black out everything but region 4
    masked = np.zeros((96, 96, 3), dtype=np.uint8)
    x1, y1, x2, y2 = boxes[4]
    masked[y1:y2, x1:x2] = np.asarray(image)[y1:y2, x1:x2]
    alone = F.normalize(embed_regions(vit, Image.fromarray(masked), [boxes[4]]), dim=1)[0]
    assert (alone - original[4]).abs().max() > 1e-3  # small with random weights: the crop dominates (cos 0.9995)


# ---------------------------------------------------------------- demo and command line


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny ViT exported as a plain timm folder (loads with 'local-dir:')."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=PATCH, embed_dim=48, depth=2,
                              num_heads=3, num_classes=0)
    folder = tmp_path_factory.mktemp("exported")
    export_model(model, folder)
    return folder


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    photo(40, 40).save(folder / "square.png")
    photo(30, 53, "chelsea").save(folder / "wide.png")
    return folder


def test_run_demo_writes_pictures_and_report(exported, samples, tmp_path):
    out = run_demo(tmp_path / "demo", f"local-dir:{exported}", samples=samples)
    names = {p.name for p in out.iterdir()}
    assert names == {"square_pca.png", "square_attention.png", "wide_pca.png", "wide_attention.png", "overview.png",
                     "report.md"}
    assert Image.open(out / "wide_pca.png").size == (56, 32)  # padded grid 4 x 7 at pixel scale (W, H)
    assert Image.open(out / "wide_attention.png").size == (3 * 56, 32)
    assert Image.open(out / "overview.png").size == (5 * 56, 40 + 32)  # input | PCA | 3 heads, one row per image
    report = (out / "report.md").read_text()
    assert f"local-dir:{exported}" in report and "square.png" in report and "(48, 4, 7)" in report
    assert "seconds" in report


def test_run_demo_on_the_bundled_samples(exported, tmp_path):
    bundled = bundled_samples()
    assert bundled and all(p.suffix == ".png" for p in bundled)
    out = run_demo(tmp_path / "demo", f"local-dir:{exported}")
    heights = [Image.open(p).height for p in bundled]
    assert Image.open(out / "overview.png").height == sum(math.ceil(h / PATCH) * PATCH for h in heights)
    assert {f"{p.stem}_pca.png" for p in bundled} <= {p.name for p in out.iterdir()}


def test_write_features_skips_unreadable_files_and_keeps_names_apart(vit, samples, tmp_path):
    twin_dir = tmp_path / "other"
    twin_dir.mkdir()
    photo(24, 24, "coffee").save(twin_dir / "square.png")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    failed = write_features(vit, [samples / "square.png", bad, twin_dir / "square.png"], out, size=None,
                            format="safetensors", progress=False)
    assert list(failed) == [str(bad)]
    assert sorted(p.name for p in out.iterdir()) == ["square.safetensors", "square_2.safetensors", "square_2_pca.png",
                                                      "square_pca.png"]
    assert load_file(out / "square_2.safetensors")["patch"].shape == (48, 3, 3)
    with pytest.raises(ValueError, match="format"):
        write_features(vit, [samples / "square.png"], out, format="pt")


# These go through `adclr.cli.main`; they pass once the `features` / `demo` sub-commands are in adclr/cli.py.


def test_cli_features_writes_files_and_reports_bad_images(exported, samples, tmp_path, capsys):
    from adclr.cli import main

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    images = [samples / "square.png", samples / "wide.png", bad, tmp_path / "missing.jpg"]
    out = tmp_path / "features"
    code = main(["features", *map(str, images), "--model", f"local-dir:{exported}", "--out", str(out),
                 "--layers", "0", "--size", "native"])
    assert code == 1
    assert "broken.png" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["square.npz", "square_pca.png", "wide.npz", "wide_pca.png"]
    saved = np.load(out / "wide.npz")
    model = timm.create_model(f"local-dir:{exported}", pretrained=True)
    expected = extract_features(model, Image.open(samples / "wide.png"), layers=[0])
    assert set(saved.files) == {"cls", "patch", "layer0", "input_size"}
    assert saved["input_size"].tolist() == [30, 53]
    for key in ("cls", "patch", "layer0"):
        np.testing.assert_allclose(saved[key], expected[key][0].numpy(), rtol=0, atol=1e-5)
    assert Image.open(out / "wide_pca.png").size == (53, 30)


def test_cli_features_safetensors_default_size_and_exit_code(exported, samples, tmp_path):
    from adclr.cli import main

    out = tmp_path / "features"
    code = main(["features", str(samples / "wide.png"), "--model", f"local-dir:{exported}", "--out", str(out),
                 "--format", "safetensors"])
    assert code == 0
    tensors = load_file(out / "wide.safetensors")
    assert tensors["input_size"].tolist() == [32, 57]  # the model's 32 px input size as the shorter side
    assert tensors["patch"].shape == (48, 4, 8)
    code = main(["features", str(samples / "wide.png"), "--model", f"local-dir:{exported}", "--out", str(out),
                 "--size", "16x24"])
    assert code == 0 and np.load(out / "wide.npz")["patch"].shape == (48, 2, 3)
    code = main(["features", str(samples / "wide.png"), "--model", f"local-dir:{exported}", "--out", str(out),
                 "--size", "24,16"])
    assert code == 0 and np.load(out / "wide.npz")["patch"].shape == (48, 3, 2)


def test_cli_demo(exported, samples, tmp_path):
    from adclr.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--model", f"local-dir:{exported}",
                 "--samples", str(samples)]) == 0
    assert (tmp_path / "d" / "overview.png").is_file() and (tmp_path / "d" / "report.md").is_file()


def test_cli_features_dtype_bf16_writes_float32_close_to_fp32(exported, samples, tmp_path):
    from adclr.cli import main

    for dtype in ("fp32", "bf16"):
        code = main(["features", str(samples / "wide.png"), "--model", f"local-dir:{exported}",
                     "--out", str(tmp_path / dtype), "--dtype", dtype])
        assert code == 0
    full, half = (np.load(tmp_path / dtype / "wide.npz") for dtype in ("fp32", "bf16"))
    for key in ("cls", "patch"):
        assert half[key].dtype == np.float32 and half[key].shape == full[key].shape
        cosine = token_cosine(torch.from_numpy(half[key]).unsqueeze(0), torch.from_numpy(full[key]).unsqueeze(0))
        assert cosine.min() > 0.99
