"""artifacts: the versioned artifact store (local directory or S3), manifests, leases, run index.

    from artifacts import open_store, ArtifactRef
    store = open_store()            # $NANORUN_STORE, else the local root $NANORUN_HOME
    ref = store.resolve("tokenizer@latest")
    path = store.materialize(ref)   # local, verified copy of the files

Imports point one way: artifacts/store.py at the bottom, verified/index/staging on it, the backends
(local, s3) on those, and this file on top, plugging the backends, the run index and the staging
area's gc into the store (which imports none of them).
"""
from pathlib import Path

from artifacts.errors import (AmbiguousRefError, ChecksumError, LeaseLostError, NotCommittedError, StoreCredentialsError,
                              StoreError, StoreUnreachableError, UnknownRefError)
from artifacts.index import RunIndex
from artifacts.local import LocalStore
from artifacts.manifest import ArtifactRef, CorruptManifestError, FileEntry, Manifest, canonical_json, fingerprint
from artifacts.redact import install_log_redaction, redact, redact_value
from artifacts.staging import gc_items as staging_gc_items
from artifacts.store import (GcReport, Store, VerifyResult, nanorun_home, open_store, register_backend,
                             register_gc_source, register_run_index)

install_log_redaction()  # every process that touches a store logs no credentials (artifacts/redact.py)


def _open_s3(url: str, index: bool) -> Store:
    from artifacts.s3 import S3Store  # on first use: a process with local stores only never loads it

    return S3Store(url, index=index)


register_backend("file", lambda path, index: LocalStore(Path(path), index=index))
register_backend("s3", _open_s3)
register_run_index(RunIndex)
register_gc_source("staging", staging_gc_items)

__all__ = [
    "open_store", "Store", "VerifyResult", "GcReport", "nanorun_home",
    "ArtifactRef", "Manifest", "FileEntry", "fingerprint", "canonical_json",
    "StoreError", "UnknownRefError", "AmbiguousRefError", "StoreUnreachableError", "StoreCredentialsError",
    "NotCommittedError", "ChecksumError", "LeaseLostError", "CorruptManifestError", "redact", "redact_value",
]
