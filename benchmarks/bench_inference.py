"""Dense-feature inference of the ADCLR backbones (plain timm ViTs) against a plainly written DINO-style ViT.

Both networks hold the same weights (timm's seeded random init, copied by state dict: DINO's key names equal timm's)
and are built at the measured image size, so no position-embedding interpolation is involved. The figure is
``forward_features`` tokens (the [CLS] + patch tokens after the final norm; the patch map is a reshape of them) under
inference mode; timm runs in the ``--dtype`` (fp32, or bf16 / fp16 under torch.autocast as `adclr.extract_features`
does), the reference always in fp32. Each (model, size, implementation) runs in a fresh process; both outputs on the
same input are compared and the script exits non-zero if they differ: by 1e-3 or more in fp32, by a token cosine
similarity under 0.99 in bf16 / fp16.

    python benchmarks/bench_inference.py                          # ViT-S and ViT-B at 224 and 896 px on CPU
    python benchmarks/bench_inference.py --device cuda --batch 64 8 --repeats 10
    python benchmarks/bench_inference.py --device cuda --batch 64 8 --repeats 10 --dtype bf16
    python benchmarks/bench_inference.py --quick                  # seconds: a 2-block ViT-Ti at 64 and 128 px
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

import adclr  # noqa: F401  registers the adclr_vit_* archs with timm
from adclr.features import DTYPES, compute_dtype
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dino_reference import DinoViT  # noqa: E402  the one DINO-style reference ViT, shared with the tests
from _common import (PeakMemory, measure, ratio, read_spec, run_worker, start, table, write_json,
                     write_result)

TOLERANCE = 1e-3  # max |timm - reference| in fp32
MIN_COSINE = 0.99  # smallest token cosine similarity timm in bf16 / fp16 may have with the fp32 reference
IMPLS = ("timm", "reference")


def build_timm(spec: dict) -> nn.Module:
    torch.manual_seed(spec["seed"])
    overrides = {"depth": spec["depth"]} if spec["depth"] else {}
    return timm.create_model(spec["model"], pretrained=False, num_classes=0, img_size=spec["size"], **overrides)


def reference_like(vit: nn.Module, img_size: int) -> DinoViT:
    """A DINO-style reference ViT with `vit`'s dims and its exact weights (strict load: every key must match)."""
    ref = DinoViT(vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads, vit.patch_embed.patch_size[0],
                  img_size, vit.blocks[0].mlp.fc1.out_features)
    ref.load_state_dict(vit.state_dict(), strict=True)
    return ref


