"""Foreign checkpoints -> plain timm ViT folders.

DINO, iBOT and ADCLR training runs save `{'teacher': ..., 'student': ...}` dicts whose backbone keys already use timm's
ViT names (`blocks.i.attn.qkv`, `patch_embed.proj`, `cls_token`, `pos_embed`, `norm`) behind wrapper prefixes:
`module.` (DDP), `backbone.` (the multi-crop wrapper), `_orig_mod.` (torch.compile). Released backbone files and timm
state dicts are bare. So conversion is: pick the network, strip the prefixes, drop what only training needs (projection
head, mask tokens), fit the position embedding to the target grid, and insist the rest matches the model key for key.
"""
from __future__ import annotations

import argparse
import logging
import math
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models import VisionTransformer

from .errors import InvalidSettingError, MissingFileError
from .export import export_model

_logger = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "backbone.", "_orig_mod.")
#: Training-only parameters: projection heads (incl. weight-norm `weight_g/weight_v` and `parametrizations.weight.*`
#: of their last layer) and the masked-image-modelling token (iBOT's `masked_embed`, ADCLR's `mask_token`).
HEAD_PREFIX = "head."
MASK_TOKENS = frozenset({"masked_embed", "mask_token"})
#: Plain attribute containers that training checkpoints carry next to the weights (DINO and iBOT save `args`).
#: Unpickling them only sets attributes, so they are safe to allow under `weights_only=True`.
SAFE_GLOBALS = [argparse.Namespace]
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")


