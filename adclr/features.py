"""The one feature extractor: [CLS] and patch maps of any images, [CLS] attention, ADCLR region embeddings.

Evaluation (`adclr.evaluate`), the demo and ``adclr features`` all extract here, so one rule decides what a model sees.
Any image size works with any timm ViT, fixed-size ones included: for the duration of a call the model runs in timm's
dynamic-size mode (`adclr.vit.any_input_size`: the position embedding is resampled to the grid, bicubic) and every
attribute touched is restored afterwards. At the model's native size the tokens are exactly those of
``forward_features``.

Patch geometry: an input of H x W pixels (after the optional resize to ``size``) is padded with zeros -- after
normalisation, so with the mean colour -- on the right and bottom to a multiple of the patch size p. The grid is
ceil(H / p) x ceil(W / p) and patch (i, j) covers pixels [i*p, (i+1)*p) x [j*p, (j+1)*p) of the resized input.

Resize rule: ``size=None`` keeps each image's size, an int resizes the shorter side to it (aspect kept), (H, W)
resizes exactly. Preprocessing (mean, std, interpolation) comes from ``timm.data.resolve_model_data_config(model)``.
Images are converted to normalised float tensors first and resized as tensors (antialiased), so a PIL image, its
file and its normalised tensor give the same features, resized or not.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from timm.data import resolve_model_data_config
from timm.data.transforms import str_to_interp_mode
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from .errors import InvalidSettingError
from .images import load_rgb, to_rgb
from .pictures import pixel_pca
from .queries import forward_with_queries
from .vit import any_input_size, check_standard_blocks, check_vit, first_row_attention, pad_to_patch, \
    tokens_before_blocks

#: The small ViT shipped with the package (depth 6, width 192, patch 8, 64 px, trained on Fashion-MNIST scenes).
DEMO_MODEL = "adclr_vit_mini_patch8.demo"
FORMATS = ("npz", "safetensors")
#: Compute precisions of `extract_features`: fp32 runs the model as it is, bf16 / fp16 run it under torch.autocast.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ImageLike = Image.Image | str | os.PathLike
Size = int | tuple[int, int] | None


# ---------------------------------------------------------------- model state


def compute_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'fp32' / 'bf16' / 'fp16' (or torch.float32 / bfloat16 / float16) -> the torch dtype; anything else is named."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InvalidSettingError(f"dtype={dtype!r} is not a compute precision; use one of {', '.join(DTYPES)} "
                              "(or torch.float32 / torch.bfloat16 / torch.float16)")


@contextmanager
def _inference(model: VisionTransformer, dtype: torch.dtype = torch.float32) -> Iterator[VisionTransformer]:
    """Eval mode, no autograd, any input size and, for bf16 / fp16, autocast; the train/eval mode is restored after.

    Autocast rather than a cast model: the caller's weights stay as they are, and the precision-sensitive ops (layer
    norms, softmax) keep fp32 while the matmuls (and on CUDA the fused attention) run in the half type.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device.type
    try:
        with torch.no_grad(), any_input_size(model), torch.autocast(device, dtype=dtype,
                                                                    enabled=dtype != torch.float32):
            yield model
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- preprocessing


def _target_size(height: int, width: int, size: Size) -> tuple[int, int]:
    """``size``: None keeps (H, W); an int becomes the shorter side (aspect kept); (H, W) is taken exactly."""
    if size is None:
        return height, width
    if isinstance(size, int):
        if size < 1:
            raise InvalidSettingError(f"size={size} must be >= 1 (the shorter side in pixels) or (H, W) or None")
        if height <= width:
            return size, max(1, round(width * size / height))
        return max(1, round(height * size / width)), size
    if len(size) != 2 or min(size) < 1:
        raise InvalidSettingError(f"size={size!r} must be an int (shorter side), an (H, W) pair of positive ints, "
                                  "or None")
    return int(size[0]), int(size[1])


