"""Pictures for benchmarks/RESULTS.md from a finished study (benchmarks/study.py); needs matplotlib.

    python benchmarks/plot_study.py --results benchmarks/results/study --runs-dir /tmp/adclr-study/runs

Writes benchmarks/figures/study_curves.png (k-NN over epochs, loss terms over steps) and study_scenes.png (held-out
scenes, their ground truth, and the dense-probe prediction of each model).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np
import timm
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import adclr  # noqa: E402,F401
from adclr.evaluate import extract_dense  # noqa: E402
from adclr.probes import dense_probe  # noqa: E402
from adclr.scenes import CLASSES, fashion_scenes  # noqa: E402
from adclr.load import load_teacher_backbone  # noqa: E402

PALETTE = np.array(plt.get_cmap("tab20").colors[:11]) * 255


def curves(results: dict, runs_dir: Path, out: Path) -> None:
    """Loss terms and the teacher's mean / batch-mean entropy over steps, all over ln K (the collapse diagnostics)."""
    fig, (loss_ax, entropy_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, record in results.items():
        metrics = runs_dir / name / "metrics.jsonl"
        if "config" not in record or not metrics.is_file():
            continue
        log_k = np.log(record["config"]["out_dim"])
        steps = [json.loads(line) for line in metrics.read_text().splitlines()]
        steps = [s for s in steps if "epoch_end" not in s]
        x = [s["step"] for s in steps]
        line, = loss_ax.plot(x, [s["cls"] / log_k for s in steps], label=f"{name} [CLS]")
        if any(s["query"] for s in steps):
            loss_ax.plot(x, [s["query"] / log_k for s in steps], linestyle="--", color=line.get_color(),
                         label=f"{name} query")
        entropy_ax.plot(x, [s["cls_teacher_entropy"] / log_k for s in steps], color=line.get_color(), label=name)
        entropy_ax.plot(x, [s["cls_batch_entropy"] / log_k for s in steps], linestyle=":", color=line.get_color())
    loss_ax.axhline(0.8, color="gray", linewidth=0.8)
    loss_ax.set(xlabel="step", ylabel="loss / ln K", title="loss terms (gate: [CLS] <= 0.8 ln K)")
    entropy_ax.set(xlabel="step", ylabel="entropy / ln K",
                   title="[CLS] teacher: row entropy (solid), batch-mean entropy (dotted)")
    loss_ax.legend(fontsize=7, ncol=2)
    entropy_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def scenes(models: dict[str, torch.nn.Module], out: Path, n_train: int = 1000, n_show: int = 6) -> None:
    train_images, train_masks = fashion_scenes("train", n_train)
    test_images, test_masks = fashion_scenes("test", n_show)
    predictions = {}
    for name, model in models.items():
        result = dense_probe(extract_dense(model.eval(), train_images), torch.from_numpy(train_masks),
                             extract_dense(model, test_images), torch.from_numpy(test_masks), num_classes=11,
                             return_predictions=True)
        predictions[f"{name}\nmIoU {result['miou']:.1f} (6 scenes)"] = result["predictions"].numpy()
    rows = 2 + len(predictions)
    fig, axes = plt.subplots(rows, n_show, figsize=(1.6 * n_show, 1.7 * rows))
    labelled = {"input": list(test_images), "ground truth": [PALETTE[m].astype(np.uint8) for m in test_masks]}
    labelled |= {k: [PALETTE[p].astype(np.uint8) for p in v] for k, v in predictions.items()}
    for r, (title, pictures) in enumerate(labelled.items()):
        for c, picture in enumerate(pictures):
            axes[r, c].imshow(picture, interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(title, fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=PALETTE[i] / 255) for i in range(11)]
    fig.legend(handles, ["background", *CLASSES], loc="lower center", ncol=6, fontsize=6)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/study"))
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/adclr-study/runs"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/figures"))
    parser.add_argument("--show", nargs="*", default=["dino_s0", "adclr_s0"], help="runs whose probes to draw")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {p.stem: json.loads(p.read_text()) for p in sorted(args.results.glob("*.json")) if p.stem != "machine"}
    curves(results, args.runs_dir, args.out / "study_curves.png")
    torch.manual_seed(0)
    models = {"random init": timm.create_model("adclr_vit_mini_patch8")}
    models |= {name: load_teacher_backbone(args.runs_dir / name / "checkpoint.pth") for name in args.show}
    scenes(models, args.out / "study_scenes.png")


if __name__ == "__main__":
    main()
