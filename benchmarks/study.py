"""Small-scale study v2: does the training learn, and what do ADCLR's queries add? (CPU-sized; see RESULTS.md)

Pretraining data (--pretraining): unlabelled 64 px images from Fashion-MNIST's train split, one of `PRETRAINING`:
plain items and scenes, three to one (mostly_items; the default, 8000 images), plain items (gray on black), scenes
(2-4 tinted items over textured backgrounds), item scenes (one tinted item over a textured background) or plain items
and scenes, half each (mixed). Every run trains the same `adclr_vit_mini_patch8` (width 192, 6 blocks, patch 8: an
8x8 token grid) with the `small` preset for the same number of steps (default 12 epochs = 1500), then scores the
teacher backbone on frozen features:
  global  k-NN (k=20) and a linear probe on Fashion-MNIST test items, plain (gray on black) and textured (one tinted
          item over a textured background, `adclr.scenes.item_scenes`);
  dense   a linear per-patch probe on held-out scenes: mIoU over 11 classes and foreground IoU (the probe's
          predictions with every item class merged into one).
Anchors: random init (the floor) and the same ViT trained with labels for the same steps: on the scene masks through a
per-patch head (`supervised`, the dense ceiling) and on the item classes of textured items through its [CLS] token
(`supervised_global`, the global ceiling).
Gates, checked before any comparison is printed: trained DINO beats random init by >= 15 k-NN points (plain items)
and by >= 5 points of foreground IoU, and every DINO and ADCLR run ends with its [CLS] term at or below 0.8 ln K.

    python benchmarks/study.py --out benchmarks/results/study                  # every run, then the summary
    python benchmarks/study.py --runs dino_s0 adclr_s0                          # a subset (finished runs are kept)
    python benchmarks/study.py --summary                                        # the table from the JSON files
    python benchmarks/study.py --budget-minutes 4 --workers 2 --runs dino_s0 adclr_s0   # all at once, timed (GPU)
Needs the Debian package dataset-fashion-mnist. One JSON per run in --out; checkpoints and metrics.jsonl in --runs-dir.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import adclr  # noqa: F401  registers the archs
from adclr.evaluate import extract_dense, extract_global
from adclr.load import create_vit
from adclr.probes import dense_probe, knn_accuracy, linear_probe
from adclr.scenes import (CLASSES, DEFAULT_ROOT, NUM_SCENE_CLASSES, fashion_scenes, item_scenes, items_to_rgb,
                          load_fashion_mnist)
from adclr.train import PRESETS, TrainConfig, Trainer
from adclr.train.checkpoint import CHECKPOINT_NAME

ARCH = dict(arch="adclr_vit_mini_patch8", img_size=64)
#: Images are 64 px: global crops 64 px (scale 0.4-1), 4 local crops 32 px (0.1-0.4), one token per query crop.
BASE = dict(**ARCH, **PRESETS["small"], local_crops=4, local_size=32, global_scale=(0.4, 1.0), local_scale=(0.1, 0.4),
            query_size=8, batch_size=64, epochs=12, workers=1, log_every=10)
METHODS = {"dino": dict(num_queries=0), "adclr": dict(num_queries=10),
           "adclr_allq": dict(num_queries=10, query_attends="all_queries")}  # ablation: queries also read each other
SEEDS = (0, 1, 2)
RUNS = {f"{method}_s{seed}": dict(settings, seed=seed) for method, settings in METHODS.items() for seed in SEEDS}
EVAL = dict(items_train=5000, items_test=1000, scenes_train=1000, scenes_test=300)
QUICK_EVAL = dict(items_train=400, items_test=100, scenes_train=64, scenes_test=32)  # --quick: a smoke run only
#: `item_scenes` layouts of the global supervised anchor's training items (the probes use the split's default seed).
SUPERVISED_ITEMS_SEED = 11
PRETRAINING_ITEMS_SEED, PRETRAINING_ITEMS_FROM = 7, 10_000
#: The most epochs a timed run (--budget-minutes) may choose; its first epoch is laid out as the first of this many.
MAX_TIMED_EPOCHS = 200
GATES = dict(knn_points=15.0, fg_iou_points=5.0, cls_over_ln_k=0.8)


def _scenes(n: int, fmnist: Path) -> np.ndarray:
    """2-4 tinted items over a textured background (`fashion_scenes`)"""
    return fashion_scenes("train", n, root=fmnist)[0]


def _item_scenes(n: int, fmnist: Path) -> np.ndarray:
    """one tinted item over a textured background (`item_scenes`, their own layouts)"""
    return item_scenes("train", n, root=fmnist, seed=PRETRAINING_ITEMS_SEED)[0]


def _items(n: int, fmnist: Path) -> np.ndarray:
    """plain items, gray on black (train items the probes do not use)"""
    items = load_fashion_mnist("train", fmnist)[0][PRETRAINING_ITEMS_FROM:]
    if n > len(items):
        raise SystemExit(f"{n} plain items asked for, but the train split has {len(items)} after the probes' ones: "
                         "lower --images")
    return items_to_rgb(items[:n], 64)


def _items_and_scenes(n: int, fmnist: Path, scene_every: int) -> np.ndarray:
    """Plain items with a scene in every ``scene_every``-th place."""
    mixed = np.empty((n, 64, 64, 3), np.uint8)
    is_scene = np.arange(n) % scene_every == scene_every - 1
    mixed[~is_scene], mixed[is_scene] = _items(int((~is_scene).sum()), fmnist), _scenes(int(is_scene.sum()), fmnist)
    return mixed


def _mixed(n: int, fmnist: Path) -> np.ndarray:
    """half plain items, half scenes, interleaved"""
    return _items_and_scenes(n, fmnist, scene_every=2)


def _mostly_items(n: int, fmnist: Path) -> np.ndarray:
    """three plain items to one scene, interleaved"""
    return _items_and_scenes(n, fmnist, scene_every=4)


#: Unlabelled pretraining sets, 64 px, all from the train split (--pretraining picks one; the docstrings describe them).
PRETRAINING = {"scenes": _scenes, "item_scenes": _item_scenes, "items": _items, "mixed": _mixed,
               "mostly_items": _mostly_items}


def pretraining_images(kind: str, n: int, fmnist: Path = DEFAULT_ROOT) -> np.ndarray:
    """``n`` unlabelled 64 px pretraining images of one `PRETRAINING` kind, uint8 (n, 64, 64, 3); deterministic."""
    return PRETRAINING[kind](n, fmnist)


def write_pretraining_folder(root: Path, kind: str, n: int, fmnist: Path = DEFAULT_ROOT) -> Path:
    """The pretraining images as PNG files in ``root/KIND-N`` (written once; a finished folder has `.complete`)."""
    folder = root / f"{kind}-{n}"
    done = folder / ".complete"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(pretraining_images(kind, n, fmnist)):
            Image.fromarray(image).save(folder / f"{i:05d}.png")
        done.write_text(str(n))
    return folder


def eval_data(fmnist: Path = DEFAULT_ROOT, sizes: dict[str, int] = EVAL
              ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(train images, train labels, test images, test labels) per task; fixed subsets, same for every model."""
    n_train, n_test = sizes["items_train"], sizes["items_test"]
    items, labels = load_fashion_mnist("train", fmnist)
    test_items, test_labels = load_fashion_mnist("test", fmnist)
    scenes, masks = fashion_scenes("test", sizes["scenes_train"] + sizes["scenes_test"], root=fmnist)
    return {
        "plain": (items_to_rgb(items[:n_train], 64), labels[:n_train],
                  items_to_rgb(test_items[:n_test], 64), test_labels[:n_test]),
        "textured": (*item_scenes("train", n_train, root=fmnist), *item_scenes("test", n_test, root=fmnist)),
        "scenes": (scenes[:sizes["scenes_train"]], masks[:sizes["scenes_train"]],
                   scenes[sizes["scenes_train"]:], masks[sizes["scenes_train"]:]),
    }


