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
        rows += [(arch, e.tag, e.hf_hub_id, _megabytes(e.size_bytes), e.license, "no" if cached_path(e) is None else "yes")
                 for e in entries] or [(arch, "-", "(no published weights)", "-", "-", "-")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--num-queries for num_queries), so the CLI and the config never drift apart."""
    import dataclasses
    import json

    from .train.config import TrainConfig

    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            p.add_argument(flag, type=float, nargs=2, default=default, metavar=("LOW", "HIGH"))
        elif isinstance(default, dict):
            p.add_argument(flag, type=json.loads, default=default, metavar="JSON",
                           help='extra timm.create_model arguments, e.g. \'{"depth": 6, "patch_size": 8}\'')
        elif f.name == "query_size":
            p.add_argument(flag, type=int, default=None, help="query crop size in pixels (default: the patch size)")
        else:
            p.add_argument(flag, type=type(default), default=default, required=f.name == "data")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")


def cmd_train(args: argparse.Namespace) -> int:
    """Train an ADCLR backbone on an image folder (multi-process: torchrun --nproc_per_node=K -m adclr.train ...)."""
    import logging

    from .train.config import TrainConfig
    from .train.engine import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    values = {k: v for k, v in vars(args).items() if k not in ("command", "fn", "resume")}
    train(TrainConfig.from_dict(values), resume=args.resume)
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


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None] | None]] = {
    "models": (cmd_models, None),
    "train": (cmd_train, add_train_args),
    "export": (cmd_export, add_export_args),
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
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
