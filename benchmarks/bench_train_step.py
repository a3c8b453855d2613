"""Training-step overhead of ADCLR over DINO, measured on the engine's own code (issue #11).

Part 1, the full step: a real `Trainer` (student, EMA teacher, DINO head, `ADCLRLoss`, AdamW, clipping, schedules)
runs its `train_step` on one fixed synthetic batch shaped like `collate_multicrop`'s output, with `num_queries = r`
(ADCLR) and `num_queries = 0` (DINO: the step then runs plain `forward_features` and no query loss). The Trainer needs
an image folder, so a tiny one is written to a temp dir; it is never read during the timed steps. One more, untimed
step per configuration counts its FLOPs: their ratio is the floor of the time ratio at equal efficiency; on the CPU
one more gives the peak of live tensor memory (torch's profiler), what CUDA's allocator peak measures on a GPU.

Part 2, the backbone alone (forward + backward of the 2 global views, drop_path 0): plain `forward_features`,
`forward_with_queries` (the query path), and the same tokens through timm's own `Block.forward` with the one-way mask
(the reference the query path is checked against; outputs are compared).

Time: every configuration of a part is built in one process and their calls alternate, round after round, so the
machine's load falls on all of them alike; a ratio is the median over rounds of one configuration's time over the
other's in the same round. Peak memory: each configuration in a fresh process (see `_common.MEMORY_METHOD`).
Targets (issue #11): the ADCLR step at most 1.10x DINO's in time and total memory; the query path at most 1.05x plain
`forward_features` in time.

    python benchmarks/bench_train_step.py                       # ViT-S/16, 224 px, batch 16, 2 globals, CPU fp32
    python benchmarks/bench_train_step.py --device cuda --precision bf16 --batch 64
    python benchmarks/bench_train_step.py --quick               # seconds: 2-block ViT-Ti at 64 px
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

import adclr  # noqa: F401  registers the adclr_vit_* archs with timm
from adclr.queries import embed_queries, forward_with_queries, one_way_attention_mask
from adclr.train.config import TrainConfig
from adclr.train.engine import Trainer
from adclr.train.network import build_backbone
from adclr.train.step import resolve_precision  # the step's own precision choice, so both parts agree
from adclr.vit import tokens_before_blocks
from _common import MIB, PeakMemory, measure, ratio, read_spec, run_worker, start, table, write_json, write_result

STEP_TARGET = 1.10  # ADCLR step / DINO step, time and total memory
BACKBONE_TARGET = 1.05  # query path / plain forward_features, time
TOLERANCE = 1e-3  # fp32 only; under bf16/fp16 the paths round differently and the difference is only printed
STEP_CONFIGS = ("DINO", "ADCLR")
BACKBONE_PATHS = ("plain", "queries", "timm_blocks")


def train_config(spec: dict, queries: int, data: str = "", output: str = "") -> TrainConfig:
    return TrainConfig(
        data=data, output=output, arch=spec["arch"], img_size=spec["img_size"],
        model_kwargs={"depth": spec["depth"]} if spec["depth"] else {}, num_queries=queries,
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


def step_call(spec: dict, config: str) -> Callable[[], dict]:
    """`Trainer.train_step` of DINO (r = 0) or ADCLR (r = spec['queries']) on the fixed batch; `trainer.step = 0` each
    time so every step uses the same schedule."""
    queries = spec["queries"] if config == "ADCLR" else 0
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "images").mkdir()
        write_image_folder(Path(tmp) / "images", spec["batch"])
        trainer = Trainer(train_config(spec, queries, data=str(Path(tmp) / "images"), output=str(Path(tmp) / "run")))
    batch = synthetic_batch(spec, trainer.student.backbone.patch_embed.patch_size[0], trainer.device.type == "cuda")

    def step() -> dict:
        trainer.step = 0
        return trainer.train_step(batch)

    return step


def timm_blocks_path(vit, images: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
    """The reference: the query path's tokens through timm's own `Block.forward` with the full (T, T) one-way mask."""
    query_tokens = embed_queries(vit, queries)
    x = tokens_before_blocks(vit, images, extra=query_tokens)
    num_image = x.shape[1] - query_tokens.shape[1]
    mask = one_way_attention_mask(num_image, query_tokens.shape[1], device=x.device)
    for blk in vit.blocks:
        x = blk(x, attn_mask=mask)
    x = vit.norm(x)
    return x[:, :num_image], x[:, num_image:]


def backbone_calls(spec: dict) -> dict[str, Callable[[], tuple[Tensor, Tensor]]]:
    """Forward + backward of the backbone on the 2 global views (as one batch, as the network runs them), per path;
    each call returns the path's (image tokens, query tokens), detached."""
    device = torch.device(spec["device"])
    cfg = train_config(spec, spec["queries"])
    torch.manual_seed(spec["seed"])
    vit = build_backbone(cfg).to(device).train()  # drop_path 0: the paths' outputs are comparable
    dtype, _ = resolve_precision(cfg, device)
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    patch = vit.patch_embed.patch_size[0]
    images = torch.randn(2 * spec["batch"], 3, spec["img_size"], spec["img_size"], generator=g).to(device)
    queries = torch.randn(2 * spec["batch"], spec["queries"], 3, patch, patch, generator=g).to(device)
    forwards = {"plain": lambda: (vit.forward_features(images), images.new_zeros(0)),
                "queries": lambda: forward_with_queries(vit, images, queries),
                "timm_blocks": lambda: timm_blocks_path(vit, images, queries)}

    def call(forward: Callable[[], tuple[Tensor, Tensor]]) -> Callable[[], tuple[Tensor, Tensor]]:
        def forward_backward() -> tuple[Tensor, Tensor]:
            with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                tokens, query_tokens = forward()
            loss = tokens.float().square().mean() + query_tokens.float().square().sum() / max(query_tokens.numel(), 1)
            vit.zero_grad(set_to_none=True)
            loss.backward()
            return tokens.detach(), query_tokens.detach()
        return forward_backward

    return {path: call(forward) for path, forward in forwards.items()}


