"""Reading images: any PIL mode to 8-bit RGB, decoded eagerly, and an image folder that skips unreadable files.

Used by training (`adclr.train`) and by inference (`adclr.features`, `adclr.evaluate`, `adclr.demo`) alike.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .errors import InvalidSettingError, MissingFileError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "load_rgb", "to_rgb"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; high bit depths are rescaled, because PIL's own convert clips them at 255.

    'I;16*' is scaled from 0..65535; 'I' and 'F' from the smallest of 255 / 65535 (and 1.0 for 'F')
    that covers the image's maximum. Alpha is dropped, as DINO and torchvision do.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}; open files with PIL.Image.open")
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            full_scale = 65535.0
        else:
            candidates = (1.0, 255.0, 65535.0) if image.mode == "F" else (255.0, 65535.0)
            peak = float(values.max(initial=0.0))
            full_scale = next((c for c in candidates if peak <= c), peak)
        gray = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("P", "PA"):  # via RGBA so palette transparency is read, not warned about
        image = image.convert("RGBA")
    return image.convert("RGB")



def load_rgb(path: Path) -> Image.Image:
    """Fully decode now (PIL is lazy), so a truncated file fails here and not inside a transform."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


class ImageFolder(Dataset):
    """Every image under ``root`` (any nesting, sorted by relative path); bad files are skipped, not fatal.

    ``labels=None`` returns only the transformed image (self-supervised training);
    ``labels='parent_dir'`` returns (image, class_index) where the class is the file's directory
    relative to ``root`` (``classes`` is the sorted list of them; '.' for files directly in root).

    An unreadable or truncated file makes ``__getitem__`` return the next readable file instead
    (wrapping around), with one warning per bad file; ``bad_paths`` / ``num_skipped`` record them.
    With DataLoader workers each worker holds its own copy of the dataset, so those records (and the
    warnings) live in the workers and the main process's copy does not see them: call ``verify()``
    before building the DataLoader to drop bad files up front and count them in one place.
    """

    LABEL_MODES = (None, "parent_dir")

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        labels: str | None = None,
    ) -> None:
        if labels not in self.LABEL_MODES:
            raise InvalidSettingError(f"labels={labels!r} is not supported; use one of {self.LABEL_MODES}")
        self.root = Path(root)
        self.transform = transform
        self.labels = labels
        self.extensions = tuple(sorted({("." + e.lstrip(".")).lower() for e in extensions}))
        self.paths = self._scan()
        self.bad_paths: list[Path] = []
        self._bad: set[Path] = set()
        if labels == "parent_dir":
            names = [p.parent.relative_to(self.root).as_posix() for p in self.paths]
            self.classes = sorted(set(names))
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
            self.targets = [self.class_to_idx[name] for name in names]

    def _scan(self) -> list[Path]:
        accepted = ", ".join(self.extensions)
        if not self.root.is_dir():
            raise MissingFileError(
                f"image folder {self.root} does not exist or is not a directory; expected images ({accepted}) under it"
            )
        found = [
            Path(dirpath, name)
            for dirpath, _, names in os.walk(self.root, followlinks=True)
            for name in names
            if os.path.splitext(name)[1].lower() in self.extensions
        ]
        if not found:
            raise MissingFileError(
                f"no images under {self.root} (searched recursively for {accepted}); "
                "point root at the image folder or pass extensions=..."
            )
        return sorted(found, key=lambda p: p.relative_to(self.root).as_posix())

    @property
    def num_skipped(self) -> int:
        """Distinct bad files found so far by ``__getitem__`` or ``verify()`` in this process."""
        return len(self.bad_paths)

    def __len__(self) -> int:
        return len(self.paths)

    def _mark_bad(self, path: Path, error: Exception, action: str) -> None:
        self._bad.add(path)
        self.bad_paths.append(path)
        message = f"skipping unreadable image {path} ({type(error).__name__}: {error}); {action}"
        warnings.warn(message, stacklevel=3)

    def _all_bad_error(self) -> RuntimeError:
        return RuntimeError(
            f"none of the {len(self.paths)} image files under {self.root} could be read "
            f"(e.g. {self.bad_paths[0]}); check the files or point root at another folder"
        )

    def __getitem__(self, index: int) -> Any:
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for ImageFolder of {n} images")
        for offset in range(n):
            i = (index + offset) % n
            path = self.paths[i]
            if path in self._bad:
                continue
            try:
                image = load_rgb(path)
            except Exception as error:  # Pillow's decoders raise many types (OSError, SyntaxError, EOFError, ...)
                self._mark_bad(path, error, "using the next readable file; call ImageFolder.verify() to drop bad files")
                continue
            if self.transform is not None:
                image = self.transform(image)
            return (image, self.targets[i]) if self.labels else image
        raise self._all_bad_error()

    def verify(self, progress: bool = False) -> int:
        """Decode every file now (PIL verify + full load); drop the bad ones with a warning; return how many.

        Class indices are kept as assigned at construction, so they stay stable across runs.
        """
        keep: list[int] = []
        for i, path in enumerate(tqdm(self.paths, desc=f"verifying {self.root}", disable=not progress)):
            if path in self._bad:
                continue
            try:
                with Image.open(path) as image:
                    image.verify()
                load_rgb(path)  # verify() leaves the file unusable and misses truncation: decode again
            except Exception as error:  # see __getitem__
                self._mark_bad(path, error, "dropped by verify()")
            else:
                keep.append(i)
        dropped = len(self.paths) - len(keep)
        if not keep:
            raise self._all_bad_error()
        self.paths = [self.paths[i] for i in keep]
        if self.labels:
            self.targets = [self.targets[i] for i in keep]
        logger.info("ImageFolder.verify: %d of %d files under %s dropped", dropped, dropped + len(keep), self.root)
        return dropped
