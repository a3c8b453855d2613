"""Small-scale ADCLR vs DINO study on Fashion-MNIST scenes (CPU-sized; see benchmarks/RESULTS.md).

Every run pretrains the same small ViT (depth 6, width 192, patch 8 at 64 px) on the same unlabelled scenes with the
same budget and seed, then scores the teacher backbone on frozen features:
  k-NN and linear probe on single Fashion-MNIST test items (global task), and a 1x1 dense probe on held-out scenes
  (mIoU over 11 classes, the dense task). A k-NN score after every epoch gives the training curves.

    python benchmarks/study.py --out benchmarks/results/study            # all runs
    python benchmarks/study.py --out DIR --runs dino_s0 adclr_s0         # a subset
Needs the Debian package dataset-fashion-mnist. Results: one JSON per run in --out; checkpoints and metrics.jsonl in --runs-dir.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

import adclr  # noqa: F401  registers the archs
from adclr.evaluate import evaluate
from adclr.scenes import fashion_scenes
from adclr.train import TrainConfig, Trainer

BASE = dict(
    arch="adclr_vit_tiny", img_size=64, model_kwargs={"depth": 6, "patch_size": 8},
    local_crops=4, local_size=32, global_scale=(0.4, 1.0), local_scale=(0.1, 0.4),
    out_dim=4096, head_hidden_dim=1024, head_bottleneck_dim=256,
    epochs=6, batch_size=64, lr=2e-3, warmup_epochs=1, momentum_teacher=0.99,
    warmup_teacher_temp_epochs=2, workers=2, log_every=5, query_size=8,
)
RUNS = {
    "dino_s0": dict(num_queries=0, seed=0),
    "adclr_s0": dict(num_queries=10, seed=0),
    "adclr_allq_s0": dict(num_queries=10, query_attends="all_queries", seed=0),
    "dino_s1": dict(num_queries=0, seed=1),
    "adclr_s1": dict(num_queries=10, seed=1),
}
EVAL = dict(items_train=5000, items_test=1000, scenes_train=1000, scenes_test=300, curve_train=2000, curve_test=500)


def write_scene_folder(root: Path, n: int) -> Path:
    """The unlabelled pretraining scenes as PNG files (deterministic: the train split's fixed seed)."""
    done = root / ".complete"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        images, _ = fashion_scenes("train", n)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / f"{i:05d}.png")
        done.write_text(str(n))
    return root


def score(backbone: torch.nn.Module, *, curve: bool = False) -> dict:
    backbone = backbone.eval()
    if curve:
        knn = evaluate(backbone, "knn", "fashion-mnist", image_size=64, limit_train=EVAL["curve_train"],
                       limit_test=EVAL["curve_test"], progress=False)
        return {"knn": knn["top1"]}
    knn = evaluate(backbone, "knn", "fashion-mnist", image_size=64, limit_train=EVAL["items_train"],
                   limit_test=EVAL["items_test"], progress=False)
    linear = evaluate(backbone, "linear", "fashion-mnist", image_size=64, limit_train=EVAL["items_train"],
                      limit_test=EVAL["items_test"], progress=False)
    seg = evaluate(backbone, "seg", "fashion-scenes", n_train=EVAL["scenes_train"], n_test=EVAL["scenes_test"],
                   progress=False)
    return {"knn": knn["top1"], "linear": linear["top1"], "miou": seg["miou"], "pixel_acc": seg["pixel_acc"]}


def run(name: str, overrides: dict, data: Path, out: Path, runs_dir: Path) -> dict:
    cfg = TrainConfig(data=str(data), output=str(runs_dir / name), **{**BASE, **overrides})
    trainer = Trainer(cfg)
    curve, train_seconds = [], 0.0
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        trainer.fit(until_epoch=epoch + 1)
        train_seconds += time.perf_counter() - start  # evaluation time is not training time
        curve.append({"epoch": epoch + 1, "train_seconds": round(train_seconds, 1),
                      **score(trainer.teacher.backbone, curve=True)})
        logging.info("%s epoch %d: %s", name, epoch + 1, curve[-1])
    record = {"run": name, "config": cfg.to_dict(), "train_seconds": round(train_seconds, 1), "curve": curve,
              "final": score(trainer.teacher.backbone)}
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    logging.info("%s final: %s", name, record["final"])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/study"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/adclr-study/scenes"))
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/adclr-study/runs"), help="checkpoints and logs")
    parser.add_argument("--scenes", type=int, default=4000)
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
               "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    (args.out / "machine.json").write_text(json.dumps(machine, indent=2))
    data = write_scene_folder(args.data, args.scenes)
    if "random_init" not in [p.stem for p in args.out.glob("*.json")]:
        torch.manual_seed(0)
        backbone = timm.create_model(BASE["arch"], img_size=64, **BASE["model_kwargs"])
        (args.out / "random_init.json").write_text(json.dumps({"run": "random_init", "final": score(backbone)}, indent=2))
    for name in args.runs:
        run(name, RUNS[name], data, args.out, args.runs_dir)


if __name__ == "__main__":
    main()
