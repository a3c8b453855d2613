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


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None] | None]] = {
    "models": (cmd_models, None),
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