def score(backbone: nn.Module, data: dict) -> dict[str, float]:
    """Every figure of one frozen backbone (in %)."""
    backbone = backbone.eval()
    out: dict[str, float] = {}
    for task in ("plain", "textured"):
        x_train, y_train, x_test, y_test = data[task]
        f_train, f_test = extract_global(backbone, x_train), extract_global(backbone, x_test)
        y_train, y_test = torch.as_tensor(y_train).long(), torch.as_tensor(y_test).long()
        out[f"{task}_knn"] = knn_accuracy(f_train, y_train, f_test, y_test)
        out[f"{task}_linear"] = linear_probe(f_train, y_train, f_test, y_test)
    x_train, m_train, x_test, m_test = data["scenes"]
    seg = dense_probe(extract_dense(backbone, x_train), torch.as_tensor(m_train), extract_dense(backbone, x_test),
                      torch.as_tensor(m_test))
    return out | {"miou": seg["miou"], "fg_iou": seg["fg_iou"]}


def _epoch_ends(run_dir: Path) -> list[dict]:
    """The per-epoch summaries of a run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "epoch_end" in record]


def _loss_terms(epoch_end: dict, log_k: float) -> dict[str, float]:
    """One epoch's [CLS] and query terms over ln K and its collapse diagnostics."""
    terms = {f"{term}_over_ln_k": epoch_end[term] / log_k for term in ("cls", "query") if epoch_end.get(term)}
    return terms | {k: v for k, v in epoch_end.items() if "entropy" in k or k.endswith("_kl")}


