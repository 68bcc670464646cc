"""Store fixtures shared by the artifact, execute and CLI tests (import the fixtures you use).

`store` runs a test once per backend: a local directory, and S3 on the moto server from
tests/conftest.py (a real HTTP S3 endpoint on 127.0.0.1).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from artifacts import ArtifactRef, Manifest, fingerprint, open_store

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, nanorun_home, monkeypatch):
    """A fresh store per backend. The run index is off here (tests/artifacts/test_index.py covers
    it) because a DuckDB write per commit would double these tests' time."""
    if request.param == "local":
        return open_store(str(tmp_path / "store"), index=False)
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    monkeypatch.setenv("NANORUN_S3_ENDPOINT_URL", endpoint)
    return open_store(f"s3://{bucket}/pre", index=False)


@pytest.fixture
def s3_store(s3_bucket, nanorun_home, monkeypatch):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("NANORUN_S3_ENDPOINT_URL", endpoint)
    return open_store(f"s3://{bucket}/pre", index=False)


def make_ref(label: str = "a", seed: int = 0, stage: str = "toy") -> ArtifactRef:
    return ArtifactRef(stage, label, fingerprint(stage, "1", {"seed": seed, "label": label}, {}))


def put(store, ref: ArtifactRef, files: dict[str, bytes], inputs: dict | None = None, metrics=None) -> Manifest:
    """Commit an artifact holding `files` (path -> bytes) the way execute does."""
    work = store.work_dir(ref)
    for path, data in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_bytes(data)
    m = Manifest(ref.stage, ref.label, ref.fingerprint, "1", {"label": ref.label}, {"threads": 1},
                 dict(inputs or {}), [], metrics or {"loss": 0.5})
    return store.commit(ref, work, m)


def tamper(store, ref: ArtifactRef, path: str, data: bytes | None) -> None:
    """Overwrite (or delete, data=None) one stored file behind the store's back."""
    if hasattr(store, "root"):
        p = store.root / ref.key / path
        if data is None:
            p.unlink()
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    else:
        key = store._key(f"{ref.key}/{path}")
        if data is None:
            store.client.delete_object(Bucket=store.bucket, Key=key)
        else:
            store.client.put_object(Bucket=store.bucket, Key=key, Body=data)


def forget_local_copy(store, ref: ArtifactRef) -> None:
    """S3: drop this machine's copy of an artifact (as if another machine consumed it)."""
    if not hasattr(store, "root"):
        shutil.rmtree(store._cache_dir(ref), ignore_errors=True)


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(code: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
