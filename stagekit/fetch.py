"""Resumable downloads over HTTP(S) and S3, with retries, verification and atomic placement.

    from stagekit.fetch import fetch, fetch_many, FetchError
    r = fetch("https://host/shard_00000.parquet", out / "shard_00000.parquet", validate=check_parquet)
    rs = fetch_many([(url, dest), ...], workers=4, validate=check_parquet)   # parallel

How one file arrives (`dest`):
- an existing `dest` is trusted (it only ever appears by an atomic rename of a verified file) once
  it passes `sha256` / `validate` when those are given; otherwise it is deleted and fetched again.
- bytes stream into `dest + ".partial"`; after a dropped connection or a timeout the next attempt
  continues it with an HTTP `Range: bytes=N-` (S3: the same Range on GetObject). A server that
  ignores the range (200 instead of 206) restarts it from zero.
- complete: the sha256 is computed; it must equal `sha256` if given, or the `X-Linked-ETag` that
  Hugging Face sends for LFS files (the file's sha256); then `validate(path)` runs; then the rename.
  A file failing either is deleted (its bytes are not trusted) and downloaded again.
- transient failures (connection errors, timeouts, 408/429/5xx) are retried with exponential
  backoff (backoff·2^k seconds, capped at 60); 4xx like 404/403 fail at once. After `retries`
  attempts FetchError names the file, the URL and the last reason.
S3 URLs (`s3://bucket/key`) use boto3 with the endpoint from $NANORUN_S3_ENDPOINT_URL, else
$AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL (as the store does), else AWS.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from artifacts.files import file_sha256
from artifacts.redact import redact
from stages.base import source_pins

log = logging.getLogger("nanorun.fetch")

PARTIAL_SUFFIX = ".partial"
CHUNK = 1 << 20
MAX_BACKOFF = 60.0
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_SHA_RE = re.compile(r'^"?([0-9a-f]{64})"?$')

ProgressFn = Callable[[int, int | None], None]  # (bytes done, total bytes or None)


class FetchError(RuntimeError):
    """A download failed for good; the message names the file, the URL and why. `transient` says
    whether trying again later may help (the retries ran out on connection errors or 5xx), as
    opposed to a permanent answer (404/403, a host name that does not resolve: offline or a typo)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(redact(message))  # the URL without its credentials: error text reaches logs
        self.transient = transient


class _Transient(Exception):
    """Worth another attempt (the partial file is kept)."""


class _Corrupt(Exception):
    """The complete file is wrong (checksum or validation): delete it, then another attempt."""


class _Fatal(Exception):
    """No point retrying (404, 403, bad URL)."""


@dataclass
class Fetched:
    url: str
    path: Path
    size: int
    sha256: str
    skipped: bool = False      # already present and valid: nothing downloaded
    resumed_from: int = 0      # bytes of a partial file continued by a Range request
    downloaded: int = 0        # bytes that came over the wire in the end
    attempts: int = 0
    seconds: float = 0.0