def pretrain(name: str, args: argparse.Namespace, data_dir: Path, until_epoch: int | None = None,
             data: dict | None = None) -> tuple[nn.Module, dict]:
    """Train (or continue) run ``name`` with the command line's epochs and workers -> its teacher backbone, record.
    Given the evaluation ``data`` and --eval-every K, the teacher is also scored after every K-th epoch before the
    last (the record's "curve"; a resumed run's curve starts where it resumed). Scoring draws from no global random
    state, so it leaves the training as it would be without it."""
    settings = RUNS[name] | {"epochs": args.epochs, "workers": args.workers}
    cfg = TrainConfig(data=str(data_dir), output=str(args.runs_dir / name), **{**BASE, **settings})
    run_dir = args.runs_dir / name
    trainer = Trainer(cfg, resume=(run_dir / CHECKPOINT_NAME).exists())  # an interrupted run continues
    log_k = math.log(cfg.out_dim)
    every = args.eval_every if data is not None else 0
    stops = [e for e in range(every, cfg.epochs, every) if e > trainer.epoch] if every else []
    curve = []
    for epoch in stops:
        backbone = trainer.fit(epoch).backbone
        point = {"epoch": epoch, "step": trainer.step, **_loss_terms(_epoch_ends(run_dir)[-1], log_k),
                 **score(backbone, data)}
        logging.info("%s after epoch %d: %s", name, epoch, json.dumps(point))
        curve.append(point)
    teacher = trainer.fit(until_epoch)
    ends = _epoch_ends(run_dir)
    record = {"config": cfg.to_dict(), "steps": trainer.step,
              "train_seconds": round(sum(e["seconds"] for e in ends), 1), "final_loss": _loss_terms(ends[-1], log_k)}
    return teacher.backbone, record | ({"curve": curve} if curve else {})


