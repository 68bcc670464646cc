"""artifacts: the versioned artifact store (local directory or S3), manifests, leases, run index.

    from artifacts import open_store, ArtifactRef
    store = open_store()            # $NANORUN_STORE, else the local root $NANORUN_HOME
    ref = store.resolve("tokenizer@latest")
    path = store.materialize(ref)   # local, verified copy of the files
"""
from artifacts.errors import (AmbiguousRefError, ChecksumError, LeaseLostError, NotCommittedError, StoreCredentialsError,
                              StoreError, StoreUnreachableError, UnknownRefError)
from artifacts.manifest import ArtifactRef, CorruptManifestError, FileEntry, Manifest, canonical_json, fingerprint
from artifacts.redact import install_log_redaction, redact, redact_value
from artifacts.store import GcReport, Store, VerifyResult, nanorun_home, open_store

install_log_redaction()  # every process that touches a store logs no credentials (artifacts/redact.py)

__all__ = [
    "open_store", "Store", "VerifyResult", "GcReport", "nanorun_home",
    "ArtifactRef", "Manifest", "FileEntry", "fingerprint", "canonical_json",
    "StoreError", "UnknownRefError", "AmbiguousRefError", "StoreUnreachableError", "StoreCredentialsError",
    "NotCommittedError", "ChecksumError", "LeaseLostError", "CorruptManifestError", "redact", "redact_value",
]
