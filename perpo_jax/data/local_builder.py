"""Base class for this package's TFDS builders (they generate or read local files only)."""
from __future__ import annotations

import tensorflow_datasets as tfds


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A GeneratorBasedBuilder that downloads nothing.

    TFDS looks for a download-checksums file next to a builder's source through
    `importlib_resources` (a backport that is not a dependency here and not needed on
    Python >= 3.9); these builders have no URLs, so there is no code path to search.
    """

    code_path = None
