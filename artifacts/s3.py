"""The S3 backend (boto3; any S3-compatible server: the endpoint comes from $NANORUN_S3_ENDPOINT_URL,
else $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL). See artifacts/store.py for the layout. Built on the
store; artifacts/__init__.py registers it with open_store for s3:// URLs, loaded on first use.

- commit: every file goes up through boto3's transfer manager (multipart, parallel parts) while
  another thread hashes it; objects left over from an older or interrupted commit are deleted; the
  manifest is one put_object after all of that. A kill -9 anywhere before that put leaves nothing
  committed (gc aborts the orphaned multipart uploads and removes the stray objects).
- download (materialize/pull): large files are fetched as a few contiguous ranged GET streams
  written in place; a small state file records how far each stream got, so an interrupted download
  continues with Range GETs instead of restarting (If-Match on the ETag guards against the object
  changing in between). A hashing thread follows the downloaded contiguous prefix, so the sha256
  check costs no extra pass; a file is renamed into place only once its hash matches.
- leases: put_object IfNoneMatch='*' to create, IfMatch=<etag> to renew or take over.
Local state (staging for builds, the download cache) lives in $NANORUN_HOME/.s3/<store-id>/.
"""
from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from artifacts import verified
from artifacts.errors import ChecksumError, StoreCredentialsError, StoreError, StoreUnreachableError
from artifacts.files import (CHUNK, HASH_THREADS, PART_SUFFIX, dest_path, dir_size, flocked, list_tree, newest_mtime,
                             open_part, regular_size, sha256_file, write_atomic)
from artifacts.manifest import MANIFEST_NAME, ArtifactRef, FileEntry, Manifest
from artifacts.store import LEASES, GcItem, Store, nanorun_home

log = logging.getLogger("nanorun.store")

PART_SIZE = 16 << 20  # multipart chunk (s3transfer raises it for huge files to stay under 10k parts)
SEGMENT_MIN = 64 << 20  # a download stream handles at least this much of one file
_CRED_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken", "403"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def _code(e) -> str:
    return str(((getattr(e, "response", None) or {}).get("Error") or {}).get("Code", ""))


