"""Make the embedded demo model from a study checkpoint and print its weights_manifest entry (a maintainer step).

    python benchmarks/embed_demo.py /tmp/adclr-study/runs/adclr_s0/checkpoint.pth

Loads the teacher backbone into `adclr_vit_mini_patch8`, scores the bundled-scenes dense probe in fp32 and with the
weights rounded to fp16, writes `adclr/assets/adclr_vit_mini_patch8.demo.safetensors` (fp16 when the probe keeps its
figure within 0.5 mIoU, else fp32), scores the stored weights and a random-init model of the arch (seed 0) on the
bundled checks (`adclr demo` reports both) and prints the manifest table to paste into weights_manifest/weights.toml.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

import adclr  # noqa: F401
from adclr.demo import BUNDLED_CHECKS
from adclr.evaluate import bundled_items_knn, bundled_scenes_probe
from adclr.load import load_teacher_backbone, read_training_checkpoint
from adclr.weights import sha256_file

ARCH, TAG = "adclr_vit_mini_patch8", "demo"
TARGET = Path(__file__).resolve().parents[1] / "adclr" / "assets" / f"{ARCH}.{TAG}.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args()
    checkpoint = read_training_checkpoint(args.checkpoint)
    teacher = load_teacher_backbone(checkpoint)
    model = timm.create_model(ARCH).eval()
    model.load_state_dict(teacher.state_dict())
    fp32 = bundled_scenes_probe(model)
    half = {k: v.half() for k, v in model.state_dict().items()}
    model.load_state_dict(half)
    fp16 = bundled_scenes_probe(model)
    keep_half = abs(fp16["miou"] - fp32["miou"]) <= 0.5
    save_file(half if keep_half else teacher.state_dict(), TARGET, metadata={"format": "pt"})
    cfg = checkpoint["config"]
    print(f"bundled-scenes probe mIoU: fp32 {fp32['miou']:.2f}, fp16 {fp16['miou']:.2f} -> stored as "
          f"{'fp16' if keep_half else 'fp32'}")
    if not keep_half:
        model.load_state_dict(teacher.state_dict())
    torch.manual_seed(0)  # the random-init model tests/test_demo.py builds
    random_init = timm.create_model(ARCH).eval()
    checks = {"": bundled_checks(model, fp16 if keep_half else fp32),
              "random_init_": bundled_checks(random_init, bundled_scenes_probe(random_init))}
    method = f"ADCLR ({cfg['num_queries']} queries)" if cfg["num_queries"] else "DINO"
    metrics = "\n".join(f"{prefix}{key} = {figures[key]:.2f}" for prefix, figures in checks.items()
                         for _, key in BUNDLED_CHECKS)
    print(f'''
["{ARCH}.{TAG}"]
file = "assets/{TARGET.name}"
sha256 = "{sha256_file(TARGET)}"
size_bytes = {TARGET.stat().st_size}
license = "apache-2.0"
description = "Demo only, not an ImageNet model: {method}, {checkpoint['epoch']} epochs on a CPU, 64 px Fashion-MNIST"
source = "benchmarks/study.py run {args.checkpoint.parent.name}; benchmarks/embed_demo.py"

["{ARCH}.{TAG}".metrics]
{metrics}
''')


def bundled_checks(model: torch.nn.Module, probe: dict) -> dict[str, float]:
    """The figures `adclr demo` reports (`BUNDLED_CHECKS`) of one model, given its bundled-scenes probe record."""
    return {"bundled_items_knn": bundled_items_knn(model)["top1"], "bundled_probe_fg_iou": probe["fg_iou"],
            "bundled_probe_miou": probe["miou"]}


if __name__ == "__main__":
    main()
