"""Verified downloads from the Hub or the package: sha256 against the manifest, cache bookkeeping, clear errors.

huggingface_hub owns caching, revisions and offline mode. What it lacks, we add: the file's sha256 is checked against
the manifest before anything is loaded (a same-size corrupt blob would otherwise stay cached for good), and a failed
download ends in one error that says which model, which repo and the ways out.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from importlib import resources
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, \
    RepositoryNotFoundError, RevisionNotFoundError

from .errors import ChecksumMismatchError, InvalidSettingError, WeightsUnavailableError
from .manifest import WeightsEntry

_logger = logging.getLogger(__name__)
HUB_TIMEOUT_ENV = "ADCLR_HUB_TIMEOUT"


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class _VerifiedBlobs:
    """Remembers which cache blobs were hashed, keyed by real path, size and mtime, so a cached file is hashed once.

    Any rewrite of a blob changes its mtime, so a corrupted blob is hashed again and caught.
    """

    def __init__(self, path: Path):
        self.path = path

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _key(blob: Path) -> tuple[str, list]:
        stat = blob.stat()
        return str(blob), [stat.st_size, stat.st_mtime_ns]

    def known_hash(self, blob: Path) -> str | None:
        key, stamp = self._key(blob)
        record = self._read().get(key)
        return record["sha256"] if record and record["stamp"] == stamp else None

    def remember(self, blob: Path, sha256: str) -> None:
        records = self._read()
        key, stamp = self._key(blob)
        records[key] = {"stamp": stamp, "sha256": sha256}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as f:
            json.dump(records, f)
        os.replace(f.name, self.path)


def _verified_blobs() -> _VerifiedBlobs:
    return _VerifiedBlobs(Path(hf_constants.HF_HOME) / "adclr" / "verified_blobs.json")


def _unavailable(entry: WeightsEntry, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"weights for {entry.name} ({entry.hf_hub_id}@{entry.revision[:12]}, {entry.filename}) {reason}. Ways out: "
        f"download them once while online (`hf download {entry.hf_hub_id} {entry.filename} --revision "
        f"{entry.revision}`, or point HF_ENDPOINT at a reachable mirror), or load a local copy with "
        f"timm.create_model('{entry.arch}', pretrained=True, pretrained_cfg_overlay=dict(file=PATH)).")


def hub_timeout() -> float:
    """Seconds to wait for the Hub's first answer ($ADCLR_HUB_TIMEOUT, default 3)."""
    text = os.environ.get(HUB_TIMEOUT_ENV, "3")
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise InvalidSettingError(f"{HUB_TIMEOUT_ENV}={text!r} is not a positive number of seconds; unset it or give "
                                  "e.g. 10.")
    return seconds


def _check_reachable(entry: WeightsEntry) -> None:
    """One metadata request without retries, bounded by hub_timeout(): huggingface_hub retries an unreachable Hub
    with back-off for about 23 s before it gives up, so this decides first."""
    url = huggingface_hub.hf_hub_url(entry.hf_hub_id, entry.filename, revision=entry.revision)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=hub_timeout())
    except HfHubHTTPError:
        return  # the Hub answered; hf_hub_download reports what it said
    except Exception as e:  # transport errors, whose classes depend on the huggingface_hub version (requests/httpx)
        raise _unavailable(entry, f"are not in the local cache and the Hub at {hf_constants.ENDPOINT} is unreachable "
                                  f"({type(e).__name__}: {e}; wait set by {HUB_TIMEOUT_ENV})") from None


def _download(entry: WeightsEntry) -> Path:
    """The cached copy, else a download; offline or unreachable ends in WeightsUnavailableError, never in a retry."""
    cached = cached_path(entry)
    if cached is not None:
        return cached
    if hf_constants.HF_HUB_OFFLINE:
        raise _unavailable(entry, "are not in the local cache (or the cached copy was bad) and HF_HUB_OFFLINE=1")
    _check_reachable(entry)
    try:
        path = huggingface_hub.hf_hub_download(entry.hf_hub_id, entry.filename, revision=entry.revision)
    except LocalEntryNotFoundError:
        raise _unavailable(entry, f"are not in the local cache and the Hub at {hf_constants.ENDPOINT} is unreachable"
                           ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise _unavailable(entry, f"are not on the Hub at {hf_constants.ENDPOINT} ({type(e).__name__}); the "
                                  "manifest entry may be wrong") from None
    return Path(path)


def _hash_blob(snapshot_file: Path) -> str:
    blob = snapshot_file.resolve()
    known = _verified_blobs().known_hash(blob)
    if known is not None:
        return known
    actual = sha256_file(blob)
    _verified_blobs().remember(blob, actual)
    return actual


def _discard(snapshot_file: Path) -> None:
    """Remove a bad cached copy: the blob and the snapshot link that points at it."""
    blob = snapshot_file.resolve()
    for p in {blob, snapshot_file}:
        if p.exists() or p.is_symlink():
            p.unlink()


def download_verified(entry: WeightsEntry) -> Path:
    """Fetch (or reuse from cache) the entry's file and return its path once its sha256 matches the manifest.

    A mismatching copy is discarded and downloaded once more; a second mismatch raises ChecksumMismatchError.
    """
    path = _download(entry)
    for attempt in (1, 2):
        actual = _hash_blob(path)
        if actual == entry.sha256:
            return path
        _logger.warning("%s: sha256 of %s is %s, manifest says %s; discarding the cached copy (attempt %d)",
                        entry.name, path, actual, entry.sha256, attempt)
        _discard(path)
        if attempt == 1:
            path = _download(entry)  # the bad copy is gone, so this downloads (no force_download: offline refuses it)
    raise ChecksumMismatchError(
        f"{entry.filename} of {entry.hf_hub_id}@{entry.revision} for {entry.name} has sha256 {actual}, but the "
        f"manifest expects {entry.sha256} (checked twice, bad copies discarded). Either the repo changed under a "
        "pinned revision or the manifest entry is wrong: fix the entry or the upload.")


def embedded_path(entry: WeightsEntry) -> Path:
    """Where an embedded entry's file lies inside the installed package."""
    return Path(str(resources.files("adclr").joinpath(entry.file)))


def fetch_verified(entry: WeightsEntry) -> Path:
    """The entry's file, checked against the manifest's sha256: embedded in the package, or from the Hub."""
    if not entry.embedded:
        return download_verified(entry)
    path = embedded_path(entry)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights for {entry.name} should ship inside adclr at {path}, but the file is "
                                      "missing; reinstall adclr (pip install --force-reinstall adclr).")
    actual = _hash_blob(path)
    if actual != entry.sha256:
        raise ChecksumMismatchError(f"the embedded weights file {path} for {entry.name} has sha256 {actual}, but the "
                                    f"manifest expects {entry.sha256}: the installed copy is damaged or was edited; "
                                    "reinstall adclr.")
    return path


def cached_path(entry: WeightsEntry) -> Path | None:
    """The entry's file if it is on this machine (embedded, or in the Hub cache), else None; nothing is fetched."""
    if entry.embedded:
        path = embedded_path(entry)
        return path if path.is_file() else None
    path = huggingface_hub.try_to_load_from_cache(entry.hf_hub_id, entry.filename, revision=entry.revision)
    return Path(path) if isinstance(path, str) else None