class S3Store(Store):
    def __init__(self, url: str, index: bool = True, endpoint_url: str | None = None):
        super().__init__(index)
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if len(bucket) < 3:
            raise StoreError(f"bad S3 store URL {url!r}: expected s3://bucket[/prefix] (bucket names have >= 3 chars)")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint_url = (endpoint_url or os.environ.get("NANORUN_S3_ENDPOINT_URL")
                             or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None)
        ident = hashlib.sha256(f"{self.endpoint_url or 'aws'}|{self.url}".encode()).hexdigest()[:10]
        self.store_id = f"{bucket}-{ident}"
        self.local = nanorun_home() / ".s3" / self.store_id  # staging + download cache (machine-local)
        self.upload_concurrency = 8
        # Ranged GET streams per large file: several streams beat one TCP connection on real S3;
        # moto answers each ranged GET by reading the whole object, so 1 is faster there.
        self.download_streams = int(os.environ.get("NANORUN_S3_DOWNLOAD_STREAMS", "4"))
        self.file_concurrency = 4  # files downloaded at once
        self.bytes_downloaded = 0  # counter (tests check that a resumed download fetches only the rest)
        self._client = None
        self._client_lock = threading.Lock()
        self._stats_lock = threading.Lock()

    # ---- client and error mapping -------------------------------------------------------------
    @property
    def client(self):
        with self._client_lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                cfg = Config(
                    retries={"max_attempts": int(os.environ.get("NANORUN_S3_MAX_ATTEMPTS", "4")), "mode": "standard"},
                    connect_timeout=float(os.environ.get("NANORUN_S3_CONNECT_TIMEOUT", "10")),
                    read_timeout=120, max_pool_connections=32,
                    s3={"addressing_style": "path"} if self.endpoint_url else {},
                )
                self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=cfg)
            return self._client

    @property
    def _where(self) -> str:
        return f"S3 endpoint {self.endpoint_url or 'AWS default'} ({self.url})"

    @contextlib.contextmanager
    def _errors(self):
        """Turn botocore's exceptions for user-fixable conditions into one-line StoreErrors."""
        from botocore import exceptions as bx

        try:
            yield
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError) as e:
            raise StoreUnreachableError(f"cannot reach {self._where}: {e}. Check the URL in "
                                        "NANORUN_S3_ENDPOINT_URL and that the server is up") from None
        except (bx.NoCredentialsError, bx.PartialCredentialsError) as e:
            raise StoreCredentialsError(f"no usable credentials for {self.url} ({e}): set AWS_ACCESS_KEY_ID "
                                        "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
        except bx.ClientError as e:
            code = _code(e)
            if code == "NoSuchBucket":
                raise StoreError(f"bucket {self.bucket!r} does not exist at {self._where}: create it or fix "
                                 "the store URL") from None
            if code in _CRED_CODES:
                raise StoreCredentialsError(f"credentials rejected by {self._where} ({code}): check "
                                            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE") from None
            raise

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _paginate(self, op: str, **kw):
        with self._errors():
            yield from self.client.get_paginator(op).paginate(Bucket=self.bucket, **kw)

    # ---- primitives ---------------------------------------------------------------------------
    def _read(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except ClientError as e:
                if _code(e) in _MISSING_CODES:
                    return None
                raise

    def _write(self, key: str, data: bytes) -> None:
        with self._errors():
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def _remove(self, key: str) -> None:
        with self._errors():
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def _list(self, prefix: str) -> tuple[list[str], list[dict]]:
        base = self._key(prefix).rstrip("/") + "/" if prefix or self.prefix else ""
        dirs, objs = [], []
        for page in self._paginate("list_objects_v2", Prefix=base, Delimiter="/"):
            dirs += [p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", [])]
            objs += [{**o, "Name": o["Key"][len(base):]} for o in page.get("Contents", [])]
        return dirs, objs

    def _dirs(self, prefix: str) -> list[str]:
        return sorted(d for d in self._list(prefix)[0] if not d.startswith("."))

    def _files(self, prefix: str) -> list[str]:
        return sorted(o["Name"] for o in self._list(prefix)[1])

    def _objects(self, ref: ArtifactRef) -> list[dict]:
        base = self._key(ref.key) + "/"
        out = []
        for page in self._paginate("list_objects_v2", Prefix=base):
            out += [{**o, "Name": o["Key"][len(base):]} for o in page.get("Contents", [])]
        return out

    def _file_sizes(self, ref: ArtifactRef) -> dict[str, int]:
        return {o["Name"]: o["Size"] for o in self._objects(ref) if o["Name"] != MANIFEST_NAME}

    def _sha256(self, ref: ArtifactRef, path: str) -> str:
        h = hashlib.sha256()
        with self._errors():
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(f"{ref.key}/{path}"))["Body"]
            for chunk in body.iter_chunks(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    # ---- leases: conditional writes (IfNoneMatch='*' to create, IfMatch=<etag> to replace) ---------
    def _lease_key(self, ref: ArtifactRef) -> str:
        return self._key(f"{LEASES}/{ref.stage}/{ref.name}.json")

    def _conditional(self, fn, **kw):
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                return fn(Bucket=self.bucket, **kw)
            except ClientError as e:
                if _code(e) in _PRECONDITION_CODES | _MISSING_CODES:
                    return None
                raise

    def _lease_create(self, ref, data: bytes):
        r = self._conditional(self.client.put_object, Key=self._lease_key(ref), Body=data, IfNoneMatch="*")
        return r and r["ETag"]

    def _lease_read(self, ref):
        r = self._conditional(self.client.get_object, Key=self._lease_key(ref))
        if r is None:
            return None
        # Age by the store's clock: the response's Date minus the object's LastModified (both the
        # server's, 1 s resolution); this host's wall clock only if a proxy dropped the Date header.
        date = (r.get("ResponseMetadata") or {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
        return r["Body"].read(), r["ETag"], now - r["LastModified"].timestamp()

    def _lease_replace(self, ref, data: bytes, token):
        r = self._conditional(self.client.put_object, Key=self._lease_key(ref), Body=data, IfMatch=token)
        return r and r["ETag"]

    def _lease_delete(self, ref, token) -> bool:
        return self._conditional(self.client.delete_object, Key=self._lease_key(ref), IfMatch=token) is not None

    def _lease_refs(self) -> list[ArtifactRef]:
        out = []
        for stage in self._list(LEASES)[0]:
            for name in self._files(f"{LEASES}/{stage}"):
                try:
                    out.append(ArtifactRef.parse(f"{stage}/{name.removesuffix('.json')}"))
                except ValueError:
                    pass
        return out

    # ---- building and committing --------------------------------------------------------------
    def work_dir_path(self, ref: ArtifactRef) -> Path:
        """Where work_dir(ref) is on this machine, creating nothing (a plan looks for checkpoints there)."""
        return self.local / "staging" / ref.stage / ref.name

    def work_dir(self, ref: ArtifactRef, clear: bool = False) -> Path:
        """$NANORUN_HOME/.s3/<store-id>/staging/{stage}/{name}: same dir on every attempt."""
        d = self.work_dir_path(ref)
        if clear and d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _upload_dir(self, ref: ArtifactRef, src: Path, paths: list[str]) -> list[FileEntry]:
        """Upload src/<paths> under the artifact (hashing concurrently), then drop stray objects."""
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        config = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                                max_concurrency=self.upload_concurrency, preferred_transfer_client="classic")
        base = self._key(ref.key)
        with self._errors():
            with ThreadPoolExecutor(HASH_THREADS) as hashers, create_transfer_manager(self.client, config) as tm:
                hashes = {p: hashers.submit(sha256_file, src / p) for p in paths}
                uploads = [tm.upload(str(src / p), self.bucket, f"{base}/{p}") for p in paths]
                for u in uploads:
                    u.result()
                files = [FileEntry(p, *hashes[p].result()) for p in paths]
            stray = [o["Key"] for o in self._objects(ref) if o["Name"] not in set(paths) | {MANIFEST_NAME}]
            for i in range(0, len(stray), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in stray[i:i + 1000]]})
        return files

    def _commit(self, ref: ArtifactRef, work_dir: Path, manifest: Manifest) -> Manifest:
        paths = list_tree(work_dir)
        self._remove(self._manifest_key(ref))  # replacing: uncommit the old version first
        m = replace(manifest, files=self._upload_dir(ref, work_dir, paths))
        self._write(self._manifest_key(ref), m.to_json().encode())  # the commit point
        self._adopt(ref, work_dir, m)
        return m

    def _adopt(self, ref: ArtifactRef, work_dir: Path, m: Manifest) -> None:
        """The work dir now equals the committed artifact: make it the download cache (free materialize)."""
        cache = self._cache_dir(ref)
        try:
            with flocked(cache.with_name(cache.name + ".lock")):
                if cache.exists():
                    shutil.rmtree(cache)
                cache.parent.mkdir(parents=True, exist_ok=True)
                os.rename(work_dir, cache)
                write_atomic(cache / MANIFEST_NAME, m.to_json(), durable=False)
        except OSError as e:
            log.info("%s: not caching the committed work dir (%s)", ref, e)
            shutil.rmtree(work_dir, ignore_errors=True)

    def _receive(self, src: Store, ref: ArtifactRef, manifest: Manifest) -> None:
        path = src.materialize(ref)
        self._remove(self._manifest_key(ref))
        files = self._upload_dir(ref, path, [f.path for f in manifest.files])
        bad = [f.path for f, g in zip(manifest.files, files) if (f.size, f.sha256) != (g.size, g.sha256)]
        if bad:
            raise ChecksumError(f"{ref}: {', '.join(bad)} in {src.url} do not match its manifest; not committed")
        self._write(self._manifest_key(ref), manifest.to_json().encode())

    def _put_file(self, key: str, path: Path) -> None:  # streamed, multipart above PART_SIZE
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                                max_concurrency=self.upload_concurrency, preferred_transfer_client="classic")
        with self._errors():
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=config)

    # ---- downloading --------------------------------------------------------------------------
    def _get_file(self, key: str, dest: Path, entry: FileEntry) -> None:  # ranged, resumable, verified
        self._download_file(self._key(key), Path(dest), entry)

    def _cache_dir(self, ref: ArtifactRef) -> Path:
        return self.local / "cache" / ref.stage / ref.name

    def materialize(self, ref: ArtifactRef) -> Path:
        """A local copy in $NANORUN_HOME/.s3/<store-id>/cache/..., downloaded (resumably) and
        sha256-verified on the way in. Later calls check the manifest is unchanged and every cached
        file's sha256 (an ETag is not one; unchanged files this machine already checked are not
        rehashed: artifacts/verified.py); a damaged or extra cached file is fetched again / removed."""
        m = self.require(ref)
        cache = self._cache_dir(ref)
        with flocked(cache.with_name(cache.name + ".lock")):
            marker = cache / MANIFEST_NAME
            if marker.is_file() and marker.read_text() == m.to_json():
                bad = self._damaged_copy(cache, m)
                if not bad:
                    return cache
                log.warning("%s: the local copy in %s is damaged (%s); downloading those files again",
                            ref, cache, ", ".join(bad))
                for p in bad:
                    (cache / p).unlink(missing_ok=True)
            self._download(ref, m, cache, exact=True)
        return cache

    @staticmethod
    def _damaged_copy(cache: Path, m: Manifest) -> list[str]:
        """Paths in a local copy that do not match the manifest (missing, changed, or not listed)."""
        listed = {f.path for f in m.files} | {MANIFEST_NAME}
        extra = [p for p in list_tree_loose(cache) if p not in listed]
        got, _ = verified.digests([cache / f.path for f in m.files])
        return [f.path for f in m.files if got[cache / f.path] != f.sha256] + extra

    def pull(self, ref: ArtifactRef, dest_dir: Path | str) -> Path:
        m = self.require(ref)
        dest = Path(dest_dir)
        self._download(ref, m, dest, exact=False)
        return dest

    def _download(self, ref: ArtifactRef, m: Manifest, dest: Path, exact: bool) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        marker = dest / MANIFEST_NAME
        old = set()
        if marker.is_file():
            try:
                old = {(f.path, f.size, f.sha256) for f in Manifest.from_json(marker.read_bytes()).files}
            except ValueError:
                pass
            marker.unlink()  # the directory is not a complete copy again until we say so

        def fetch(f: FileEntry):
            d = dest_path(dest, f.path)
            if regular_size(d) == f.size and (  # a link there is replaced, never trusted
                    (f.path, f.size, f.sha256) in old or sha256_file(d)[1] == f.sha256):
                return
            self._download_file(self._key(f"{ref.key}/{f.path}"), d, f)

        with ThreadPoolExecutor(self.file_concurrency) as pool:
            list(pool.map(fetch, sorted(m.files, key=lambda f: -f.size)))
        if exact:
            wanted = {f.path for f in m.files}
            for p in list_tree_loose(dest):
                if p not in wanted:
                    (dest / p).unlink()
        write_atomic(marker, m.to_json(), durable=False)

    def _download_file(self, key: str, dest: Path, entry: FileEntry) -> None:
        """Download one object to dest, resuming a previous partial download, and rename it into
        place only if its sha256 matches. One fresh retry if the object changed or the hash fails."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + PART_SUFFIX)
        state_path = dest.with_name(dest.name + PART_SUFFIX + ".json")
        digest = None
        for attempt in (1, 2):
            try:
                digest = self._fetch(key, part, state_path, entry)
            except _ObjectChanged:
                digest = "(object changed during the download)"
            if digest == entry.sha256:
                os.replace(part, dest)
                state_path.unlink(missing_ok=True)
                return
            part.unlink(missing_ok=True)
            state_path.unlink(missing_ok=True)
            if attempt == 1:
                log.warning("s3://%s/%s: %s; downloading it again", self.bucket, key,
                            digest if digest.startswith("(") else "sha256 mismatch")
        raise ChecksumError(f"s3://{self.bucket}/{key}: downloaded {entry.size:,} bytes with sha256 {digest[:16]}…, "
                            f"manifest says {entry.sha256[:16]}…; the stored object is damaged "
                            "(`nanorun verify`): rebuild or re-push it")

    def _fetch(self, key: str, part: Path, state_path: Path, entry: FileEntry) -> str:
        """Fill `part` with the object's bytes using a few ranged GET streams, continuing from the
        progress recorded in state_path; returns the sha256 of the complete file. This thread hashes
        stream 0's chunks as they arrive (from memory), then the rest from the page cache as soon
        as it is contiguous, so hashing overlaps the transfer."""
        size = entry.size
        nseg = max(1, min(self.download_streams, size // SEGMENT_MIN))
        bounds = [[i * size // nseg, (i + 1) * size // nseg] for i in range(nseg)]
        state = None
        if state_path.is_file() and part.is_file():
            try:
                state = json.loads(state_path.read_text())
            except ValueError:
                pass
        if not state or (state.get("sha256"), state.get("size"), state.get("bounds")) != (entry.sha256, size, bounds):
            state = {"sha256": entry.sha256, "size": size, "bounds": bounds, "etag": None,
                     "progress": [b[0] for b in bounds]}
            part.unlink(missing_ok=True)
        progress = state["progress"]
        cond = threading.Condition()
        errors: list[BaseException] = []
        h = hashlib.sha256()
        chunks0: queue.Queue = queue.Queue(maxsize=32)  # stream 0's bytes, hashed while the others download
        first0 = progress[0]
        hasher_gone = threading.Event()
        saved = [sum(p - b[0] for p, b in zip(progress, bounds))]

        def save():  # the caller holds cond; the state never claims bytes not yet written
            write_atomic(state_path, json.dumps(state), durable=False)

        def feed(item) -> bool:  # False once the hashing thread has given up
            while not hasher_gone.is_set():
                try:
                    chunks0.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    pass
            return False

        def hash_range(fd: int, pos: int, end: int) -> None:
            while pos < end:
                buf = os.pread(fd, min(CHUNK, end - pos), pos)
                h.update(buf)
                pos += len(buf)

        def stream(fd: int, i: int) -> None:
            start, end = bounds[i]
            off = progress[i]
            try:
                if off < end:
                    with self._errors():
                        kw = {"IfMatch": state["etag"]} if state["etag"] else {}
                        r = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={off}-{end - 1}", **kw)
                        with cond:
                            state["etag"] = state["etag"] or r["ETag"]
                            if state["etag"] != r["ETag"]:
                                raise _ObjectChanged()
                        for chunk in r["Body"].iter_chunks(1 << 20):
                            written = 0
                            while written < len(chunk):
                                written += os.pwrite(fd, memoryview(chunk)[written:], off + written)
                            if i == 0 and not feed(chunk):  # hashed by the caller's thread, from memory
                                raise RuntimeError("hashing thread failed")
                            off += len(chunk)
                            with self._stats_lock:
                                self.bytes_downloaded += len(chunk)
                            with cond:
                                progress[i] = off
                                done = sum(p - b[0] for p, b in zip(progress, bounds))
                                if done - saved[0] >= SEGMENT_MIN // 4:
                                    saved[0] = done
                                    save()
                                cond.notify_all()
                    if off != end:
                        raise StoreError(f"s3://{self.bucket}/{key}: stream ended at byte {off}, expected {end}; rerun to resume")
            except BaseException as e:
                if _code(e) in _PRECONDITION_CODES:  # If-Match failed: the object was replaced
                    e = _ObjectChanged()
                with cond:
                    errors.append(e)
            finally:
                if i == 0:
                    feed(None)
                with cond:
                    cond.notify_all()

        def contiguous() -> int:
            for p, (_, end) in zip(progress, bounds):
                if p < end:
                    return p
            return size

        fd = open_part(part, resume=True)
        try:
            with ThreadPoolExecutor(nseg) as pool:
                for i in range(nseg):
                    pool.submit(stream, fd, i)
                try:
                    hash_range(fd, 0, first0)  # what a previous attempt already fetched
                    while (chunk := chunks0.get()) is not None:
                        h.update(chunk)
                    pos = bounds[0][1]
                    while pos < size and not errors:  # follow the contiguous prefix past segment 0
                        with cond:
                            while contiguous() <= pos and not errors:
                                cond.wait(1.0)
                            avail = contiguous()
                        hash_range(fd, pos, avail)
                        pos = avail
                except BaseException:
                    hasher_gone.set()  # unblock stream 0 so the pool can shut down
                    raise
            if errors:
                with cond:
                    save()
                raise errors[0]
            os.fsync(fd)
        finally:
            os.close(fd)
        return h.hexdigest()

    # ---- deleting and gc ----------------------------------------------------------------------
    def _delete_files(self, ref: ArtifactRef) -> None:
        keys = [o["Key"] for o in self._objects(ref)]
        with self._errors():
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
        cache = self._cache_dir(ref)
        if cache.exists():
            with flocked(cache.with_name(cache.name + ".lock")):
                shutil.rmtree(cache, ignore_errors=True)

    def _artifact_age(self, ref: ArtifactRef) -> float:
        objs = self._objects(ref)
        if not objs:
            return float("inf")
        return time.time() - max(o["LastModified"].timestamp() for o in objs)

    def _gc_local(self, live: set[ArtifactRef], grace_s: float) -> list[GcItem]:
        items = []
        now = time.time()
        for d in sorted((self.local / "staging").glob("*/*")):
            try:
                ref = ArtifactRef.parse(f"{d.parent.name}/{d.name}")
            except ValueError:
                continue
            if d.is_dir() and ref not in live and now - newest_mtime(d) >= grace_s:
                items.append(GcItem("staging", str(d), dir_size(d), "local work dir of an unfinished build",
                                    lambda d=d: shutil.rmtree(d, ignore_errors=True)))
        for d in sorted((self.local / "cache").glob("*/*")):
            try:
                ref = ArtifactRef.parse(f"{d.parent.name}/{d.name}")
            except ValueError:
                continue
            marker = d / MANIFEST_NAME
            current = self._read(self._manifest_key(ref))
            if d.is_dir() and (current is None or not marker.is_file() or marker.read_bytes() != current):
                items.append(GcItem("cache", str(d), dir_size(d), "local copy of an artifact no longer in the store",
                                    lambda d=d: shutil.rmtree(d, ignore_errors=True)))
        for page in self._paginate("list_multipart_uploads", Prefix=self._key("")):
            for u in page.get("Uploads", []):
                if now - u["Initiated"].timestamp() >= grace_s:
                    items.append(GcItem("multipart", f"s3://{self.bucket}/{u['Key']}", 0,
                                        "upload abandoned by an interrupted commit",
                                        lambda u=u: self.client.abort_multipart_upload(
                                            Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])))
        return items


class _ObjectChanged(Exception):
    """The object's ETag changed between ranged requests (it was replaced): start over."""


def list_tree_loose(root: Path) -> list[str]:
    """Relative paths of all files under root, including reserved names (for cleaning a cache)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())