def _normalised(model: nn.Module, image: ImageLike | Tensor) -> Tensor:
    """One image -> normalised float (1, 3, H, W) at its own size; a (3, H, W)/(1, 3, H, W) tensor is taken as is."""
    if isinstance(image, Tensor):
        x = image.unsqueeze(0) if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[:2] != (1, 3) or not x.is_floating_point():
            raise InvalidSettingError("one image must be a normalised float (3, H, W) or (1, 3, H, W) tensor, got "
                                      f"{x.dtype} {tuple(image.shape)}; give batches to extract_features and raw "
                                      "images as PIL/paths")
        return x
    if isinstance(image, str | os.PathLike):
        image = load_rgb(Path(image))
    elif isinstance(image, Image.Image):
        image = to_rgb(image)
    else:
        raise TypeError(f"expected a PIL image, a path or a normalised float tensor, got {type(image).__name__}")
    config = resolve_model_data_config(model)
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    return ((TF.pil_to_tensor(image).float() / 255 - mean) / std).unsqueeze(0)


def _resized(model: nn.Module, x: Tensor, size: Size) -> Tensor:
    """Resize (B, 3, H, W) with the model's interpolation (antialiased); a no-op at the target size."""
    target = _target_size(*x.shape[-2:], size)
    if tuple(x.shape[-2:]) == target:
        return x
    mode = str_to_interp_mode(resolve_model_data_config(model)["interpolation"])
    return TF.resize(x, list(target), interpolation=mode, antialias=True)


def _padded(model: VisionTransformer, x: Tensor) -> Tensor:
    """Zero-pad right/bottom to patch multiples and move to the model's device and dtype."""
    x = pad_to_patch(model, x)
    parameter = next(model.parameters())
    return x.to(device=parameter.device, dtype=parameter.dtype)


# ---------------------------------------------------------------- features


def _block_indices(model: VisionTransformer, layers: Sequence[int]) -> list[int]:
    depth = len(model.blocks)
    bad = [i for i in layers if not -depth <= i < depth]
    if bad:
        raise InvalidSettingError(f"layers {bad} do not exist: the model has {depth} blocks, so use indices "
                                  f"0..{depth - 1} (or -{depth}..-1 from the end)")
    return sorted({i % depth for i in layers})


