"""The weights manifest: the one list of published ADCLR weights.

`weights_manifest/weights.toml` (shipped inside the wheel as `adclr.weights_manifest`) holds one top-level table per
`"arch.tag"`. A file named by `ADCLR_WEIGHTS_MANIFEST` is merged over it, so a team can list its own weights or mirrors
without forking the package. Everything here is validated up front: a bad entry fails at import with its name and field.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .errors import ManifestError

MANIFEST_ENV = "ADCLR_WEIGHTS_MANIFEST"

_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NAME = re.compile(r"^[a-z0-9_]+\.[A-Za-z0-9_-]+$")
_REQUIRED = {"sha256": str, "size_bytes": int, "license": str}
_HUB_SOURCE = {"hf_hub_id": str, "revision": str, "filename": str}
_EMBEDDED_SOURCE = {"file": str}
_OPTIONAL = {"description": str, "source": str, "metrics": dict, **_HUB_SOURCE, **_EMBEDDED_SOURCE}


@dataclass(frozen=True)
class WeightsEntry:
    """One published weights file, pinned to a Hub commit and a content hash."""

    name: str
    sha256: str
    size_bytes: int
    license: str
    hf_hub_id: str = ""
    revision: str = ""
    filename: str = ""
    file: str = ""            # a file shipped inside the adclr package (path relative to it) instead of a Hub repo
    description: str = ""
    source: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)

    @property
    def embedded(self) -> bool:
        return bool(self.file)

    @property
    def arch(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def tag(self) -> str:
        return self.name.split(".", 1)[1]


def parse_manifest(text: str, origin: str) -> dict[str, WeightsEntry]:
    """Parse and validate manifest TOML text; `origin` names the file in error messages."""
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{origin}: not valid TOML ({e}). Fix the syntax of the weights manifest.") from None
    entries = {}
    for name, table in tables.items():
        where = f"{origin}: entry [{name!r}]"
        if not _NAME.match(name):
            raise ManifestError(f"{where}: the table name must be 'arch.tag' (e.g. 'adclr_vit_small.in1k').")
        if not isinstance(table, dict):
            raise ManifestError(f"{where}: must be a table of fields, got {type(table).__name__}.")
        unknown = sorted(set(table) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise ManifestError(f"{where}: unknown field(s) {unknown}; allowed: {sorted({**_REQUIRED, **_OPTIONAL})}.")
        for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
            if key not in table:
                if key in _REQUIRED:
                    raise ManifestError(f"{where}: missing required field '{key}'.")
                continue
            if not isinstance(table[key], kind) or isinstance(table[key], bool):
                raise ManifestError(f"{where}: field '{key}' must be {kind.__name__}, got {table[key]!r}.")
        hub = [k for k in _HUB_SOURCE if k in table]
        if "file" in table and hub:
            raise ManifestError(f"{where}: give either 'file' (embedded in the package) or {sorted(_HUB_SOURCE)} "
                                "(a Hub repo), not both.")
        if "file" not in table and len(hub) != len(_HUB_SOURCE):
            missing = sorted(set(_HUB_SOURCE) - set(hub))
            raise ManifestError(f"{where}: missing required field(s) {missing} (or 'file' for weights embedded in the "
                                "package).")
        for key, pattern, what in (
            ("revision", _HEX40, "a full 40-hex commit id (pin the revision, never a branch)"),
            ("sha256", _HEX64, "64 lower-case hex digits"),
            ("hf_hub_id", _REPO_ID, "'ORG/NAME'"),
        ):
            if key in table and not pattern.match(table[key]):
                raise ManifestError(f"{where}: field '{key}' must be {what}, got {table[key]!r}.")
        if table["size_bytes"] <= 0:
            raise ManifestError(f"{where}: field 'size_bytes' must be positive, got {table['size_bytes']}.")
        entries[name] = WeightsEntry(name=name, **table)
    return entries


def packaged_manifest_text() -> str:
    return resources.files("adclr.weights_manifest").joinpath("weights.toml").read_text(encoding="utf-8")


def load_manifest() -> dict[str, WeightsEntry]:
    """The packaged manifest with the file named by $ADCLR_WEIGHTS_MANIFEST merged over it (same name wins)."""
    entries = parse_manifest(packaged_manifest_text(), "adclr/weights_manifest/weights.toml")
    override = os.environ.get(MANIFEST_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise ManifestError(f"{MANIFEST_ENV}={override!r} does not name a readable file. Point it at a TOML "
                                "weights manifest or unset it.")
        entries.update(parse_manifest(path.read_text(encoding="utf-8"), str(path)))
    return entries
