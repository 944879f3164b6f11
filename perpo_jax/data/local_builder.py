"""Base class for this package's TFDS builders (they generate or read local files only).

Importing this module also quiets what TFDS says about such builders and nothing else: its
"Downloading and preparing dataset Unknown size ..." / "... Subsequent calls will reuse this
data." lines (meaningless without downloads; `prepare_data` says itself whether it built or
reused a dataset, and why), absl's "Using custom data configuration" warning (every config
here is custom by design) and the OpenCV notice (PIL decodes these images). TFDS's progress
bars and every other warning stay.
"""
from __future__ import annotations

import logging

import tensorflow_datasets as tfds

_QUIETED = ("Using custom data configuration", "OpenCV is not installed")


class _QuietTfdsNotices(logging.Filter):
    """Drops absl log records whose message starts with one of `_QUIETED`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_QUIETED)


def _quiet_tfds_notices() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _QuietTfdsNotices) for f in absl_logger.filters):
        absl_logger.addFilter(_QuietTfdsNotices())


_quiet_tfds_notices()


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder that downloads nothing.

    TFDS looks for a download-checksums file next to a builder's source through
    `importlib_resources` (a backport that is not a dependency here and not needed on
    Python >= 3.9); these builders have no URLs, so there is no code path to search.
    """

    code_path = None

    def _log_download_bytes(self) -> None:
        """TFDS prints download/generated sizes here ("Unknown size" for local builders)."""

    def _log_download_done(self) -> None:
        """TFDS prints "downloaded and prepared ... Subsequent calls will reuse" here."""
