"""Errors a user can fix, with one common base, so the ``adclr`` command prints one line for all of them.

Each class also inherits the builtin a caller would catch without knowing adclr (``except ValueError`` keeps working),
as huggingface_hub's errors do. The message names the problem and the fix. Anything else is a bug and keeps its
traceback; ``ADCLR_DEBUG=1`` shows the traceback for these too.
"""
from __future__ import annotations


class ADCLRError(Exception):
    """Base of the errors the ``adclr`` command reports in one line."""


class InvalidSettingError(ADCLRError, ValueError):
    """An argument, flag or config value is out of range or unknown (a model name, a batch size, a data source)."""


class MissingFileError(ADCLRError, FileNotFoundError):
    """A file or folder the user named is not there."""


class UnsupportedModelError(ADCLRError, TypeError):
    """The model is not the kind of network the operation needs (a timm ViT with the standard layers)."""


class CheckpointError(ADCLRError, RuntimeError):
    """A checkpoint file is unreadable (truncated, corrupt) or not in the expected layout."""


class ManifestError(ADCLRError, ValueError):
    """A weights manifest entry is malformed; the message names the file, the entry and the field."""


class ChecksumMismatchError(ADCLRError, RuntimeError):
    """A downloaded weights file does not have the sha256 the manifest pins."""


class WeightsUnavailableError(ADCLRError, RuntimeError):
    """Weights cannot be had: not cached and the Hub is offline, unreachable, or lacks the file."""


class NonFiniteLossError(ADCLRError, RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""