def s3_endpoint() -> str | None:
    return (os.environ.get("NANORUN_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def s3_client():
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client("s3", endpoint_url=s3_endpoint(),
                        config=BotoConfig(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=20,
                                          read_timeout=60))


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise FetchError(f"bad S3 URL {url!r}: expected s3://bucket/key")
    return bucket, key


def list_s3(url: str, client=None) -> list[dict]:
    """Objects under s3://bucket/prefix: [{key, size, etag}] sorted by key."""
    client = client or s3_client()
    bucket, prefix = split_s3(url)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out.append({"key": o["Key"], "size": o["Size"], "etag": o.get("ETag", "").strip('"')})
    return sorted(out, key=lambda o: o["key"])


def _unresolvable(e: BaseException) -> bool:
    """A DNS failure anywhere in the exception chain: no retry makes a name resolve on an offline
    machine, so it fails at once instead of backing off for minutes."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, socket.gaierror):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


# ---- one attempt per transport -------------------------------------------------------------------
def _http_attempt(url: str, part: Path, timeout: float, on_bytes: Callable[[int, int | None], None]) -> str | None:
    """Continue `part` from its current size; returns the server's sha256 claim (HF X-Linked-ETag)."""
    import httpx

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(timeout), follow_redirects=True) as r:
            claim = None
            for resp in [*r.history, r]:
                m = _SHA_RE.match(resp.headers.get("x-linked-etag", ""))
                claim = claim or (m and m.group(1))
            if r.status_code == 416 and have:
                part.unlink()  # our partial is longer than the file: it was something else
                raise _Transient(f"HTTP 416 for a resume from byte {have}: restarting from zero")
            if r.status_code in (401, 403, 404, 410) or (400 <= r.status_code < 500 and r.status_code not in _RETRY_STATUS):
                raise _Fatal(f"HTTP {r.status_code} {r.reason_phrase} for {url}"
                             + (": no such file (check the source URL / shard index)" if r.status_code in (404, 410) else ""))
            if r.status_code >= 400:
                raise _Transient(f"HTTP {r.status_code} {r.reason_phrase}")
            start = 0
            if r.status_code == 206:
                m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", r.headers.get("content-range", ""))
                if not m or int(m.group(1)) != have:
                    raise _Transient(f"bad Content-Range {r.headers.get('content-range')!r} for a resume from {have}")
                start = have
                total = int(m.group(3)) if m.group(3) != "*" else None
            else:
                n = r.headers.get("content-length")
                total = int(n) if n is not None else None
            mode = "ab" if start else "wb"
            done = start
            with open(part, mode) as f:
                for chunk in r.iter_bytes():  # as it arrives: a dropped connection keeps all but the last read
                    f.write(chunk)
                    done += len(chunk)
                    on_bytes(done, total)
                f.flush()
                os.fsync(f.fileno())
            if total is not None and done != total:
                raise _Transient(f"connection ended at byte {done} of {total}")
            return claim
    except httpx.TransportError as e:  # connect errors, timeouts, dropped connections
        if _unresolvable(e):
            raise _Fatal(f"cannot resolve the host of {url} ({e}): offline, or a wrong URL") from e
        raise _Transient(f"{type(e).__name__}: {e}") from e


def _s3_attempt(url: str, part: Path, timeout: float, on_bytes, client) -> str | None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(url)
    have = part.stat().st_size if part.exists() else 0
    try:
        kw = {"Range": f"bytes={have}-"} if have else {}
        try:
            resp = client.get_object(Bucket=bucket, Key=key, **kw)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("InvalidRange", "416") and have:
                part.unlink()
                raise _Transient("S3 InvalidRange for a resume: restarting from zero") from e
            if code in ("NoSuchKey", "404", "NoSuchBucket", "NotFound"):
                raise _Fatal(f"S3 {code} for {url}: no such object (check the bucket, prefix and shard index)") from e
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise _Fatal(f"S3 {code} for {url}: check the credentials") from e
            raise _Transient(f"S3 {code or e}") from e
        total = have + resp["ContentLength"]
        done = have
        body = resp["Body"]
        with open(part, "ab" if have else "wb") as f:
            while chunk := body.read(CHUNK):
                f.write(chunk)
                done += len(chunk)
                on_bytes(done, total)
            f.flush()
            os.fsync(f.fileno())
        if done != total:
            raise _Transient(f"stream ended at byte {done} of {total}")
        return None
    except BotoCoreError as e:
        raise _Transient(f"{type(e).__name__}: {e}") from e


# ---- public --------------------------------------------------------------------------------------
def fetch(url: str, dest, *, sha256: str | None = None, validate: Callable[[Path], None] | None = None,
          retries: int = 5, timeout: float = 60.0, backoff: float = 1.0, on_progress: ProgressFn | None = None,
          s3=None, pins=None) -> Fetched:
    """Download url to dest (see the module docstring). `validate(path)` raises if the file is bad.
    pins (default: the ones execute() bound, stages.base.source_pins): the store's first-fetch record
    of the URL's sha256, which the file must match (artifacts/source_pins.py)."""
    pins = pins if pins is not None else source_pins()
    r = _fetch(url, dest, sha256, validate, retries, timeout, backoff, on_progress, s3)
    if pins is not None:
        pins.check(url, r.sha256, r.size, pinned_by_config=bool(sha256))
    return r


def _fetch(url, dest, sha256, validate, retries, timeout, backoff, on_progress, s3) -> Fetched:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PARTIAL_SUFFIX)
    t0 = time.perf_counter()
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")

    def check(path: Path, claim: str | None) -> str:
        digest = file_sha256(path)
        want = sha256 or claim
        if want and digest != want:
            raise _Corrupt(f"sha256 {digest[:16]}… does not match the expected {want[:16]}…")
        if validate is not None:
            try:
                validate(path)
            except Exception as e:
                raise _Corrupt(f"{type(e).__name__}: {e}") from e
        return digest

    if dest.exists():
        try:
            digest = check(dest, None)
            log.info("%s: already present and valid, not fetched again", dest.name)
            return Fetched(url, dest, dest.stat().st_size, digest, skipped=True, seconds=time.perf_counter() - t0)
        except _Corrupt as e:
            log.warning("%s: present but invalid (%s): fetching it again", dest.name, e)
            dest.unlink()

    is_s3 = url.startswith("s3://")
    if not (is_s3 or url.startswith(("http://", "https://"))):
        raise FetchError(f"{dest.name}: cannot fetch {url!r}: expected an http(s):// or s3:// URL")
    client = (s3 or s3_client()) if is_s3 else None
    resumed_from = part.stat().st_size if part.exists() else 0
    first_have = resumed_from
    reason = ""
    for attempt in range(1, retries + 1):
        have = part.stat().st_size if part.exists() else 0
        if have:
            log.info("%s: resuming at byte %d (attempt %d/%d)", dest.name, have, attempt, retries)
        try:
            progress_fn = on_progress or (lambda done, total: None)
            claim = (_s3_attempt(url, part, timeout, progress_fn, client) if is_s3
                     else _http_attempt(url, part, timeout, progress_fn))
            digest = check(part, claim)
            os.replace(part, dest)
            size = dest.stat().st_size
            return Fetched(url, dest, size, digest, resumed_from=resumed_from, downloaded=size - first_have,
                           attempts=attempt, seconds=time.perf_counter() - t0)
        except _Fatal as e:
            part.unlink(missing_ok=True)
            raise FetchError(f"{dest.name}: {e}") from None
        except _Corrupt as e:
            part.unlink(missing_ok=True)
            first_have = 0
            reason = f"downloaded file is corrupt ({e})"
        except _Transient as e:
            reason = str(e)
        if attempt < retries:
            wait = min(MAX_BACKOFF, backoff * 2 ** (attempt - 1))
            log.warning("%s: attempt %d/%d failed: %s; retrying in %.1fs", dest.name, attempt, retries, reason, wait)
            time.sleep(wait)
    raise FetchError(f"{dest.name}: failed after {retries} attempt(s) from {url}: {reason}", transient=True)


