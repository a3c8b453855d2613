"""`adclr demo`: the bundled model on the bundled sample images, offline and in seconds, written as pictures.

Per sample: the PCA picture of its patch features (one basis shared by all samples, so equal colours mean similar
features across images) and the [CLS] attention of every head in the last block; an overview with one row per sample
(input | PCA | attention heads) and ``report.md``. Pictures are at pixel scale on the padded grid, so the input is
shown padded the same way (black right/bottom margin when a side is not a multiple of the patch size).
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import MissingFileError
from .load import load_model
from .models import MANIFEST
from .features import DEMO_MODEL, attention_maps, extract_features
from .pictures import attention_image, pca_image
from .images import load_rgb

SAMPLES_PACKAGE, SAMPLES_FOLDER = "adclr.assets", "samples"


def bundled_samples() -> list[Path]:
    """The sample PNGs shipped in ``adclr/assets/samples``."""
    try:
        folder = resources.files(SAMPLES_PACKAGE) / SAMPLES_FOLDER
    except ModuleNotFoundError:
        folder = None
    found = folder is not None and folder.is_dir()
    paths = sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".png")) if found else []
    if not paths:
        raise MissingFileError(f"no bundled sample images in {SAMPLES_PACKAGE}/{SAMPLES_FOLDER}; reinstall adclr or "
                               "pass samples=FOLDER (adclr demo --samples FOLDER)")
    return paths


def _sample_paths(samples: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    if samples is None:
        return bundled_samples()
    if isinstance(samples, str | os.PathLike):
        if not Path(samples).is_dir():
            raise MissingFileError(f"--samples {samples}: no such folder; pass a folder of PNGs")
        paths = sorted(p for p in Path(samples).iterdir() if p.suffix.lower() == ".png")
    else:
        paths = [Path(p) for p in samples]
    if not paths:
        raise MissingFileError(f"no .png sample images in {samples}; pass a folder of PNGs or a list of image paths")
    return paths


def _padded_picture(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Place an (H, W, 3) picture top-left on a black (height, width, 3) canvas."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[:image.shape[0], :image.shape[1]] = image
    return canvas


def run_demo(out_dir: str | os.PathLike, model: str | os.PathLike | nn.Module = DEMO_MODEL, *,
             samples: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
             device: str | torch.device | None = None) -> Path:
    """Write ``<stem>_pca.png``, ``<stem>_attention.png``, ``overview.png`` and ``report.md`` to ``out_dir``; -> it.

    ``model``: a module, a timm name with published weights (default: the bundled demo model), ``local-dir:PATH``,
    ``hf-hub:ORG/REPO`` or a training checkpoint. ``samples``: a folder of PNGs or a list of image paths (default:
    the bundled ones). ``device``: where to run (default: where the model is; loaded models start on the CPU, where
    the demo model takes seconds).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vit = load_model(model, pretrained=True)
    if device is not None:
        vit = vit.to(device)
    paths = _sample_paths(samples)
    images = [load_rgb(path) for path in paths]
    features = extract_features(vit, images)
    ph, pw = vit.patch_embed.patch_size
    grids = [tuple(f["patch"].shape[-2:]) for f in features]
    pixel_sizes = [(h * ph, w * pw) for h, w in grids]
    pcas = pca_image([f["patch"][0] for f in features])
    rows = []
    for path, image, pca, (height, width) in zip(paths, images, pcas, pixel_sizes):
        pca = np.asarray(Image.fromarray(pca).resize((width, height), Image.Resampling.NEAREST))
        attention = attention_image(attention_maps(vit, image), size=(height, width))
        Image.fromarray(pca).save(out_dir / f"{path.stem}_pca.png")
        Image.fromarray(attention).save(out_dir / f"{path.stem}_attention.png")
        rows.append(np.concatenate([_padded_picture(np.asarray(image), height, width), pca, attention], axis=1))
    overview_width = max(row.shape[1] for row in rows)
    overview = np.concatenate([_padded_picture(row, row.shape[0], overview_width) for row in rows], axis=0)
    Image.fromarray(overview).save(out_dir / "overview.png")
    seconds = time.perf_counter() - start
    _write_report(out_dir / "report.md", model, vit, paths, images, features, seconds)
    return out_dir


def _write_report(path: Path, model: str | os.PathLike | nn.Module, vit: nn.Module, paths: Sequence[Path],
                  images: Sequence[Image.Image], features: Sequence[dict[str, torch.Tensor]], seconds: float) -> None:
    name = type(model).__name__ if isinstance(model, nn.Module) else os.fspath(model)
    ph, pw = vit.patch_embed.patch_size
    lines = [
        "# adclr demo",
        "",
        f"- model: `{name}` (depth {len(vit.blocks)}, width {vit.embed_dim}, patch {ph}x{pw}, "
        f"{vit.blocks[0].attn.num_heads} heads)",
        f"- device: {next(vit.parameters()).device}",
        f"- images: {len(paths)}",
        f"- seconds: {seconds:.2f}",
        "",
        "| image | input (H x W) | cls | patch (C, h, w) | pictures |",
        "|---|---|---|---|---|",
    ]
    for p, image, f in zip(paths, images, features):
        lines.append(f"| {p.name} | {image.height} x {image.width} | {tuple(f['cls'].shape[1:])} | "
                     f"{tuple(f['patch'].shape[1:])} | {p.stem}_pca.png, {p.stem}_attention.png |")
    lines += ["", "overview.png: one row per image: input (padded to the patch grid) | PCA | attention per head", ""]
    lines += _recorded_checks(model)
    path.write_text("\n".join(lines), encoding="utf-8")


#: (what, manifest metric) of the bundled checks `benchmarks/embed_demo.py` records for the model and for a random-init
#: model of its arch (``random_init_`` + the metric).
BUNDLED_CHECKS = (("items k-NN top-1 (800 / 200 bundled items)", "bundled_items_knn"),
                  ("scenes dense probe foreground IoU", "bundled_probe_fg_iou"),
                  ("scenes dense probe mIoU", "bundled_probe_miou"))


def _recorded_checks(model: str | os.PathLike | nn.Module) -> list[str]:
    """The model's recorded bundled-check figures beside random init's, as a Markdown table; [] without a record."""
    entry = MANIFEST.get(model) if isinstance(model, str) else None
    metrics = entry.metrics if entry is not None else {}
    rows = [(what, metrics[key], metrics[f"random_init_{key}"]) for what, key in BUNDLED_CHECKS
            if key in metrics and f"random_init_{key}" in metrics]
    if not rows:
        return []
    return ["## Recorded checks (`adclr.evaluate`, bundled data; benchmarks/embed_demo.py measured them)", "",
            "| check | this model | random init of its arch |", "|---|---|---|",
            *(f"| {what} | {mine:.2f} | {random:.2f} |" for what, mine, random in rows), ""]
