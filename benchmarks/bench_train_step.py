"""Training-step overhead of ADCLR over DINO, measured on the engine's own code.

Part 1, the full step: a real `Trainer` (student, EMA teacher, DINO head, `ADCLRLoss`, AdamW, clipping, schedules)
runs its `train_step` on one fixed synthetic batch shaped like `collate_multicrop`'s output, with `num_queries = r`
(ADCLR) and `num_queries = 0` (DINO: the step then runs plain `forward_features` and no query loss). The Trainer needs
an image folder, so a tiny one is written to a temp dir; it is never read during the timed steps.

Part 2, the backbone alone (forward + backward of the 2 global views, drop_path 0): plain `forward_features`, the
fused `forward_with_queries`, and the naive mask path (query tokens appended and timm's own blocks run with the full
(T, T) one-way boolean mask), so the reader sees what the fused path saves. Outputs of the paths are compared.

Every configuration runs in a fresh process. The issue's target: ADCLR at most 1.08x DINO's step time and memory.

    python benchmarks/bench_train_step.py                       # ViT-S/16, 224 px, batch 16, 2 globals, CPU fp32
    python benchmarks/bench_train_step.py --device cuda --precision bf16 --batch 64
    python benchmarks/bench_train_step.py --quick               # seconds: 2-block ViT-Ti at 64 px
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

import adclr  # noqa: F401  registers the adclr_vit_* archs with timm
from adclr.train.config import TrainConfig
from adclr.train.engine import Trainer
from adclr.train.step import resolve_precision  # the step's own precision choice, so both parts agree
from adclr.train.network import build_backbone
from adclr.queries import embed_queries, forward_with_queries, one_way_attention_mask
from _common import (PeakMemory, measure, ratio, read_spec, run_worker, start, table, write_json,
                     write_result)

TARGET = 1.08
TOLERANCE = 1e-3  # fp32 only; under bf16/fp16 the paths round differently and the difference is only printed
BACKBONE_PATHS = ("plain", "fused", "mask")


def train_config(spec: dict, data: str = "", output: str = "") -> TrainConfig:
    return TrainConfig(
        data=data, output=output, arch=spec["arch"], img_size=spec["img_size"],
        model_kwargs={"depth": spec["depth"]} if spec["depth"] else {}, num_queries=spec["queries"],
        local_crops=spec["local_crops"], local_size=spec["local_size"], out_dim=spec["out_dim"],
        batch_size=spec["batch"], epochs=1, workers=0, precision=spec["precision"], seed=spec["seed"])


def write_image_folder(root: Path, count: int) -> None:
    """Just enough readable images for the Trainer to accept the folder (one batch)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")


def synthetic_batch(spec: dict, patch: int, pin: bool) -> dict:
    """A fixed batch shaped like collate_multicrop's: 2 global views, the local views, (B, r, 3, q, q) query crops."""
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    b, s, l = spec["batch"], spec["img_size"], spec["local_size"]
    batch = {"global": [torch.randn(b, 3, s, s, generator=g) for _ in range(2)],
             "local": [torch.randn(b, 3, l, l, generator=g) for _ in range(spec["local_crops"])],
             "queries": torch.randn(b, spec["queries"], 3, patch, patch, generator=g)}
    if pin:  # the engine's DataLoader pins on CUDA
        batch = {k: [t.pin_memory() for t in v] if isinstance(v, list) else v.pin_memory() for k, v in batch.items()}
    return batch


def step_worker(spec: dict, memory: PeakMemory) -> dict:
    """`Trainer.train_step` on the fixed batch; `trainer.step = 0` each time so every step uses the same schedule."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "images").mkdir()
        write_image_folder(Path(tmp) / "images", spec["batch"])
        trainer = Trainer(train_config(spec, data=str(Path(tmp) / "images"), output=str(Path(tmp) / "run")))
    batch = synthetic_batch(spec, trainer.student.backbone.patch_embed.patch_size[0], trainer.device.type == "cuda")

    def step() -> dict:
        trainer.step = 0
        return trainer.train_step(batch)

    figures = measure(step, spec["device"], memory, spec["warmup"], spec["repeats"])
    return figures | {"images_per_s": spec["batch"] / figures["median_s"]}


def mask_path(vit, images: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
    """The naive form: queries appended as tokens and timm's own blocks run with the full (T, T) one-way mask."""
    x = vit.patch_drop(vit._pos_embed(vit.patch_embed(images)))
    query_tokens = vit.pos_drop(embed_queries(vit, queries))
    num_image = x.shape[1]
    mask = one_way_attention_mask(num_image, query_tokens.shape[1], device=x.device)
    x = vit.norm_pre(torch.cat([x, query_tokens], dim=1))
    for blk in vit.blocks:
        x = blk(x, attn_mask=mask)
    x = vit.norm(x)
    return x[:, :num_image], x[:, num_image:]