def worker(spec: dict) -> None:
    """One (model, size, implementation): output on the fixed input saved for the check, then images/s and memory."""
    device = spec["device"]
    memory = PeakMemory(device)
    model = build_timm(spec)
    if spec["impl"] == "reference":
        model = reference_like(model, spec["size"])
    model = model.to(device).eval()
    forward = model.forward_features if spec["impl"] == "timm" else model.forward
    dtype = compute_dtype(spec["dtype"]) if spec["impl"] == "timm" else torch.float32
    images = torch.randn(spec["batch"], 3, spec["size"], spec["size"],
                         generator=torch.Generator().manual_seed(spec["seed"] + 1)).to(device)

    def run() -> Tensor:
        with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            return forward(images)

    torch.save(run()[:2].float().cpu(), spec["output"])  # the first call is also the first warm-up call
    figures = measure(run, device, memory, max(spec["warmup"] - 1, 0), spec["repeats"])
    write_result(spec, figures | {"images_per_s": spec["batch"] / figures["median_s"]})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["adclr_vit_small", "adclr_vit_base"])
    parser.add_argument("--depth", type=int, default=None, help="override the number of blocks (smoke runs)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 896], help="square image sizes in px")
    parser.add_argument("--batch", nargs="+", type=int, default=[16, 2], help="batch per size (one value: all sizes)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forward passes first (>= 1: the check's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="timm's compute precision (bf16 / fp16: autocast); the reference stays fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="OUT", help="write the figures to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2-block ViT-Ti at 64/128 px, 2 repeats")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.models, args.depth, args.sizes, args.batch, args.repeats, args.warmup = (
            ["adclr_vit_tiny"], 2, [64, 128], [2], 2, 1)
    if len(args.batch) == 1:
        args.batch = args.batch * len(args.sizes)
    if len(args.batch) != len(args.sizes):
        parser.error(f"--batch takes one value or one per size ({len(args.sizes)} sizes), got {args.batch}.")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the first forward pass is the one whose output is checked.")
    return args


def main(args: argparse.Namespace) -> int:
    info = start(args.device, args.threads)
    print(f"dense features: forward_features tokens, timm in {args.dtype}, reference in fp32, inference mode; "
          f"median of {args.repeats} repeats after {args.warmup} warm-up; reference = DINO-style explicit softmax "
          "attention, same weights\n")

    rows, ratio_rows, records, failed = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for size, batch in zip(args.sizes, args.batch):
                result = {}
                for impl in IMPLS:
                    spec = dict(model=name, depth=args.depth, size=size, batch=batch, impl=impl, device=args.device,
                                dtype=args.dtype, warmup=args.warmup, repeats=args.repeats, seed=args.seed,
                                threads=args.threads, output=str(Path(tmp) / f"{impl}.pt"),
                                label=f"{name} {size}px {impl}")
                    result[impl] = run_worker(__file__, spec)
                    r = result[impl]
                    shown = impl if impl == "reference" else f"timm {args.dtype}"
                    rows.append([name, size, batch, shown, r["images_per_s"], r["total_mib"], r["work_mib"]])
                    print(f"  done: {spec['label']}: {r['images_per_s']:.2f} img/s", flush=True)
                timm_out, ref_out = torch.load(Path(tmp) / "timm.pt"), torch.load(Path(tmp) / "reference.pt")
                diff = (timm_out - ref_out).abs().max().item()
                cosine = torch.nn.functional.cosine_similarity(timm_out, ref_out, dim=-1).min().item()
                t, ref = result["timm"], result["reference"]
                timm_over_ref = {"speed": ratio(t["images_per_s"], ref["images_per_s"]),
                           "total_mem": ratio(t["total_mib"], ref["total_mib"]),
                           "work_mem": ratio(t["work_mib"], ref["work_mib"])}
                ratio_rows.append([name, size, *timm_over_ref.values(), diff, f"{cosine:.4f}"])
                records.append(dict(model=name, size=size, batch=batch, dtype=args.dtype, max_abs_diff=diff,
                                    min_token_cosine=cosine, ratio_timm_over_ref=timm_over_ref, **result))
                if args.dtype == "fp32" and not diff < TOLERANCE:
                    failed.append(f"{name} {size}px: max |timm - reference| = {diff:.2e}")
                if args.dtype != "fp32" and not cosine > MIN_COSINE:
                    failed.append(f"{name} {size}px: min token cosine(timm {args.dtype}, reference) = {cosine:.4f}")

    print("\n" + table(["model", "size", "batch", "impl", "img/s", "total MiB", "work MiB"], rows))
    print(f"\ntimm {args.dtype} / reference fp32 (speed > 1: timm faster; memory < 1: timm smaller)")
    print(table(["model", "size", "speed", "total mem", "work mem", "max|diff|", "min cosine"], ratio_rows))
    write_json(args.json, {"benchmark": "inference", "machine": info, "args": vars(args), "results": records})
    if failed:
        print("\nFAILED: outputs differ:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    if args.dtype == "fp32":
        print(f"\noutputs equal within {TOLERANCE:g} for every configuration")
    else:
        print(f"\ntoken cosine similarity with the fp32 reference above {MIN_COSINE} for every configuration")
    return 0


if __name__ == "__main__":
    ARGS = parse_args()
    sys.exit(worker(read_spec(ARGS.worker)) if ARGS.worker else main(ARGS))