def fetch_many(jobs: list[tuple[str, Path]], *, workers: int = 4, on_done: Callable[[Fetched], None] | None = None,
               **kw) -> list[Fetched]:
    """fetch() every (url, dest) with `workers` threads; results in job order.

    All jobs run to the end even when some fail (what arrived is kept for the next attempt), then
    one FetchError lists every failure. `on_done` is called in the calling thread as files finish."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if any(u.startswith("s3://") for u, _ in jobs) and "s3" not in kw:
        kw["s3"] = s3_client()  # boto3 clients are thread-safe; sessions are not
    kw.setdefault("pins", source_pins())  # the pool's threads do not see this thread's context
    results: dict[int, Fetched] = {}
    errors: list[FetchError] = []
    with ThreadPoolExecutor(max_workers=min(workers, max(1, len(jobs)))) as pool:
        futures = {pool.submit(fetch, url, dest, **kw): i for i, (url, dest) in enumerate(jobs)}
        for fut in as_completed(futures):
            try:
                results[futures[fut]] = r = fut.result()
            except FetchError as e:
                errors.append(e)
                continue
            if on_done is not None:
                on_done(r)
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise FetchError(f"{len(errors)} of {len(jobs)} download(s) failed: " + "; ".join(sorted(map(str, errors))[:5])
                         + more, transient=any(e.transient for e in errors))
    return [results[i] for i in range(len(jobs))]