def _forward(model: VisionTransformer, x: Tensor, layers: Sequence[int] | None, norm: bool) -> dict[str, Tensor]:
    """Padded (B, 3, H, W) -> {'cls', 'patch', 'layer<i>'...}; run inside `_inference`."""
    ph, pw = model.patch_embed.patch_size
    grid = dict(h=x.shape[-2] // ph, w=x.shape[-1] // pw)
    indices = _block_indices(model, layers or [])
    if indices:
        final, intermediates = model.forward_intermediates(x, indices=indices, norm=norm)
    else:
        final, intermediates = model.forward_features(x), []
    out = {"cls": model.forward_head(final, pre_logits=True),
           "patch": rearrange(final[:, model.num_prefix_tokens:], "b (h w) c -> b c h w", **grid)}
    out.update({f"layer{i}": maps for i, maps in zip(indices, intermediates)})
    return out


def extract_features(model: nn.Module, images: Tensor | ImageLike | Sequence[ImageLike], *,
                     layers: Sequence[int] | None = None, norm: bool = True, size: Size = None,
                     batch_size: int = 32, dtype: str | torch.dtype = "fp32",
                     out_dtype: torch.dtype | None = torch.float32) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """Patch features of any images: ``{'cls': (B, C), 'patch': (B, C, h, w), 'layer<i>': (B, C, h, w)...}``.

    ``images``: a normalised float batch (B, 3, H, W) or (3, H, W), one PIL image or path, or a list of PIL images /
    paths / (3, H, W) tensors of any sizes. A tensor or a single image gives one batched dict; a list gives a list of
    dicts, one per image (each with B = 1), computed in batches of equal-size images. ``size``: None keeps each image's
    size, an int resizes the shorter side to it (aspect kept), (H, W) resizes exactly; the grid and the patch-to-pixel
    mapping are in the module docstring. ``cls`` is the model's pooled embedding (the [CLS] token after the final norm
    for ADCLR/DINO ViTs) and ``patch`` the last block's patch tokens after the final norm. ``layers``: block indices
    (0-based, negative from the end) whose patch maps to add as ``layer<i>`` (i non-negative), through timm's
    ``forward_intermediates``; ``norm`` applies the final norm to them. ``dtype``: the compute precision, 'fp32' (the
    model as it is), 'bf16' or 'fp16' (under torch.autocast on the model's device; on a CPU without bf16/fp16
    instructions they run, but slower than fp32). Outputs stay on the model's device, as ``out_dtype`` (default
    float32; None: as computed).
    """
    vit = check_vit(model)
    precision = compute_dtype(dtype)
    if batch_size < 1:
        raise InvalidSettingError(f"batch_size={batch_size} must be >= 1")

    def converted(out: dict[str, Tensor]) -> dict[str, Tensor]:
        return out if out_dtype is None else {key: value.to(out_dtype) for key, value in out.items()}

    if isinstance(images, Tensor) or not isinstance(images, Sequence) or isinstance(images, str):
        batch = images if isinstance(images, Tensor) and images.ndim == 4 else _normalised(vit, images)
        if batch.shape[1] != 3 or not batch.is_floating_point() or not len(batch):
            raise InvalidSettingError(f"an image batch must be normalised float (B >= 1, 3, H, W), got {batch.dtype} "
                                      f"{tuple(batch.shape)}")
        with _inference(vit, precision):
            outputs = [_forward(vit, _padded(vit, part), layers, norm)
                       for part in _resized(vit, batch, size).split(batch_size)]
        return converted({key: torch.cat([out[key] for out in outputs]) for key in outputs[0]})
    inputs = [_resized(vit, _normalised(vit, image), size) for image in images]
    if not inputs:
        raise InvalidSettingError("no images given; pass at least one PIL image, path or tensor")
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(inputs):
        by_size.setdefault(tuple(x.shape[-2:]), []).append(i)
    results: list[dict[str, Tensor]] = [{} for _ in inputs]
    with _inference(vit, precision):
        for members in by_size.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                out = converted(_forward(vit, _padded(vit, torch.cat([inputs[i] for i in chunk])), layers, norm))
                for row, i in enumerate(chunk):
                    results[i] = {key: value[row:row + 1] for key, value in out.items()}
    return results


# ---------------------------------------------------------------- attention


def attention_maps(model: nn.Module, image: ImageLike | Tensor, *, size: Size = None) -> Tensor:
    """(heads, h, w) float: the [CLS] token's attention to each patch in the last block, per head.

    Tokens run through all blocks but the last; the last block's softmax(q k^T * scale) is recomputed from its own
    qkv (and q/k norms) for the [CLS] row. Values are the raw softmax weights, so over patches they sum to 1 minus
    what [CLS] (and any register tokens) receive. ``image`` and ``size`` as for one image of `extract_features`.
    """
    vit = check_vit(model)
    if vit.cls_token is None:
        raise InvalidSettingError("attention_maps needs a ViT with a [CLS] token (class_token=True)")
    check_standard_blocks(vit.blocks[-1:], "attention_maps")
    x = _padded(vit, _resized(vit, _normalised(vit, image), size))
    ph, pw = vit.patch_embed.patch_size
    with _inference(vit):
        tokens = tokens_before_blocks(vit, x)
        for block in vit.blocks[:-1]:
            tokens = block(tokens)
        weights = first_row_attention(vit.blocks[-1], tokens)
    patches = weights[0, :, vit.num_prefix_tokens:].float()
    return rearrange(patches, "n (h w) -> n h w", h=x.shape[-2] // ph, w=x.shape[-1] // pw)


# ---------------------------------------------------------------- regions


def _checked_boxes(boxes: Tensor | np.ndarray | Sequence, height: int, width: int) -> Tensor:
    """(K, 4) x1, y1, x2, y2 pixel boxes inside the image -> integer boxes covering them (floor / ceil)."""
    boxes = (boxes.detach() if isinstance(boxes, Tensor) else torch.as_tensor(np.asarray(boxes))).double().cpu()
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InvalidSettingError(f"boxes must have shape (K, 4) as x1, y1, x2, y2 in pixels, got {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise InvalidSettingError("boxes contain NaN or infinite values; give finite pixel coordinates")
    x1, y1, x2, y2 = boxes.unbind(1)
    for name, bad in (("x2 > x1", x2 <= x1), ("y2 > y1", y2 <= y1)):
        if bad.any():
            raise InvalidSettingError(f"boxes {bad.nonzero().flatten().tolist()} are empty: each box needs {name} "
                                      "(torchvision's x1, y1, x2, y2 order)")
    outside = (x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height)
    if outside.any():
        raise InvalidSettingError(f"boxes {outside.nonzero().flatten().tolist()} leave the {width}x{height} (W x H) "
                                  f"image; clip them to 0 <= x <= {width}, 0 <= y <= {height} (coordinates of the "
                                  "input image)")
    return torch.cat([boxes[:, :2].floor(), boxes[:, 2:].ceil()], dim=1).long()


def embed_regions(model: nn.Module, image: ImageLike | Tensor, boxes: Tensor | np.ndarray | Sequence, *,
                  size: Size = None, query_size: int | None = None, query_pos: str = "none") -> Tensor:
    """(K, C) embeddings of boxes (K, 4) = pixel x1, y1, x2, y2 of ``image``, read out the ADCLR way.

    Each box is cropped from the image at its own resolution, resized to ``query_size`` (default: the patch size) and
    embedded as one query token by the ViT's patch embedding; the query tokens then read the whole image (resized to
    ``size``) through the one-way attention of training (`adclr.train.queries.forward_with_queries`, each query
    sees [CLS] + image + itself) and come out after the final norm. Box coordinates are rounded outwards to pixels.
    """
    vit = check_vit(model)
    full = _normalised(vit, image)
    height, width = full.shape[-2:]
    boxes = _checked_boxes(boxes, height, width)
    side = query_size or vit.patch_embed.patch_size[0]
    mode = str_to_interp_mode(resolve_model_data_config(vit)["interpolation"])
    crops = [TF.resized_crop(full[0], y1, x1, y2 - y1, x2 - x1, [side, side], interpolation=mode, antialias=True)
             for x1, y1, x2, y2 in boxes.tolist()]
    if not crops:
        return torch.empty(0, vit.embed_dim, device=next(vit.parameters()).device)
    context = _padded(vit, _resized(vit, full, size))
    queries = torch.stack(crops).unsqueeze(0).to(context)
    with _inference(vit):
        _, query_tokens = forward_with_queries(vit, context, queries, "self", query_pos=query_pos)
    return query_tokens[0]


# ---------------------------------------------------------------- files


def save_features(features: Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Write tensors to ``.npz`` (numpy) or ``.safetensors``, chosen by the file suffix."""
    path = Path(path)
    tensors = {key: value.detach().cpu().contiguous() for key, value in features.items()}
    if path.suffix == ".npz":
        np.savez(path, **{key: value.numpy() for key, value in tensors.items()})
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        raise InvalidSettingError(f"cannot write {path.name}: use a .npz or .safetensors file name")
    return path


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


def write_features(model: nn.Module, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                   layers: Sequence[int] | None = None, size: Size = None, format: str = "npz",
                   dtype: str | torch.dtype = "fp32", progress: bool = True) -> dict[str, str]:
    """Per image file: ``<stem>.npz`` / ``.safetensors`` and ``<stem>_pca.png`` in ``out_dir``; -> {path: error}.

    Files hold ``cls`` (C,), ``patch`` (C, h, w), ``layer<i>`` (C, h, w) and ``input_size`` (H, W), the resized input
    the grid covers, all float32 whatever the compute ``dtype`` (as for `extract_features`). Unreadable images are
    skipped and returned with their error; repeated stems get ``_2``, ``_3``.
    """
    compute_dtype(dtype)  # a bad name fails before any file is read
    if format not in FORMATS:
        raise InvalidSettingError(f"format={format!r} is not supported; use one of {FORMATS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    used: set[str] = set()
    for path in tqdm([Path(p) for p in paths], desc="features", unit="image", disable=not progress):
        try:
            image = load_rgb(path)
        except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
            failed[str(path)] = f"{type(error).__name__}: {error}"
            continue
        height, width = _target_size(image.height, image.width, size)
        features = {key: value[0] for key, value in
                    extract_features(model, image, layers=layers, size=size, dtype=dtype).items()}
        features["input_size"] = torch.tensor([height, width])
        stem = _unique_stem(path, used)
        save_features(features, out_dir / f"{stem}.{format}")
        Image.fromarray(pixel_pca(model, features["patch"], (height, width))).save(out_dir / f"{stem}_pca.png")
    return failed
