"""The `adclr` command: one sub-command per task, each a thin layer over the Python API."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


def _megabytes(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MB"


def cmd_models(args: argparse.Namespace) -> int:
    """Print every registered ADCLR architecture with its published weights and whether they are cached."""
    from . import models
    from .weights import cached_path

    rows = [("model", "tag", "hub repo", "size", "license", "cached")]
    for arch in models.TIMM_EQUIVALENT:
        entries = [e for e in models.MANIFEST.values() if e.arch == arch]
        rows += [(arch, e.tag, e.hf_hub_id or "(embedded in adclr)", _megabytes(e.size_bytes), e.license,
                  "no" if cached_path(e) is None else "yes")
                 for e in entries] or [(arch, "-", "(no published weights)", "-", "-", "-")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def add_config_flags(p: argparse.ArgumentParser, config: type, required: Sequence[str] = ()) -> None:
    """One flag per dataclass field (--num-queries for num_queries), so the CLI and the config never drift apart.

    A field's metadata may give ``help``, ``choices`` and ``type`` (needed where the default is None)."""
    import dataclasses

    defaults = config()
    for f in dataclasses.fields(config):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        kwargs = {"default": default, "help": f.metadata.get("help")}
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, tuple):
            p.add_argument(flag, type=float, nargs=2, metavar=("LOW", "HIGH"), **kwargs)
        elif isinstance(default, dict):
            p.add_argument(flag, type=_json_object, metavar="JSON", **kwargs)
        else:
            p.add_argument(flag, type=f.metadata.get("type") or type(default), choices=f.metadata.get("choices"),
                           required=f.name in required, **kwargs)


def add_train_args(p: argparse.ArgumentParser) -> None:
    from .train.config import TrainConfig

    from .train.config import PRESETS

    add_config_flags(p, TrainConfig, required=("data",))
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a named recipe (small: a few thousand images); flags set to other than their default win")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its checkpoint (with more --epochs: extend it)")


def cmd_train(args: argparse.Namespace) -> int:
    """Train an ADCLR backbone on an image folder (multi-process: torchrun --nproc_per_node=K -m adclr.train ...)."""
    import logging

    from .train.config import TrainConfig
    from .train.engine import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    values = {k: v for k, v in vars(args).items() if k not in ("command", "fn", "resume", "preset")}
    if args.preset:
        defaults = TrainConfig().to_dict()
        values = {k: v for k, v in values.items() if v != defaults[k]}
        config = TrainConfig.from_preset(args.preset, **values)
    else:
        config = TrainConfig.from_dict(values)
    train(config, resume=args.resume)
    return 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a training checkpoint (OUTPUT/checkpoint.pth)")
    p.add_argument("--out", required=True, help="folder to write model.safetensors, config.json and README.md to")
    p.add_argument("--license", default="apache-2.0")
    p.add_argument("--description", default="")


def cmd_export(args: argparse.Namespace) -> int:
    """Export the teacher backbone of a training checkpoint as a plain timm model folder."""
    from .train.checkpoint import export_teacher

    info = export_teacher(args.checkpoint, args.out, license=args.license, description=args.description)
    print(f"wrote {args.out}: {info['architecture']}-family ViT, sha256 {info['sha256']}, {info['size_bytes']} bytes; "
          f"load with timm.create_model('local-dir:{args.out}', pretrained=True)")
    return 0


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}); write e.g. '{{\"depth\": 6}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"depth\": 6}'")
    return value


