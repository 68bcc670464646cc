"""Artifact store throughput: put/get MiB/s of a 256 MiB artifact (one 200 MiB file + 7 x 8 MiB) on
both backends, side by side with raw file copies and raw boto3 transfers of the same data in the
same run. The S3 server is moto's, started here as a separate process on 127.0.0.1 (in its own
process so it does not share our GIL).

    python -m bench.store                  # 256 MiB, best of 3
    python -m bench.store --mib 64 --repeat 1

What each row moves:
- local put  = push from one local store into another: copy + sha256 of every byte + fsync + rename.
  Compared with a raw copy (shutil.copytree) and a raw copy + fsync (a store must make the data
  durable before its manifest may point at it). sha256 runs at ~1.2 GB/s per core (SHA-NI) while
  a page-cache copy runs at several GB/s, so verified local copies are hash-bound: the
  "sha256 of the data" row is their ceiling.
- local commit = the end of a stage: sha256 + fsync the work dir, rename it into place.
- local get  = pull into a fresh directory (copy + sha256 verification + fsync).
- s3 put     = commit of a work dir: multipart upload (16 MiB parts, 8 threads) + sha256 in parallel.
  Compared with boto3 upload_file per file (default TransferConfig, and the store's TransferConfig).
- s3 get     = materialize into an empty cache: ranged GET streams + sha256 + fsync. With 4 streams
  it is compared with boto3 download_file (8 MiB ranged parts, 10 threads), with 1 stream with a
  single get_object stream. moto reads the whole object for every ranged GET, so on moto one
  stream wins; on real S3 several streams do (NANORUN_S3_DOWNLOAD_STREAMS, default 4).
Numbers are best of --repeat runs (the machine is shared: noise only ever slows a run down).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/store.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artifacts import ArtifactRef, Manifest, fingerprint, open_store  # noqa: E402
from artifacts.files import sha256_file  # noqa: E402
from artifacts.s3 import PART_SIZE  # noqa: E402

MiB = 1 << 20


def make_data(root: Path, total_mib: int) -> list[Path]:
    root.mkdir(parents=True)
    small = [8] * 7 if total_mib >= 112 else [max(1, total_mib // 16)] * 4
    sizes = [total_mib - sum(small)] + small
    paths = []
    for i, mib in enumerate(sizes):
        p = root / ("model.bin" if i == 0 else f"shard_{i:02d}.bin")
        with open(p, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MiB))
        paths.append(p)
    return paths


class Timer:
    """Interleaved timing: every round runs each operation once, so a burst of load from other
    processes hits all of them alike; the best round per operation is reported."""

    def __init__(self):
        self.ops: list[tuple[str, str, object, object, str | None]] = []
        self.times: dict[str, list[float]] = {}

    def add(self, backend: str, name: str, fn, setup=None, vs: str | None = None) -> None:
        self.ops.append((backend, name, fn, setup, vs))

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            for _, name, fn, setup, _ in self.ops:
                if setup:
                    setup()
                t = time.perf_counter()
                fn()
                self.times.setdefault(name, []).append(time.perf_counter() - t)

    def best(self, name: str) -> float:
        return min(self.times[name])


def fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def manifest_for(ref: ArtifactRef) -> Manifest:
    return Manifest(ref.stage, ref.label, ref.fingerprint, "1", {}, {}, {}, [])


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="artifact size in MiB")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="nanorun-bench-"))
    os.environ["NANORUN_HOME"] = str(tmp / "home")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    moto, endpoint = start_moto()
    os.environ["NANORUN_S3_ENDPOINT_URL"] = endpoint
    timer = Timer()
    try:
        src = tmp / "src"
        paths = make_data(src, args.mib)
        total = sum(p.stat().st_size for p in paths) / MiB
        counter = iter(range(10**6))

        def fresh_ref() -> ArtifactRef:
            n = next(counter)
            return ArtifactRef("bench", f"r{n}", fingerprint("bench", "1", {"n": n}, {}))

        # ---- local ---------------------------------------------------------------------------
        dst = tmp / "copy"

        def clear():
            shutil.rmtree(dst, ignore_errors=True)

        def mkdst():
            clear()
            dst.mkdir()
        a, b = open_store(str(tmp / "a"), index=False), open_store(str(tmp / "b"), index=False)
        ref = fresh_ref()
        work = a.work_dir(ref)
        shutil.copytree(src, work, dirs_exist_ok=True)
        a.commit(ref, work, manifest_for(ref))
        pending: list[ArtifactRef] = []

        def stage_work(store):
            def setup():
                for r in pending:  # keep the disk (and moto's memory) from filling up
                    store.delete(r)
                pending.clear()
                pending.append(fresh_ref())
                shutil.copytree(src, store.work_dir(pending[-1]), dirs_exist_ok=True)
            return setup

        def commit(store):
            return lambda: store.commit(pending[-1], store.work_dir(pending[-1]), manifest_for(pending[-1]))

        timer.add("local", "raw copy (copytree)", lambda: shutil.copytree(src, dst), clear)
        timer.add("local", "raw copy + fsync", lambda: (shutil.copytree(src, dst), fsync_tree(dst)), clear)
        timer.add("local", "sha256 alone (ceiling of verified copies)",
                  lambda: [sha256_file(p) for p in paths])
        timer.add("local", "store put (push: copy+sha256+fsync)", lambda: a.push(ref, b),
                  lambda: shutil.rmtree(b.root, ignore_errors=True), vs="raw copy + fsync")
        timer.add("local", "store get (pull: copy+sha256+fsync)", lambda: a.pull(ref, dst), clear, vs="raw copy + fsync")
        timer.add("local", "store commit (sha256+fsync+rename)", commit(b), stage_work(b))
        timer.add("local", "store materialize (size check)", lambda: a.materialize(ref))

        # ---- s3 ------------------------------------------------------------------------------
        from boto3.s3.transfer import TransferConfig

        s3 = open_store("s3://bench/store", index=False)
        client = s3.client
        client.create_bucket(Bucket="bench")
        ours = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=8)
        s3_ref = fresh_ref()
        shutil.copytree(src, s3.work_dir(s3_ref), dirs_exist_ok=True)
        s3.commit(s3_ref, s3.work_dir(s3_ref), manifest_for(s3_ref))

        def raw_upload(cfg):
            def go():
                for p in paths:
                    client.upload_file(str(p), "bench", f"raw/{p.name}", Config=cfg)
            return go

        def raw_download():
            for p in paths:
                client.download_file("bench", f"raw/{p.name}", str(dst / p.name))

        def raw_stream():
            for p in paths:
                body = client.get_object(Bucket="bench", Key=f"raw/{p.name}")["Body"]
                with open(dst / p.name, "wb") as f:
                    for chunk in body.iter_chunks(MiB):
                        f.write(chunk)

        def materialize(streams):
            def go():
                s3.download_streams = streams
                s3.materialize(s3_ref)
            return go

        def uncache():
            shutil.rmtree(s3._cache_dir(s3_ref), ignore_errors=True)

        timer.add("s3", "raw boto3 upload_file (default config)", raw_upload(TransferConfig()))
        timer.add("s3", "raw boto3 upload_file (store's config)", raw_upload(ours))
        timer.add("s3", "store put (commit: multipart+sha256)", commit(s3), stage_work(s3),
                  vs="raw boto3 upload_file (default config)")
        timer.add("s3", "raw boto3 download_file (default config)", raw_download, mkdst)
        timer.add("s3", "raw get_object stream", raw_stream, mkdst)
        timer.add("s3", "store get (materialize, 4 ranged streams)", materialize(4), uncache,
                  vs="raw boto3 download_file (default config)")
        timer.add("s3", "store get (materialize, 1 stream)", materialize(1), uncache, vs="raw get_object stream")
        timer.run(args.repeat)
    finally:
        moto.terminate()
        moto.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    big = args.mib - (56 if args.mib >= 112 else 4 * max(1, args.mib // 16))
    print(f"\nartifact: {total:.0f} MiB ({big} MiB file + small files); best of {args.repeat} interleaved rounds; "
          "'vs raw' = store MiB/s / MiB/s of the raw row it replaces\n")
    print(f"{'backend':<8} {'operation':<46} {'MiB/s':>8} {'seconds':>8} {'vs raw':>7}")
    for backend, name, _, _, vs in timer.ops:
        sec = timer.best(name)
        ratio = f"{timer.best(vs) / sec:.0%}" if vs else ""
        print(f"{backend:<8} {name:<46} {total / sec:>8.0f} {sec:>8.3f} {ratio:>7}")


if __name__ == "__main__":
    main()
