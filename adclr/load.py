"""Any backbone spec -> a timm model without classifier: a timm name, ``local-dir:``/``hf-hub:`` or a training
checkpoint.

The inference side (features, evaluation, demo, CLI) loads models only through here, so it never imports the training
package: a training checkpoint is read as plain tensors plus the config dict it stores.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import VisionTransformer
from torch import nn

from .errors import CheckpointError, InvalidSettingError, MissingFileError, UnsupportedModelError

CHECKPOINT_SUFFIXES = (".pth", ".pt")


def read_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A run's ``checkpoint.pth`` (see `adclr.train.checkpoint` for its layout), loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no training checkpoint at {path}: pass the checkpoint.pth inside a run's --output "
                               "(or, for --resume, the --output of the run to continue).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable training checkpoint ({type(e).__name__}: {e}). If it is a "
                              "truncated copy, restore it from the run folder; foreign checkpoints go through "
                              "`adclr convert`.") from None
    missing = {"student", "teacher", "config", "epoch"} - set(checkpoint)
    if missing:
        raise CheckpointError(f"{path} lacks {sorted(missing)}: not an adclr training checkpoint. Foreign checkpoints "
                              "go through `adclr convert`.")
    return checkpoint


def create_vit(arch: str, *, img_size: int, **kwargs: Any) -> VisionTransformer:
    """``timm.create_model(arch)`` without classifier and weights, checked to be a ViT (ADCLR's queries need one)."""
    backbone = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size, **kwargs)
    if not isinstance(backbone, VisionTransformer):  # checked here to name the arch; adclr.vit checks given models
        raise UnsupportedModelError(f"--arch {arch} builds a {type(backbone).__name__}; ADCLR needs a timm "
                                    "VisionTransformer (e.g. adclr_vit_small, vit_small_patch16_224, test_vit).")
    return backbone


def load_teacher_backbone(checkpoint: str | Path | dict[str, Any]) -> VisionTransformer:
    """The teacher's backbone of a training checkpoint (a path, or one read by `read_training_checkpoint`) as a plain
    timm ViT (fixed input size), in eval mode. Its config gives ``arch``, ``img_size`` and ``model_kwargs``."""
    if not isinstance(checkpoint, dict):
        checkpoint = read_training_checkpoint(checkpoint)
    config = checkpoint["config"]
    backbone = create_vit(config["arch"], img_size=config["img_size"], **config["model_kwargs"])
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["teacher"].items() if k.startswith(prefix)})
    return backbone.eval()


def load_model(spec: str | os.PathLike | nn.Module, pretrained: bool = False) -> nn.Module:
    """A backbone without classifier from a timm name, ``local-dir:``/``hf-hub:`` source or training checkpoint.

    A checkpoint (``*.pth``/``*.pt``) holds ``{'teacher': {'backbone.<timm key>': tensor, ...}, 'config': {'arch',
    'img_size', 'model_kwargs'}}``: the arch is rebuilt from its config and the teacher's backbone loaded strictly.
    ``local-dir:`` and ``hf-hub:`` always load their weights; a plain timm name only with ``pretrained=True``.
    """
    if isinstance(spec, nn.Module):
        return spec
    spec = os.fspath(spec)
    if spec.endswith(CHECKPOINT_SUFFIXES) or os.path.isfile(spec):
        return load_teacher_backbone(spec)
    if spec.startswith("local-dir:") and not Path(spec.removeprefix("local-dir:")).is_dir():
        raise MissingFileError(f"{spec}: no such folder; pass a folder written by `adclr export` or `adclr convert`")
    from_files = spec.startswith(("local-dir:", "hf-hub:"))
    if not from_files and not timm.is_model(spec.partition(".")[0]):
        raise InvalidSettingError(f"unknown model {spec!r}: not a timm architecture, a local-dir:/hf-hub: source or an "
                                  "existing checkpoint file; `adclr models` lists ours, timm.list_models() all")
    return timm.create_model(spec, pretrained=pretrained or from_files, num_classes=0)