def backbone_worker(spec: dict, memory: PeakMemory) -> dict:
    """Forward + backward of the backbone on the 2 global views (as one batch, as the network runs them)."""
    device = torch.device(spec["device"])
    cfg = train_config(spec)
    torch.manual_seed(spec["seed"])
    vit = build_backbone(cfg).to(device).train()  # drop_path 0: the paths' outputs are comparable
    dtype, _ = resolve_precision(cfg, device)
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    patch = vit.patch_embed.patch_size[0]
    images = torch.randn(2 * spec["batch"], 3, spec["img_size"], spec["img_size"], generator=g).to(device)
    queries = torch.randn(2 * spec["batch"], spec["queries"], 3, patch, patch, generator=g).to(device)
    forward = {"plain": lambda: (vit.forward_features(images), images.new_zeros(0)),
               "fused": lambda: forward_with_queries(vit, images, queries),
               "mask": lambda: mask_path(vit, images, queries)}[spec["path"]]

    def forward_backward() -> tuple[Tensor, Tensor]:
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            tokens, query_tokens = forward()
        loss = tokens.float().square().mean() + query_tokens.float().square().sum() / max(query_tokens.numel(), 1)
        vit.zero_grad(set_to_none=True)
        loss.backward()
        return tokens.detach(), query_tokens.detach()

    tokens, query_tokens = forward_backward()  # the first call is also the first warm-up call
    torch.save({"tokens": tokens[:2].float().cpu(), "queries": query_tokens[:2].float().cpu()}, spec["output"])
    figures = measure(forward_backward, spec["device"], memory, max(spec["warmup"] - 1, 0), spec["repeats"])
    return figures | {"images_per_s": 2 * spec["batch"] / figures["median_s"]}


def worker(spec: dict) -> None:
    memory = PeakMemory(spec["device"])
    write_result(spec, (step_worker if spec["part"] == "step" else backbone_worker)(spec, memory))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="adclr_vit_small")
    parser.add_argument("--depth", type=int, default=None, help="override the number of blocks (smoke runs)")
    parser.add_argument("--img-size", type=int, default=224, help="global view size in px")
    parser.add_argument("--batch", type=int, default=16, help="images per step (each gives 2 global views)")
    parser.add_argument("--queries", type=int, default=10, help="ADCLR's r (DINO is measured with r = 0)")
    parser.add_argument("--local-crops", type=int, default=0, help="local views per image (DINO recipe: up to 10)")
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--out-dim", type=int, default=65536, help="head prototypes (DINO: 65536)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (optimizer state, allocator)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="as the engine's: auto = bf16 (or fp16) on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-backbone", action="store_true", help="only the full-step comparison")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the figures to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2-block ViT-Ti at 64 px, 2 repeats")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.arch, args.depth, args.img_size, args.batch, args.out_dim, args.repeats, args.warmup = (
            "adclr_vit_tiny", 2, 64, 2, 1024, 2, 1)
        args.local_size = min(args.local_size, 32)
    if args.queries < 1:
        parser.error("--queries must be >= 1: DINO (r = 0) is always measured beside it.")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step creates the optimizer state).")
    return args