def calls(spec: dict) -> dict[str, Callable]:
    if spec["part"] == "step":
        return {config: step_call(spec, config) for config in spec["configs"]}
    return {path: fn for path, fn in backbone_calls(spec).items() if path in spec["configs"]}


def alternate(fns: dict[str, Callable], device: str, warmup: int, repeats: int) -> tuple[dict[str, list[float]], dict]:
    """Seconds per call of each function, the functions called in turn within each of `repeats` rounds after `warmup`
    calls each; and each function's last return value."""
    last = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            last[name] = fn()
    seconds = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start_s = time.perf_counter()
            last[name] = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start_s)
    return seconds, last


def worker(spec: dict) -> None:
    """'memory': one configuration's peak in this fresh process; 'time': all configurations alternated."""
    memory = PeakMemory(spec["device"])
    fns = calls(spec)
    if spec["mode"] == "memory":
        (fn,) = fns.values()
        write_result(spec, measure(fn, spec["device"], memory, spec["warmup"], 1))
        return
    seconds, last = alternate(fns, spec["device"], spec["warmup"], spec["repeats"])
    result = {"seconds": seconds}
    if spec["part"] == "step":
        result["flops"] = {name: count_flops(fn) for name, fn in fns.items()}
        if spec["device"] == "cpu":
            result["live_mib"] = {name: live_peak_mib(fn) for name, fn in fns.items()}
    if spec["part"] == "backbone":  # max |difference| of the paths' outputs
        out = {path: [t.float().cpu() for t in tokens] for path, tokens in last.items()}
        (image, query), plain, timm_blocks = out["queries"], out["plain"], out["timm_blocks"]
        result["checks"] = {"query path image tokens vs plain forward_features": (image - plain[0]).abs().max().item(),
                            "query path vs timm blocks, image tokens": (image - timm_blocks[0]).abs().max().item(),
                            "query path vs timm blocks, query tokens": (query - timm_blocks[1]).abs().max().item()}
    write_result(spec, result)