def read_source_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """Read a checkpoint without executing code: safetensors, or torch pickles under `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist; pass the path of a .pth/.pt/.safetensors file.")
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise InvalidSettingError(f"{path}: unsupported file type '{path.suffix}'; expected .safetensors or one of "
                                  f"{', '.join(PICKLE_SUFFIXES)} (a torch.save file).")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL (\S+)", str(e))
        raise InvalidSettingError(
            f"{path} was refused: it holds pickled objects other than tensors and plain containers "
            f"({refused.group(1) if refused else str(e).splitlines()[0]}), and loading it could run code. Nothing "
            "was executed. If you trust the file, re-save only its tensors (e.g. torch.save(ckpt['teacher'], "
            "'teacher.pth') in the original code base) and convert that.") from None


def _is_state_dict(obj: Mapping[str, Any]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def _network_state(obj: Any, key: str) -> Mapping[str, torch.Tensor]:
    """The state dict to convert: the checkpoint itself when bare, else its `key` network."""
    if not isinstance(obj, Mapping):
        raise InvalidSettingError(f"the checkpoint holds a {type(obj).__name__}, not a dict of tensors or a training "
                                  "checkpoint dict; save the model's state_dict() instead.")
    if _is_state_dict(obj):
        return obj
    networks = sorted(k for k, v in obj.items() if isinstance(v, Mapping) and v and _is_state_dict(v))
    if key not in networks:
        raise InvalidSettingError(f"the training checkpoint has no network '{key}'; its state dicts are: "
                                  f"{', '.join(networks) or 'none'}. Pick one with key=... (--key).")
    return obj[key]


def _strip_wrappers(name: str) -> str:
    while True:
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        else:
            return name


def _is_training_only(name: str) -> bool:
    return name.startswith(HEAD_PREFIX) or name in MASK_TOKENS


def dino_resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample a square position-embedding grid to `grid` (rows, cols) exactly as DINO's ViT does at run time.

    DINO calls bicubic interpolation with `scale_factor=(rows + 0.1) / side` (no antialiasing): the offset keeps the
    output size right under float error, and, because the scale factor itself sets the sampling positions, it also
    shifts them slightly. timm resizes to the target size instead, so the two give (slightly) different embeddings.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    square = rearrange(patches.float(), "1 (h w) c -> 1 c h w", h=side, w=side)
    scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
    resampled = F.interpolate(square, scale_factor=scale, mode="bicubic")
    if tuple(resampled.shape[-2:]) != tuple(grid):
        raise InvalidSettingError(f"DINO-style resampling of a {side}x{side} grid gave {tuple(resampled.shape[-2:])}, "
                                  f"not {grid}.")
    return torch.cat([prefix, rearrange(resampled, "1 c h w -> 1 (h w) c").to(pos_embed.dtype)], dim=1)


def _fit_pos_embed(pos_embed: torch.Tensor, model: VisionTransformer, dino_interpolation: bool) -> torch.Tensor:
    """Resample the checkpoint's position embedding to the model's patch grid (a no-op when they agree)."""
    target = model.pos_embed.shape
    if pos_embed.ndim != 3 or pos_embed.shape[-1] != target[-1] or pos_embed.shape[1] == target[1]:
        if dino_interpolation and pos_embed.shape == target:
            _logger.warning("dino_interpolation has no effect: the model's grid is the checkpoint's own, which DINO "
                            "uses unchanged too; give the input size to match DINO at (--img-size)")
        return pos_embed  # same grid, or a shape problem that the key check reports
    num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    side = math.isqrt(pos_embed.shape[1] - num_prefix)
    if side * side != pos_embed.shape[1] - num_prefix:
        raise InvalidSettingError(f"pos_embed has {pos_embed.shape[1] - num_prefix} patch positions, not a square "
                                  "grid; convert to the img_size the checkpoint was trained at.")
    grid = tuple(model.patch_embed.grid_size)
    if dino_interpolation:
        return dino_resample_pos_embed(pos_embed, grid, num_prefix)
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=[side, side], num_prefix_tokens=num_prefix)


def _listing(names: list[str], limit: int = 12) -> str:
    more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_fits(state: Mapping[str, torch.Tensor], model: VisionTransformer) -> None:
    """Every backbone key consumed and every model key filled with the right shape, or one readable diff."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in sorted(expected.keys() & state.keys()) if state[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    arch = model.pretrained_cfg.get("architecture", type(model).__name__)
    dims = (f"embed_dim={model.embed_dim}, depth={len(model.blocks)}, num_heads={model.blocks[0].attn.num_heads}, "
            f"patch_size={model.patch_embed.patch_size[0]}")
    lines = [f"the checkpoint does not fit {arch} ({dims}):"]
    for title, names in (("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
                         ("shape differs (checkpoint vs model)", mismatched)):
        if names:
            lines.append(f"  {title} ({len(names)}): {_listing(names)}")
    lines.append("Fix: choose the architecture and dims the checkpoint was trained with (--arch, --model-args), "
                 "or the other network (--key).")
    raise InvalidSettingError("\n".join(lines))


def to_timm_state_dict(obj: Any, model: VisionTransformer, key: str = "teacher",
                       dino_interpolation: bool = False) -> dict[str, torch.Tensor]:
    """Map a loaded checkpoint (any supported layout) onto `model`'s timm keys; raises on any key or shape mismatch."""
    state: dict[str, torch.Tensor] = {}
    for raw_name, tensor in _network_state(obj, key).items():
        name = _strip_wrappers(raw_name)
        if _is_training_only(name):
            continue
        if name in state:
            raise InvalidSettingError(f"two checkpoint keys map to '{name}' once wrapper prefixes are stripped (one is "
                                      f"'{raw_name}'); the file mixes networks, convert a single network's state dict.")
        state[name] = tensor
    if "pos_embed" in state:
        state["pos_embed"] = _fit_pos_embed(state["pos_embed"], model, dino_interpolation)
    _check_fits(state, model)
    return state


def convert_checkpoint(src: str | Path, arch: str, out_dir: str | Path, key: str = "teacher",
                       dino_interpolation: bool = False, license: str = "apache-2.0",
                       description: str = "", source: str = "", metrics: Mapping[str, Any] | None = None,
                       **model_kwargs: Any) -> dict[str, Any]:
    """Convert `src` into a timm folder at `out_dir` for `arch` (+ `model_kwargs`: dims, `img_size` N or (H, W));
    returns export_model's info."""
    obj = read_source_checkpoint(src)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **model_kwargs)
    model.load_state_dict(to_timm_state_dict(obj, model, key=key, dino_interpolation=dino_interpolation))
    network = "" if _is_state_dict(obj) else f", '{key}' network"
    return export_model(model, out_dir, name=f"{arch} converted from {Path(src).name}", license=license,
                        description=description,
                        source=source or f"`{Path(src).name}`{network}, converted with `adclr convert`",
                        method="that of the source checkpoint (see Source); the card does not assume ADCLR",
                        metrics=metrics)
