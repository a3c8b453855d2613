"""Publish exported folders to the Hub and verify what the weights manifest promises.

`publish` checks a folder the way a user will load it (plain timm, `local-dir:`), hashes it, optionally uploads it,
and renders the `weights_manifest/weights.toml` entry, validated by the manifest's own parser. `verify` re-checks every
manifest entry against the Hub with the same verified download that `pretrained=True` uses.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import huggingface_hub
import timm
import torch

from .errors import InvalidSettingError
from .export import ADCLR_ARCH_KEY, WEIGHTS_NAME
from .manifest import load_manifest, parse_manifest
from .models import TIMM_EQUIVALENT
from .weights import ChecksumMismatchError, WeightsUnavailableError, fetch_verified, sha256_file

FOLDER_FILES = (WEIGHTS_NAME, "config.json", "README.md")
#: Stands in for the commit id in an entry printed before the push; replace it with the pushed commit.
REVISION_PLACEHOLDER = "FILL_IN_THE_40_HEX_COMMIT_ID_AFTER_PUSHING"
_STAND_IN_REVISION = "0" * 40


def validate_folder(folder: str | Path) -> dict[str, Any]:
    """Load the folder with plain timm as users will, and return its weights' sha256, size, architecture, license."""
    folder = Path(folder)
    absent = [name for name in FOLDER_FILES if not (folder / name).is_file()]
    if absent:
        raise InvalidSettingError(f"{folder} lacks {', '.join(absent)}; write the folder with `adclr convert` or "
                                  "adclr.export.export_model first.")
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except Exception as e:  # any failure here is what a user of the published repo would hit
        raise InvalidSettingError(f"{folder} does not load with timm.create_model('local-dir:{folder}', "
                                  f"pretrained=True): {type(e).__name__}: {e}. Re-export the folder.") from e
    broken = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise InvalidSettingError(f"{folder}: non-finite values in {', '.join(broken)}; the source checkpoint "
                                  "is damaged.")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    license = config.get("pretrained_cfg", {}).get("license")
    if not license:
        raise InvalidSettingError(f"{folder}/config.json states no license (pretrained_cfg.license); re-export "
                                  "the folder with adclr.export.export_model(..., license=...) so the card and the "
                                  "manifest can name it.")
    weights = folder / WEIGHTS_NAME
    return {"sha256": sha256_file(weights), "size_bytes": weights.stat().st_size,
            "architecture": config["architecture"], "adclr_architecture": config.get(ADCLR_ARCH_KEY, ""),
            "license": license}


def default_entry_name(architecture: str, repo_id: str) -> str:
    """`arch.tag` for a folder exported from ADCLR arch `architecture` (config.json's adclr_architecture), tagged by
    the repo name. The built-in timm name cannot tell: adclr_vit_tiny and adclr_vit_mini_patch8 share one."""
    if architecture not in TIMM_EQUIVALENT:
        raise InvalidSettingError(f"the folder's architecture {architecture or '(not recorded)'} is not one of the "
                                  f"ADCLR archs ({', '.join(TIMM_EQUIVALENT)}); name the entry yourself with "
                                  "name='arch.tag' (--name).")
    return f"{architecture}.{re.sub(r'[^A-Za-z0-9_-]', '_', repo_id.split('/')[-1])}"


def _toml_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def render_entry(name: str, fields: Mapping[str, Any]) -> str:
    return "\n".join([f'["{name}"]', *(f"{k} = {_toml_value(v)}" for k, v in fields.items())]) + "\n"


def publish(folder: str | Path, repo_id: str, *, name: str | None = None, revision: str | None = None,
            push: bool = False, token: str | None = None, description: str = "", source: str = "",
            metrics: Mapping[str, Any] | None = None) -> str:
    """Validate `folder`, upload it when `push`, and return its manifest entry (TOML text).

    The entry pins the pushed commit after a push, else `revision`; without either it holds REVISION_PLACEHOLDER
    with a comment saying what to fill in. The token comes from the usual places (HF_TOKEN, `hf auth login`)
    unless given.
    """
    if push and revision:
        raise InvalidSettingError("revision names an existing commit; with push the entry pins the commit the push "
                                  "creates. Pass one or the other.")
    info = validate_folder(folder)
    name = name or default_entry_name(info["adclr_architecture"], repo_id)
    if name.split(".")[0] not in TIMM_EQUIVALENT:
        raise InvalidSettingError(f"entry name {name!r} must start with an ADCLR arch ({', '.join(TIMM_EQUIVALENT)}): "
                                  "adclr registers pretrained weights only for those; use name='arch.tag' (--name).")
    fields: dict[str, Any] = {"hf_hub_id": repo_id, "revision": revision or _STAND_IN_REVISION,
                              "filename": WEIGHTS_NAME, "sha256": info["sha256"], "size_bytes": info["size_bytes"],
                              "license": info["license"]}
    fields.update({k: v for k, v in (("description", description), ("source", source)) if v})
    if metrics:
        fields["metrics"] = dict(metrics)
    parse_manifest(render_entry(name, fields), f"entry for {folder}")  # every field valid before anything is pushed
    if push:
        huggingface_hub.create_repo(repo_id, token=token, exist_ok=True)
        commit = huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                                               commit_message=f"Add {name} weights")
        fields["revision"] = commit.oid
    text = render_entry(name, fields)
    if not (push or revision):
        text = text.replace(f'revision = "{_STAND_IN_REVISION}"', f'revision = "{REVISION_PLACEHOLDER}"  # fill in '
                            f"the 40-hex commit id of {repo_id} after pushing (never a branch name)")
    return text


@dataclass(frozen=True)
class Check:
    """One manifest entry's verification: status is 'ok', 'mismatch' or 'missing'."""

    name: str
    status: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def verify(names: Sequence[str] | None = None) -> list[Check]:
    """Download (or reuse the cached copy of) every manifest entry, or the named ones, and check its sha256."""
    manifest = load_manifest()
    unknown = sorted(set(names or ()) - manifest.keys())
    if unknown:
        raise InvalidSettingError(f"not in the weights manifest: {', '.join(unknown)}; known entries: "
                                  f"{', '.join(manifest) or 'none'}.")
    checks = []
    for name in names or list(manifest):
        entry = manifest[name]
        try:
            checks.append(Check(name, "ok", f"{entry.file or entry.hf_hub_id + '@' + entry.revision[:12]} -> "
                                            f"{fetch_verified(entry)}"))
        except ChecksumMismatchError as e:
            checks.append(Check(name, "mismatch", str(e)))
        except WeightsUnavailableError as e:
            checks.append(Check(name, "missing", str(e)))
    return checks