def main(args: argparse.Namespace) -> int:
    info = start(args.device, args.threads)
    common = dict(arch=args.arch, depth=args.depth, img_size=args.img_size, batch=args.batch,
                  local_crops=args.local_crops, local_size=args.local_size, out_dim=args.out_dim,
                  precision=args.precision, seed=args.seed, device=args.device, threads=args.threads,
                  warmup=args.warmup, repeats=args.repeats)
    try:  # the engine's own check (e.g. bf16 on CPU), before any worker starts
        fp32 = resolve_precision(train_config(dict(common, queries=0)), torch.device(args.device))[0] is None
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(f"{args.arch}{f' depth {args.depth}' if args.depth else ''}, {args.img_size} px, batch {args.batch} "
          f"(2 global views{f' + {args.local_crops} local at {args.local_size} px' if args.local_crops else ''}), "
          f"out_dim {args.out_dim}, precision {args.precision}; median of {args.repeats} after {args.warmup} warm-up\n")

    steps = {}
    for name, r in (("DINO", 0), (f"ADCLR r={args.queries}", args.queries)):
        steps[name] = run_worker(__file__, dict(common, part="step", queries=r, label=f"step {name}"))
        print(f"  done: step {name}: {1e3 * steps[name]['median_s']:.1f} ms", flush=True)
    dino, adclr_step = steps["DINO"], steps[f"ADCLR r={args.queries}"]
    step_ratio = {"time": ratio(adclr_step["median_s"], dino["median_s"]),
                  "total_mem": ratio(adclr_step["total_mib"], dino["total_mib"]),
                  "work_mem": ratio(adclr_step["work_mib"], dino["work_mib"])}

    backbone, checks = {}, {}
    if not args.skip_backbone:
        with tempfile.TemporaryDirectory() as tmp:
            for path in BACKBONE_PATHS:
                spec = dict(common, part="backbone", path=path, queries=args.queries,
                            output=str(Path(tmp) / f"{path}.pt"), label=f"backbone {path}")
                backbone[path] = run_worker(__file__, spec)
                print(f"  done: backbone {path}: {1e3 * backbone[path]['median_s']:.1f} ms", flush=True)
            out = {path: torch.load(Path(tmp) / f"{path}.pt") for path in BACKBONE_PATHS}
        checks = {"fused image tokens vs plain forward_features":
                  (out["fused"]["tokens"] - out["plain"]["tokens"]).abs().max().item(),
                  "fused vs mask path, image tokens": (out["fused"]["tokens"] - out["mask"]["tokens"]).abs().max().item(),
                  "fused vs mask path, query tokens":
                  (out["fused"]["queries"] - out["mask"]["queries"]).abs().max().item()}

    print("\nfull training step (Trainer.train_step)")
    print(table(["config", "ms/step", "img/s", "total MiB", "work MiB"],
                [[name, 1e3 * s["median_s"], s["images_per_s"], s["total_mib"], s["work_mib"]]
                 for name, s in steps.items()]))
    met = step_ratio["time"] <= TARGET and step_ratio["total_mem"] <= TARGET
    print(f"\nADCLR / DINO: time {step_ratio['time']:.3f}x, total memory {step_ratio['total_mem']:.3f}x, "
          f"work memory {step_ratio['work_mem']:.3f}x")
    print(f"target (time and total memory <= {TARGET}x DINO): {'met' if met else 'NOT met'}")

    failed = []
    if backbone:
        plain = backbone["plain"]
        print("\nbackbone only, forward + backward of the 2 global views (ratios against plain forward_features)")
        print(table(["path", "ms", "total MiB", "work MiB", "time ratio", "total mem ratio", "work mem ratio"],
                    [[path, 1e3 * b["median_s"], b["total_mib"], b["work_mib"], ratio(b["median_s"], plain["median_s"]),
                      ratio(b["total_mib"], plain["total_mib"]), ratio(b["work_mib"], plain["work_mib"])]
                     for path, b in backbone.items()]))
        fused, mask = backbone["fused"], backbone["mask"]
        print(f"mask path / fused path: time {ratio(mask['median_s'], fused['median_s']):.3f}x, "
              f"work memory {ratio(mask['work_mib'], fused['work_mib']):.3f}x")
        print("\noutput checks (max |difference|)" + ("" if fp32 else ", reduced precision: printed, not enforced"))
        for what, diff in checks.items():
            print(f"  {what}: {diff:.2e}")
            if fp32 and not diff < TOLERANCE:
                failed.append(f"{what}: {diff:.2e}")

    write_json(args.json, {"benchmark": "train_step", "machine": info, "args": vars(args), "step": steps,
                           "step_ratio_adclr_over_dino": step_ratio, "target": TARGET, "target_met": met,
                           "backbone": backbone, "checks": checks})
    if failed:
        print(f"\nFAILED: paths differ by >= {TOLERANCE:g}:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    ARGS = parse_args()
    sys.exit(worker(read_spec(ARGS.worker)) if ARGS.worker else main(ARGS))