def _train_supervised(images: np.ndarray, labels: np.ndarray, steps: int, seed: int, batch_size: int,
                      readout: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                      make_head: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """The study's ViT trained with labels through ``make_head(backbone)`` on ``readout(backbone, images)``: AdamW
    (lr 1e-3, weight decay 0.05, one-cycle cosine), horizontal flips (of label maps too), batches drawn with
    replacement; on the GPU when there is one."""
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = create_vit(ARCH["arch"], img_size=ARCH["img_size"], drop_path_rate=0.1)
    head = make_head(backbone)
    backbone, head = backbone.to(device), head.to(device)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    mean, std = (torch.tensor(backbone.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x_all = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    y_all = torch.from_numpy(labels)
    backbone.train()
    for _ in range(steps):
        idx = torch.randint(len(x_all), (batch_size,))
        x, y = x_all[idx], y_all[idx]
        flip = torch.rand(batch_size) < 0.5
        x[flip] = x[flip].flip(-1)
        if y.ndim == 3:
            y[flip] = y[flip].flip(-1)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(head(readout(backbone, x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return backbone


def supervised(n_scenes: int, steps: int, seed: int = 0, batch_size: int = 64,
               fmnist: Path = DEFAULT_ROOT) -> nn.Module:
    """The dense anchor: the ViT trained on the pretraining scenes' masks through a per-patch linear head."""
    images, masks = fashion_scenes("train", n_scenes, root=fmnist)

    def patch_logits(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        grid = x.shape[-1] // backbone.patch_embed.patch_size[0]
        tokens = backbone.forward_features(x)[:, backbone.num_prefix_tokens:]
        return tokens.transpose(1, 2).reshape(len(x), -1, grid, grid)

    def patch_head(backbone: nn.Module) -> nn.Module:  # 1x1 conv, upsampled to the mask's size
        return nn.Sequential(nn.Conv2d(backbone.embed_dim, NUM_SCENE_CLASSES, kernel_size=1),
                             nn.Upsample(size=(ARCH["img_size"],) * 2, mode="bilinear", align_corners=False))

    return _train_supervised(images, masks, steps, seed, batch_size, patch_logits, patch_head)


def supervised_global(n_items: int, steps: int, seed: int = 0, batch_size: int = 64,
                      fmnist: Path = DEFAULT_ROOT) -> nn.Module:
    """The global anchor: the ViT trained on textured train items' classes through a linear head on its [CLS] token
    (items other than the probes' train subset: `item_scenes` with its own seed)."""
    images, labels = item_scenes("train", n_items, root=fmnist, seed=SUPERVISED_ITEMS_SEED)

    def cls_token(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return backbone.forward_head(backbone.forward_features(x), pre_logits=True)

    return _train_supervised(images, labels, steps, seed, batch_size, cls_token,
                             lambda backbone: nn.Linear(backbone.embed_dim, len(CLASSES)))


def train_within(names: list[str], budget_s: float, args: argparse.Namespace) -> int:
    """Pretrain every run in ``names`` at once, one process each, for as many whole epochs as fit in ``budget_s``
    seconds of wall time; -> the epochs. The first epoch of all runs together is timed (laid out as the first of a
    long run, so its schedules are those of any longer one), then every run resumes with the epochs the rest of the
    budget holds: each schedule is completed, none is cut off."""
    def launch(epochs: int, until_epoch: int | None = None) -> None:
        common = ["--train-only", "--epochs", str(epochs), "--data", str(args.data), "--runs-dir", str(args.runs_dir),
                  "--pretraining", args.pretraining, "--images", str(args.images), "--workers", str(args.workers),
                  "--fashion-mnist", str(args.fashion_mnist)]
        if until_epoch:
            common += ["--until-epoch", str(until_epoch)]
        procs = [subprocess.Popen([sys.executable, __file__, "--runs", name, *common]) for name in names]
        failed = [name for name, proc in zip(names, procs) if proc.wait()]
        if failed:
            raise SystemExit(f"pretraining failed for {failed}; see their logs above and {args.runs_dir}")

    start = time.perf_counter()
    launch(MAX_TIMED_EPOCHS, until_epoch=1)
    first = time.perf_counter() - start
    epochs = int(min(MAX_TIMED_EPOCHS, max(1, budget_s // first)))
    logging.info("first epoch of %d concurrent runs: %.0f s; %d epochs fit in %.0f s", len(names), first, epochs,
                 budget_s)
    if epochs > 1:
        launch(epochs)
    return epochs


def summary(out: Path) -> str:
    """Mean +- std per method, the gates, and the per-seed table, as Markdown."""
    records = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem != "machine"}
    if "random_init" not in records:
        return "no random_init.json yet: run the study first"
    keys = ["plain_knn", "plain_linear", "textured_knn", "textured_linear", "miou", "fg_iou"]
    groups: dict[str, list[dict]] = {}
    for name, record in records.items():
        groups.setdefault(name.rsplit("_s", 1)[0] if name[-1].isdigit() else name, []).append(record)
    lines = ["| run | seeds | " + " | ".join(keys) + " | [CLS] / ln K | query / ln K |", "|---" * (len(keys) + 4) + "|"]
    for group, rs in groups.items():
        cells = []
        for k in keys:
            values = [r["final"][k] for r in rs]
            spread = f" +- {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.1f}{spread}")
        loss = [r.get("final_loss", {}) for r in rs]
        terms = [" / ".join(f"{l[t]:.2f}" for l in loss if t in l) or "-" for t in ("cls_over_ln_k", "query_over_ln_k")]
        lines.append(f"| {group} | {len(rs)} | " + " | ".join(cells) + f" | {terms[0]} | {terms[1]} |")
    random = records["random_init"]["final"]
    dino = groups.get("dino", [])
    if dino:
        knn_gain = statistics.mean(r["final"]["plain_knn"] for r in dino) - random["plain_knn"]
        fg_gain = statistics.mean(r["final"]["fg_iou"] for r in dino) - random["fg_iou"]
        cls_end = [r["final_loss"]["cls_over_ln_k"] for g in ("dino", "adclr") for r in groups.get(g, [])]
        passed = (knn_gain >= GATES["knn_points"] and fg_gain >= GATES["fg_iou_points"]
                  and max(cls_end) <= GATES["cls_over_ln_k"])
        verdict = "passed, methods may be compared." if passed else "NOT passed: no method comparison is valid."
        lines += ["", f"Gates: DINO - random init = {knn_gain:+.1f} k-NN points (need >= {GATES['knn_points']:.0f}), "
                      f"{fg_gain:+.1f} foreground-IoU points (need >= {GATES['fg_iou_points']:.0f}); largest final "
                      f"[CLS] term {max(cls_end):.2f} ln K (need <= {GATES['cls_over_ln_k']}): {verdict}"]
    return "\n".join(lines)


def _steps(args: argparse.Namespace) -> int:
    """Training steps of every run of the command (pretraining runs and supervised anchors alike)."""
    return args.epochs * (args.images // BASE["batch_size"])


def _check_kept_runs(args: argparse.Namespace) -> None:
    """Finished runs in --out are kept; one trained on another set or for other steps would mix two studies in one
    table, so it stops the command instead."""
    steps = _steps(args)
    pretraining = {"set": args.pretraining, "images": args.images}
    for name in args.runs:
        path = args.out / f"{name}.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        if "steps" not in record:  # not run yet, or random init: nothing trained
            continue
        differs = record["steps"] != steps or record.get("pretraining", pretraining) != pretraining
        if differs:
            was = record.get("pretraining", {}).get("set", "its anchor set")
            raise SystemExit(f"{path} was trained for {record['steps']} steps on {was}, this command "
                             f"asks for {steps} steps on {args.pretraining} ({args.images} images): pass another --out "
                             "or move that file away")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/study"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/adclr-study/data"),
                        help="where the pretraining images are written (a KIND-N folder inside)")
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/adclr-study/runs"), help="checkpoints and logs")
    parser.add_argument("--pretraining", choices=sorted(PRETRAINING), default="mostly_items",
                        help="the unlabelled pretraining set; "
                             + "; ".join(f"{k}: {v.__doc__}" for k, v in PRETRAINING.items()))
    parser.add_argument("--images", type=int, default=8000, help="pretraining images (and the dense anchor's scenes)")
    parser.add_argument("--fashion-mnist", type=Path, default=DEFAULT_ROOT, help="folder of the four idx .gz files")
    parser.add_argument("--epochs", type=int, default=BASE["epochs"], help="pretraining epochs of every run")
    anchors = ["random_init", "supervised_s0", "supervised_global_s0"]
    parser.add_argument("--runs", nargs="*", default=[*anchors, *RUNS],
                        help=f"any of {', '.join(anchors + list(RUNS))}")
    parser.add_argument("--summary", action="store_true", help="only print the table of the finished runs")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="train every pretraining run at once, one process each, for the whole epochs that fit in "
                             "this wall time (measured on the first epoch; overrides --epochs), then score them")
    parser.add_argument("--workers", type=int, default=BASE["workers"], help="data loader workers per run")
    parser.add_argument("--eval-every", type=int, default=0, metavar="K",
                        help="also score each pretraining run's teacher after every K-th epoch (its JSON's curve)")
    parser.add_argument("--quick", action="store_true", help="score on small evaluation subsets: a smoke run, its "
                                                                 "figures mean nothing")
    parser.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)  # a --budget-minutes child
    parser.add_argument("--until-epoch", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        parser.error(f"--budget-minutes must be positive, got {args.budget_minutes}")
    if args.eval_every < 0:
        parser.error(f"--eval-every must be 0 (off) or a positive number of epochs, got {args.eval_every}")
    if args.eval_every and args.budget_minutes is not None:
        parser.error("--eval-every does not apply with --budget-minutes (its timed processes train without scoring): "
                     "drop one of the two")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.summary:
        print(summary(args.out))
        return
    if not args.train_only and args.budget_minutes is None:
        _check_kept_runs(args)
    data_dir = write_pretraining_folder(args.data, args.pretraining, args.images, args.fashion_mnist)
    if args.train_only:  # one process of --budget-minutes: pretraining, no scores
        for name in args.runs:
            pretrain(name, args, data_dir, args.until_epoch)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
               "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    (args.out / "machine.json").write_text(json.dumps(machine, indent=2))
    pending = [name for name in args.runs if not (args.out / f"{name}.json").exists()]
    timed = {}
    if args.budget_minutes is not None:
        concurrent = [name for name in pending if name in RUNS]
        start = time.perf_counter()
        args.epochs = train_within(concurrent, 60 * args.budget_minutes, args)
        timed = {"train_seconds": round(time.perf_counter() - start, 1), "concurrent_runs": len(concurrent)}
    data = eval_data(args.fashion_mnist, QUICK_EVAL if args.quick else EVAL)
    steps = _steps(args)
    for name in pending:
        if name == "random_init":
            torch.manual_seed(0)
            record = {"run": name, "final": score(create_vit(ARCH["arch"], img_size=ARCH["img_size"]), data)}
        elif name.startswith("supervised"):
            start = time.perf_counter()
            anchor = supervised_global if name.startswith("supervised_global") else supervised
            backbone = anchor(args.images, steps, seed=int(name.rsplit("_s", 1)[1]), fmnist=args.fashion_mnist)
            record = {"run": name, "steps": steps, "train_seconds": round(time.perf_counter() - start, 1),
                      "final": score(backbone, data)}
        else:
            backbone, info = pretrain(name, args, data_dir, data=data)
            record = {"run": name, "pretraining": {"set": args.pretraining, "images": args.images}, **info, **timed,
                      "final": score(backbone, data)}
        (args.out / f"{name}.json").write_text(json.dumps(record, indent=2))
        logging.info("%s: %s", name, record["final"])
    print(summary(args.out))


if __name__ == "__main__":
    main()
