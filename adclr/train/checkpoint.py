"""Training checkpoints: written atomically, holding everything `--resume` needs; read by
`adclr.load.read_training_checkpoint`.

Layout: {'student', 'teacher': SSLNetwork state dicts ('backbone.<timm key>', 'head.*', 'mask_token'), 'optimizer',
'scaler', 'loss' (the centers), 'epoch' (epochs completed), 'step', 'rng', 'config', 'world' (processes), 'images'}.
'world' and 'images' only let a resumed run say what changed in its length.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..load import load_teacher_backbone, read_training_checkpoint

CHECKPOINT_NAME = "checkpoint.pth"


def capture_rng() -> dict[str, Any]:
    """Every RNG a step draws from (torch CPU/CUDA, Python, NumPy), in types `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _temporary_affixes(path: Path) -> tuple[str, str]:
    return f".{path.name}.", ".tmp"


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temporary_affixes(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files that save_atomic(…, path) left when its process was killed mid-save."""
    path = Path(path)
    prefix, suffix = _temporary_affixes(path)
    stale = sorted(path.parent.glob(f"{prefix}*{suffix}")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def export_teacher(checkpoint_path: str | Path, out_dir: str | Path, **card) -> dict[str, Any]:
    """The teacher backbone of a training checkpoint as a plain timm model folder (see `adclr.export`)."""
    from ..export import export_model
    from .config import TrainConfig

    checkpoint = read_training_checkpoint(checkpoint_path)  # read once: a run's checkpoint also holds optimizer state
    cfg = TrainConfig.from_dict(checkpoint["config"])
    card.setdefault("source", f"adclr train ({cfg.variant}, {cfg.num_queries} queries, {checkpoint['epoch']} epochs, "
                              f"data {cfg.data})")
    card.setdefault("name", f"{cfg.arch} (ADCLR-{cfg.variant.upper()})")
    return export_model(load_teacher_backbone(checkpoint), out_dir, **card)
