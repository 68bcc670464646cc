"""Trust on first use for data named by URL alone: the first fetch records the file's sha256 on the
store, every later fetch (on any machine using the store) must match it.

    pins = SourcePins(store)            # pipeline/execute.py binds one per build (stages.base.pin_sources_to)
    pins.check(url, sha256, size)       # stagekit/fetch.py, after each download: records or enforces
    pins.seen                           # {redacted url: {"sha256", "pin"}}: goes into the manifest

Why: a fingerprint hashes a URL source (the GPU presets' Hugging Face `resolve/main` files) by its
URL, so a file changed upstream would have been fetched into a new build under the old fingerprint.
Now that build fails, naming the URL, both digests and when the first was recorded. A config that
gives the sha256 itself (a `sha256` field) pins the content without the store's record.

Records live at `{root}/.sources/{sha256(redacted url)[:16]}.json` (the URL redacted: credentials
never reach the store). Deleting one accepts the new content on the next fetch.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import socket

from artifacts.errors import StoreError
from artifacts.redact import redact

log = logging.getLogger("nanorun.sources")

PINS = ".sources"


class SourceChangedError(StoreError):
    """A URL's content differs from what it held when first fetched into this store."""


class SourcePins:
    def __init__(self, store):
        self.store = store
        self.seen: dict[str, dict] = {}

    def key(self, url: str) -> str:
        return f"{PINS}/{hashlib.sha256(redact(url).encode()).hexdigest()[:16]}.json"

    def check(self, url: str, sha256: str, size: int, *, pinned_by_config: bool = False) -> None:
        """Record the digest of `url`'s first fetch, or raise SourceChangedError if it differs from the
        recorded one. pinned_by_config: the caller already checked a sha256 the config gives."""
        clean, key = redact(url), self.key(url)
        if pinned_by_config:
            self.seen[clean] = {"sha256": sha256, "pin": "config"}
            return
        raw = self.store._read(key)
        if raw is None:
            record = {"url": clean, "sha256": sha256, "size": size, "host": socket.gethostname(),
                      "first_fetched": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            self.store._write(key, json.dumps(record, sort_keys=True).encode())
            log.info("%s: first fetch into this store, sha256 %s recorded (%s): later fetches must match",
                     clean, sha256[:16], key)
            self.seen[clean] = {"sha256": sha256, "pin": "recorded now"}
            return
        try:
            record = json.loads(raw)
            want = record["sha256"]
        except (ValueError, KeyError, TypeError):
            raise SourceChangedError(f"{self.store.url}/{key}: unreadable source record; delete it to record "
                                     f"{clean} again") from None
        if want != sha256:
            raise SourceChangedError(
                f"{clean} changed upstream: sha256 {sha256[:16]}… ({size} bytes) now, {want[:16]}… "
                f"({record.get('size', '?')} bytes) when first fetched on {record.get('first_fetched', '?')}; "
                f"artifacts built from it are unchanged. To build from the new content, delete "
                f"{self.store.url}/{key} or give the new sha256 in the config")
        self.seen[clean] = {"sha256": sha256, "pin": f"matches the record of {record.get('first_fetched', '?')}"}