def count_flops(fn: Callable) -> int:
    """FLOPs of one call as torch's FlopCounterMode counts them (matmuls, convolutions, attention; no elementwise
    ops): the work a time ratio cannot go below unless the step does less of it."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def live_peak_mib(fn: Callable) -> float:
    """Peak of the tensor memory one call allocates and has not freed yet (MiB), from torch's profiler: its
    allocator events ('[memory]', one per allocation and free, with a time stamp) summed in time order. On the CPU
    this is the counterpart of CUDA's max_memory_allocated over the step; peak RSS also counts what the allocator
    keeps. (The per-op memory figures are no substitute: a free between the ops inside a Python-level scope, such as
    a custom autograd Function, counts only at that scope's end.)"""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak / MIB


def paired_ratio(seconds: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of name's time over base's time in the same round."""
    return statistics.median(a / b for a, b in zip(seconds[name], seconds[base]))


def run_part(common: dict, part: str, configs: tuple[str, ...], base: str) -> tuple[dict, dict, dict]:
    """Time (alternated, one process) and memory (one fresh process per configuration) of a part ->
    (figures per configuration, ratios over `base` per configuration, output checks)."""
    timed = run_worker(__file__, dict(common, part=part, mode="time", configs=configs, label=f"{part} time"))
    seconds = timed["seconds"]
    print(f"  done: {part}, time of {', '.join(configs)} alternated", flush=True)
    figures, ratios = {}, {}
    for config in configs:
        peak = run_worker(__file__, dict(common, part=part, mode="memory", configs=[config],
                                         label=f"{part} {config} memory"))
        figures[config] = {"median_s": statistics.median(seconds[config]), "seconds": seconds[config],
                           "total_mib": peak["total_mib"], "work_mib": peak["work_mib"]}
        if "flops" in timed:
            figures[config]["gflop"] = timed["flops"][config] / 1e9
        if "live_mib" in timed:
            figures[config]["live_mib"] = timed["live_mib"][config]
        print(f"  done: {part} {config} memory", flush=True)
    for config in configs:
        ratios[config] = {"time": paired_ratio(seconds, config, base),
                          "total_mem": ratio(figures[config]["total_mib"], figures[base]["total_mib"]),
                          "work_mem": ratio(figures[config]["work_mib"], figures[base]["work_mib"])}
        if "flops" in timed:
            ratios[config]["flops"] = ratio(timed["flops"][config], timed["flops"][base])
        if "live_mib" in timed:
            ratios[config]["live_mem"] = ratio(timed["live_mib"][config], timed["live_mib"][base])
    return figures, ratios, timed.get("checks", {})


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
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; medians are reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (optimizer state, allocator)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="as the engine's: auto = bf16 (or fp16) on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-backbone", action="store_true", help="only the full-step comparison")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the figures to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2-block ViT-Ti at 64 px, 2 rounds")
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
    common = dict(arch=args.arch, depth=args.depth, img_size=args.img_size, batch=args.batch, queries=args.queries,
                  local_crops=args.local_crops, local_size=args.local_size, out_dim=args.out_dim,
                  precision=args.precision, seed=args.seed, device=args.device, threads=args.threads,
                  warmup=args.warmup, repeats=args.repeats)
    try:  # the engine's own check (e.g. bf16 on CPU), before any worker starts
        fp32 = resolve_precision(train_config(common, 0), torch.device(args.device))[0] is None
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(f"{args.arch}{f' depth {args.depth}' if args.depth else ''}, {args.img_size} px, batch {args.batch} "
          f"(2 global views{f' + {args.local_crops} local at {args.local_size} px' if args.local_crops else ''}), "
          f"r = {args.queries}, out_dim {args.out_dim}, precision {args.precision}; time: median of {args.repeats} "
          f"alternated rounds after {args.warmup} warm-up calls\n")

    steps, step_ratios, _ = run_part(common, "step", STEP_CONFIGS, "DINO")
    backbone, backbone_ratios, checks = {}, {}, {}
    if not args.skip_backbone:
        backbone, backbone_ratios, checks = run_part(common, "backbone", BACKBONE_PATHS, "plain")

    print("\nfull training step (Trainer.train_step)")
    live = "live_mib" in steps["DINO"]  # CPU: the profiler's live tensor peak beside peak RSS
    print(table(["config", "ms/step", "img/s", "GFLOP", "total MiB", "work MiB"] + ["live MiB"] * live,
                [[name, 1e3 * s["median_s"], args.batch / s["median_s"], s["gflop"], s["total_mib"], s["work_mib"]]
                 + [s["live_mib"]] * live for name, s in steps.items()]))
    step_ratio = step_ratios["ADCLR"]
    met = step_ratio["time"] <= STEP_TARGET and step_ratio["total_mem"] <= STEP_TARGET
    print(f"\nADCLR / DINO: time {step_ratio['time']:.3f}x (median of per-round ratios), total memory "
          f"{step_ratio['total_mem']:.3f}x, work memory {step_ratio['work_mem']:.3f}x"
          + (f", live tensor memory {step_ratio['live_mem']:.3f}x" if live else "") + f"; FLOPs "
          f"{step_ratio['flops']:.3f}x (the time ratio's floor at equal efficiency)")
    print(f"target (time and total memory <= {STEP_TARGET}x DINO): {'met' if met else 'NOT met'}")

    failed, backbone_met = [], None
    if backbone:
        print("\nbackbone only, forward + backward of the 2 global views (ratios over plain forward_features)")
        print(table(["path", "ms", "total MiB", "work MiB", "time ratio", "total mem ratio", "work mem ratio"],
                    [[path, 1e3 * b["median_s"], b["total_mib"], b["work_mib"], backbone_ratios[path]["time"],
                      backbone_ratios[path]["total_mem"], backbone_ratios[path]["work_mem"]]
                     for path, b in backbone.items()]))
        backbone_met = backbone_ratios["queries"]["time"] <= BACKBONE_TARGET
        print(f"target (query path time <= {BACKBONE_TARGET}x plain): {'met' if backbone_met else 'NOT met'}")
        print("\noutput checks (max |difference|)" + ("" if fp32 else ", reduced precision: printed, not enforced"))
        for what, diff in checks.items():
            print(f"  {what}: {diff:.2e}")
            if fp32 and not diff < TOLERANCE:
                failed.append(f"{what}: {diff:.2e}")

    write_json(args.json, {"benchmark": "train_step", "machine": info, "args": vars(args), "step": steps,
                           "step_ratio_adclr_over_dino": step_ratio, "backbone": backbone,
                           "backbone_ratio_over_plain": backbone_ratios, "checks": checks,
                           "targets": {"step": STEP_TARGET, "backbone_time": BACKBONE_TARGET},
                           "targets_met": {"step": met, "backbone_time": backbone_met}})
    if failed:
        print(f"\nFAILED: paths differ by >= {TOLERANCE:g}:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    ARGS = parse_args()
    sys.exit(worker(read_spec(ARGS.worker)) if ARGS.worker else main(ARGS))
