"""Errors the store raises for conditions a user can fix. Each message is one line that says what
was wrong and what to do; the CLI prints it and exits 2 (no traceback)."""
from __future__ import annotations

from artifacts.manifest import CorruptManifestError


class StoreError(Exception):
    """Base class: a store problem with a one-line, actionable message."""


class UnknownRefError(StoreError, LookupError):
    """No committed artifact matches the reference."""


class AmbiguousRefError(StoreError):
    """A fingerprint prefix matches several artifacts (the message lists them)."""


class StoreUnreachableError(StoreError):
    """The storage endpoint cannot be reached (the message names it)."""


class StoreCredentialsError(StoreError):
    """Missing or rejected credentials."""


class NotCommittedError(StoreError):
    """The operation needs a committed artifact and there is none at that ref."""


class ChecksumError(StoreError):
    """Bytes on disk or on the wire do not match the manifest."""


class LeaseLostError(StoreError):
    """Another builder took over our lease (we looked dead): our result must not be committed."""


# The errors a CLI reports as one line + exit 2.
USER_ERRORS = (StoreError, CorruptManifestError)
