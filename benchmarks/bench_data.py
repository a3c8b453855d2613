"""Images/s of the multi-crop data pipeline alone, per worker process (what one DataLoader worker can feed).

One process, one torch thread, no DataLoader workers: files are read, decoded, augmented (`MultiCropAugmentation`) and
collated (`collate_multicrop`) in batches exactly as one worker does it. Two recipes, on images written to a temp dir:

- imagenet: JPEGs of 500x375 / 375x500 px cut from scikit-image's sample photos; 2 x 224 px global views,
  10 x 96 px local views, 10 query crops of 16 px (DINO's ImageNet recipe with ADCLR's queries);
- study: 64 px PNG scenes of Fashion-MNIST items (`adclr.scenes.fashion_scenes`); 2 x 64 px global views (scale
  0.4-1), 4 x 32 px local views (0.1-0.4), 10 query crops of 8 px (benchmarks/study.py's BASE).

Each recipe runs with both outputs of the augmentation: normalised float32 views (``normalize=True``, the default) and
uint8 views (``normalize=False``; the trainer then normalises on its device). The two are timed in alternation,
``--repeats`` times each, and the median is reported, so a busy machine slows both alike.

    python benchmarks/bench_data.py                      # both recipes; writes benchmarks/results/cpu/data.{json,txt}
    python benchmarks/bench_data.py --out benchmarks/results/gpu
    python benchmarks/bench_data.py --quick              # seconds: few images, one repeat
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata
from torch.utils.data import DataLoader

from adclr.images import ImageFolder
from adclr.scenes import DEFAULT_ROOT, fashion_scenes
from adclr.train.data import MultiCropAugmentation, collate_multicrop
from _common import start, table, tee_stdout, write_json

RECIPES = {
    "imagenet": dict(global_size=224, local_size=96, num_local=10, global_scale=(0.25, 1.0),
                     local_scale=(0.05, 0.25), num_queries=10, query_size=16),
    "study": dict(global_size=64, local_size=32, num_local=4, global_scale=(0.4, 1.0), local_scale=(0.1, 0.4),
                  num_queries=10, query_size=8),
}
OUTPUTS = {"float32": True, "uint8": False}  # name -> MultiCropAugmentation(normalize=...)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def write_photos(root: Path, count: int, seed: int = 0) -> Path:
    """JPEGs (quality 90) of ImageNet's typical 500x375 size, landscape and portrait, cut from the sample photos."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(skdata, name)()) for name in PHOTOS]
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = (500, 375) if i % 3 else (375, 500)
        side = min(photo.width / width, photo.height / height) * rng.uniform(0.6, 1.0)
        w, h = round(width * side), round(height * side)
        x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
        photo.crop((x, y, x + w, y + h)).resize((width, height), Image.BICUBIC).save(root / f"{i:04d}.jpg", quality=90)
    return root


def write_scenes(root: Path, count: int, fashion_mnist: str | Path = DEFAULT_ROOT) -> Path:
    """The study's pretraining images: 64 px PNG scenes."""
    images, _ = fashion_scenes("train", count, root=fashion_mnist)
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / f"{i:04d}.png")
    return root


def images_per_second(augmentation: MultiCropAugmentation, root: Path, batch: int) -> float:
    """Read, decode, augment and collate every image under `root` once, in batches, as one DataLoader worker."""
    loader = DataLoader(ImageFolder(root, transform=augmentation), batch_size=batch, collate_fn=collate_multicrop,
                        num_workers=0)
    begin = time.perf_counter()
    count = sum(len(b["queries"]) for b in loader)
    return count / (time.perf_counter() - begin)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    parser.add_argument("--images", type=int, nargs=2, default=[128, 512], metavar=("IMAGENET", "STUDY"),
                        help="images per timed pass, per recipe (default: 128 512)")
    parser.add_argument("--batch", type=int, default=64, help="images per collated batch (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per output; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as in DataLoader workers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/cpu", help="folder for data.json and data.txt")
    parser.add_argument("--fashion-mnist", default=str(DEFAULT_ROOT), metavar="DIR",
                        help=f"Fashion-MNIST idx .gz files for the study scenes (default: {DEFAULT_ROOT})")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 / 32 images, batch 4, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.images, args.batch, args.repeats = [8, 32], 4, 1
    if min(args.images) < 1 or args.batch < 1 or args.repeats < 1:
        parser.error("--images, --batch and --repeats must be >= 1.")
    return args


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    with tee_stdout(out / "data.txt"):
        info = start("cpu", args.threads)
        print(f"multi-crop pipeline, one process, {args.threads} torch thread(s), batch {args.batch}: read + decode + "
              f"augment + collate; median of {args.repeats} passes per output, outputs timed in alternation\n")
        rows, records = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for recipe in args.recipes:
                count = args.images[list(RECIPES).index(recipe)]
                root = Path(tmp) / recipe
                root.mkdir()
                if recipe == "imagenet":
                    write_photos(root, count)
                else:
                    write_scenes(root, count, args.fashion_mnist)
                augmentations = {name: MultiCropAugmentation(**RECIPES[recipe], normalize=normalize)
                                 for name, normalize in OUTPUTS.items()}
                torch.manual_seed(args.seed)
                for augmentation in augmentations.values():  # warm-up: first calls allocate and load code paths
                    images_per_second(augmentation, root, args.batch)
                rates: dict[str, list[float]] = {name: [] for name in OUTPUTS}
                for _ in range(args.repeats):
                    for name, augmentation in augmentations.items():
                        rates[name].append(images_per_second(augmentation, root, args.batch))
                for name in OUTPUTS:
                    median = statistics.median(rates[name])
                    rows.append([recipe, name, count, median])
                    records.append(dict(recipe=recipe, output=name, images=count, images_per_s=median,
                                        passes=rates[name], settings=RECIPES[recipe]))
                    print(f"  done: {recipe} {name}: {median:.1f} images/s", flush=True)
        print("\n" + table(["recipe", "output", "images", "images/s"], rows))
        write_json(str(out / "data.json"), {"benchmark": "data", "machine": info, "args": vars(args),
                                            "results": records})
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