def _metric(text: str) -> tuple[str, object]:
    """NAME=VALUE; the value is read as a number when it is one."""
    import json

    name, sep, value = text.partition("=")
    if not (name and sep and value):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. knn_top1=74.2), got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def _add_card_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--description", default="", help="one line about the weights")
    p.add_argument("--source", default="", help="how the weights were made (paper, run, original file)")
    p.add_argument("--metric", type=_metric, action="append", default=[], metavar="NAME=VALUE",
                   help="a result to list, repeatable (e.g. --metric knn_top1=74.2)")


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint: .pth/.pt (read with weights_only=True) or .safetensors")
    p.add_argument("--arch", required=True, help="timm architecture, e.g. adclr_vit_small or vit_base_patch16_224")
    p.add_argument("--out", required=True, help="folder to write: model.safetensors, config.json, README.md")
    p.add_argument("--key", default="teacher",
                   help="network of a training checkpoint: teacher (default) or student; ignored for bare state dicts")
    p.add_argument("--img-size", type=_image_size, metavar="N|HxW",
                   help="input size of the converted model, square N or HxW / H,W (default: the arch's; overrides "
                        "img_size in --model-args); the position embedding is resampled and config.json records it")
    p.add_argument("--dino-interpolation", action="store_true",
                   help="resample the position embedding to the --img-size grid as DINO does at run time (bicubic, "
                        "scale factor + 0.1). It acts only at conversion: nothing changes when --img-size is the "
                        "checkpoint's own grid, and at other input sizes (dynamic_img_size, img_size overrides) timm "
                        "resamples with its own rule, so outputs match DINO's at the --img-size only")
    p.add_argument("--model-args", type=_json_object, default={}, metavar="JSON",
                   help='extra timm model kwargs, e.g. \'{"depth": 6}\'')
    p.add_argument("--license", default="apache-2.0", help="license of the weights (default apache-2.0)")
    _add_card_args(p)


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a DINO/iBOT/ADCLR or timm checkpoint into a folder that plain timm loads."""
    from .convert import convert_checkpoint

    model_args = dict(args.model_args)
    if args.img_size is not None:
        model_args["img_size"] = args.img_size
    info = convert_checkpoint(args.src, args.arch, args.out, key=args.key, dino_interpolation=args.dino_interpolation,
                              license=args.license, description=args.description, source=args.source,
                              metrics=dict(args.metric), **model_args)
    print(f"wrote {args.out}: timm {info['architecture']}, {_megabytes(info['size_bytes'])}, sha256 {info['sha256']}")
    print(f"check it: timm.create_model('local-dir:{args.out}', pretrained=True); publish it: "
          f"adclr publish {args.out} --repo ORG/NAME")
    return 0


def add_publish_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a folder written by `adclr convert` or adclr.export.export_model")
    p.add_argument("--repo", required=True, help="Hub repo ORG/NAME")
    p.add_argument("--revision", help="40-hex commit id the folder was pushed as (without --push)")
    p.add_argument("--push", action="store_true",
                   help="upload with huggingface_hub.upload_folder (token: HF_TOKEN or `hf auth login`)")
    p.add_argument("--name", help="manifest entry name arch.tag (default: the ADCLR arch, tagged by the repo name)")
    _add_card_args(p)


def cmd_publish(args: argparse.Namespace) -> int:
    """Validate an exported folder, optionally push it, and print its weights_manifest/weights.toml entry."""
    from .publish import publish

    entry = publish(args.folder, args.repo, name=args.name, revision=args.revision, push=args.push,
                    description=args.description, source=args.source, metrics=dict(args.metric))
    print(f"{args.folder} loads with plain timm; add this entry to weights_manifest/weights.toml:", file=sys.stderr)
    print(entry, end="")
    return 0


def add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME", help="manifest entries arch.tag to check (default: all)")


def cmd_verify(args: argparse.Namespace) -> int:
    """Download (or read from cache) manifest weights and check each sha256; non-zero exit on any failure."""
    from .publish import verify

    checks = verify(args.names)
    for check in checks:
        print(f"{check.status:<8}  {check.name}  {check.detail}")
    failed = sum(not check.ok for check in checks)
    print(f"{len(checks)} checked, {len(checks) - failed} ok, {failed} failed" if checks
          else "the weights manifest lists no entries")
    return 1 if failed else 0


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The task, the model and the data, then one flag per EvalConfig field."""
    from .evaluate import EvalConfig, TASKS

    p.add_argument("task", choices=TASKS,
                   help="knn: DINO weighted k-NN; linear: linear probe; seg: 1x1 linear probe on patch maps")
    p.add_argument("--model", required=True,
                   help="timm name (with --pretrained for its weights), local-dir:PATH, hf-hub:ORG/REPO, or a "
                        "training checkpoint .pth")
    p.add_argument("--data", default=None,
                   help="fashion-mnist (knn/linear, the default), fashion-scenes (seg, the default), or an image "
                        "folder ROOT with train/ and val/ class sub-folders (knn/linear)")
    add_config_flags(p, EvalConfig)
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the record to this file")


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a backbone's frozen features: k-NN, linear probe, or dense segmentation probe."""
    import dataclasses
    import json
    from pathlib import Path

    from .evaluate import EvalConfig, evaluate

    config = EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)})
    record = evaluate(args.model, args.task, args.data, config)
    scores = (f"mIoU {record['miou']:.2f}%  foreground IoU {record['fg_iou']:.2f}%  "
              f"pixel acc {record['pixel_acc']:.2f}%" if args.task == "seg" else f"top-1 {record['top1']:.2f}%")
    print(f"{args.task} {scores}  ({record['model']} on {record['data']}, {record['n_train']} train / "
          f"{record['n_test']} test, {record['seconds']:.1f} s)")
    text = json.dumps(record, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


def _image_size(text: str) -> int | tuple[int, int]:
    """N (square, or the shorter side where the command says so), HxW or H,W (rows x columns)."""
    try:
        parts = [int(v) for v in text.lower().replace(",", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N, HxW or H,W (e.g. 224, 320x480, 320,480), got {text!r}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _size_arg(text: str) -> int | tuple[int, int] | str:
    """N (shorter side), HxW / H,W (exact) or 'native' (each image's own size)."""
    return text if text == "native" else _image_size(text)


def add_features_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size)")
    p.add_argument("--model", default=None,
                   help="timm name with published weights, local-dir:PATH, hf-hub:ORG/REPO or a training checkpoint "
                        "(default: the bundled demo model, adclr.features.DEMO_MODEL)")
    p.add_argument("--out", default=".", help="folder for <stem>.npz|.safetensors and <stem>_pca.png (default: .)")
    p.add_argument("--layers", type=int, nargs="+", default=None, metavar="I",
                   help="also save the patch maps of these blocks (0-based, negative from the end) as layer<I>")
    p.add_argument("--size", type=_size_arg, default=None,
                   help="N: resize the shorter side to N; HxW: resize exactly; native: keep each image's size "
                        "(default: the model's input size as the shorter side)")
    p.add_argument("--format", choices=("npz", "safetensors"), default="npz")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="compute precision: fp32 (default) or bf16 / fp16 under autocast (GPU; on a CPU slower unless "
                        "it has bf16/fp16 instructions); the files hold float32 either way")


def cmd_features(args: argparse.Namespace) -> int:
    """Save patch features and a PCA picture per image; exit 1 if any image could not be read."""
    import torch
    from timm.data import resolve_model_data_config

    from .load import load_model
    from .features import DEMO_MODEL, write_features

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model or DEMO_MODEL, pretrained=True).to(device)
    if args.size is None:
        size = resolve_model_data_config(model)["input_size"][-1]
    else:
        size = None if args.size == "native" else args.size
    failed = write_features(model, args.images, args.out, layers=args.layers, size=size, format=args.format,
                            dtype=args.dtype)
    for path, error in failed.items():
        print(f"adclr features: skipped {path}: {error}", file=sys.stderr)
    print(f"wrote features of {len(args.images) - len(failed)} of {len(args.images)} images to {args.out}")
    return 1 if failed else 0


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="adclr-demo", help="folder for the pictures and report.md (default: adclr-demo)")
    p.add_argument("--model", default=None, help="as for `adclr features` (default: the bundled demo model)")
    p.add_argument("--samples", default=None, help="folder of PNGs to use instead of the bundled samples")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cpu, seconds for the demo model)")


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the bundled model on the bundled images, offline: PCA and attention pictures plus a report."""
    from .demo import run_demo
    from .features import DEMO_MODEL

    out = run_demo(args.out, args.model or DEMO_MODEL, samples=args.samples, device=args.device)
    print(f"wrote {out / 'overview.png'} and {out / 'report.md'}")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None] | None]] = {
    "demo": (cmd_demo, add_demo_args),
    "features": (cmd_features, add_features_args),
    "models": (cmd_models, None),
    "train": (cmd_train, add_train_args),
    "export": (cmd_export, add_export_args),
    "convert": (cmd_convert, add_convert_args),
    "publish": (cmd_publish, add_publish_args),
    "verify": (cmd_verify, add_verify_args),
    "eval": (cmd_eval, add_eval_args),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adclr", description="ADCLR self-supervised ViT backbones for timm.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().split("\n")[0])
        if add_args:
            add_args(p)
        p.set_defaults(fn=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command; an error the user can fix (`adclr.errors.ADCLRError`) ends in one line on stderr and
    exit status 2, its traceback only with ADCLR_DEBUG=1. Any other exception is a bug and keeps its traceback."""
    import os

    from .errors import ADCLRError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ADCLRError as error:
        if os.environ.get("ADCLR_DEBUG") == "1":
            raise
        print(f"adclr {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
