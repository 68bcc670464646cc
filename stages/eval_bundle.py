"""Stage eval_bundle: the CORE evaluation bundle as an artifact (core.yaml, eval_meta_data.csv, eval_data/).

    nanorun stage eval_bundle                                               # download the reference zip
    nanorun stage eval_bundle --set local_path=../shared/data/eval_bundle   # a local directory (offline)

Sources:
- `url` (default: the reference bundle, a zip): downloaded with stagekit.fetch into the artifact's
  work directory, so an interrupted download resumes from its partial file; verified against
  `sha256` when given; extracted safely (no member may leave the directory).
- `local_path`: a bundle directory (or a .zip file) on this machine. The path is a runtime field;
  what is hashed is `content_digest`, a digest of every file's name, size and sha256 computed
  when the config is built. Two copies of the same bundle are one artifact, and an edited file
  is a new one.
The output is the standard layout (whatever else the bundle carries, e.g. the GPT-2 reference
CSVs, is kept); the metrics list the present and the missing tasks (task files absent from the
bundle: CORE is then reported over N/22 tasks).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
import dataclasses
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from artifacts.files import file_sha256
from stages.base import (
    ConfigError,
    Input,
    StageConfig,
    identity,
    progress,
    runtime,
    stage_logger,
)

NAME = "eval_bundle"
code_version = "1"
INPUTS: tuple[str, ...] = ()

DEFAULT_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
_DOWNLOAD, _EXTRACT = ".download", ".extract"   # scratch dirs inside `out`, removed on success

log = stage_logger(NAME)


def _skip(name: str) -> bool:
    """Hidden files and macOS zip debris are not part of a bundle."""
    return name.startswith(".") or name == "__MACOSX"


def bundle_files(root: Path) -> list[str]:
    """Relative POSIX paths of the bundle's files, sorted (hidden files and dirs skipped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skip(d))
        out += [(Path(dirpath) / f).relative_to(root).as_posix() for f in filenames if not _skip(f)]
    return sorted(out)


def content_digest(path: Path) -> str:
    """Identity of a local bundle: sha256 over (name, size, sha256) of every file of a directory,
    or 'zip:' + the sha256 of a zip file."""
    path = Path(path)
    if path.is_file():
        return "zip:" + file_sha256(path)
    h = hashlib.sha256()
    for rel in bundle_files(path):
        f = path / rel
        h.update(f"{rel}\0{f.stat().st_size}\0{file_sha256(f)}\n".encode())
    return "dir:" + h.hexdigest()


@dataclass(frozen=True)
class Config(StageConfig):
    url: str = identity(DEFAULT_URL, help="bundle zip URL (http(s):// or s3://); unused with local_path")
    sha256: str = identity("", help="expected sha256 of the zip (url or local .zip); empty: not checked")
    local_path: str = runtime("", help="a local bundle directory or .zip instead of the url (identity: "
                                       "content_digest)")
    content_digest: str = identity("", help="digest of the local bundle's files, computed when the config is "
                                            "built; a value given must match")
    retries: int = runtime(5, help="download attempts before giving up")
    timeout: float = runtime(60.0, help="seconds without progress before a download attempt fails")

    def __post_init__(self):
        if self.sha256 and (len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)):
            raise ConfigError(f"eval_bundle.sha256={self.sha256!r}: expected 64 lowercase hex digits or ''")
        if self.retries < 1 or self.timeout <= 0:
            raise ConfigError(f"eval_bundle: retries must be >= 1 and timeout > 0 (got {self.retries}, {self.timeout})")
        if not self.local_path:
            if self.content_digest:
                raise ConfigError("eval_bundle.content_digest is only for a local_path source; leave it empty")
            if not self.url.startswith(("http://", "https://", "s3://")):
                raise ConfigError(f"eval_bundle.url={self.url!r}: expected http(s):// or s3:// (for a local "
                                  "directory or zip set local_path instead)")

    def resolve(self) -> "Config":
        """A local bundle: its absolute path and the digest of its files (the url plays no part, so
        identical copies hash alike). A given digest is taken as it is; run() checks the files."""
        if not self.local_path or self.content_digest:
            return self
        path = Path(self.local_path).expanduser()
        if not path.exists():
            raise ConfigError(f"eval_bundle.local_path={self.local_path!r} does not exist: give the directory "
                              "holding core.yaml, eval_meta_data.csv and eval_data/ (or a .zip of it)")
        if path.is_dir() and not (path / "core.yaml").is_file():
            raise ConfigError(f"eval_bundle.local_path={self.local_path!r} has no core.yaml: not a bundle directory")
        digest = content_digest(path)
        if self.sha256 and digest != "zip:" + self.sha256:
            raise ConfigError(f"eval_bundle: {self.local_path} " + ("is a directory: sha256 applies to a zip"
                              if path.is_dir() else f"has sha256 {digest[4:]}, expected {self.sha256}"))
        # The path is made absolute: the stage may run in another working directory (a Prefect worker).
        return dataclasses.replace(self, url="", local_path=str(path.resolve()), content_digest=digest)

    def label(self) -> str:
        return "local" if self.local_path else "download"


def _check_zip(path: Path) -> None:
    """Without a sha256 this is what catches a truncated or wrong download (an HTML error page...)."""
    with zipfile.ZipFile(path) as zf:
        if not any(PurePosixPath(n).name == "core.yaml" for n in zf.namelist()):
            raise ValueError("the zip holds no core.yaml: not an eval bundle")


# The reference bundle unpacks to about 10x its zip (jsonl text); a deflate bomb reaches ~1000x.
# zipfile stops reading each member at the size its central directory records, so the sum of
# those sizes bounds what extractall writes, whatever the compressed stream holds.
MAX_UNPACKED_BYTES = 4 << 30
MAX_RATIO = 100
MIN_ALLOWANCE = 64 << 20   # a small zip may still unpack to this much whatever its ratio


def _extract(zip_path: Path, dest: Path) -> Path:
    """Unzip refusing members that would land outside dest and archives that unpack to more than
    MAX_RATIO times their size (at least MIN_ALLOWANCE, at most MAX_UNPACKED_BYTES); returns the
    directory holding core.yaml."""
    packed = zip_path.stat().st_size
    allowance = min(MAX_UNPACKED_BYTES, max(MIN_ALLOWANCE, MAX_RATIO * packed))
    with zipfile.ZipFile(zip_path) as zf:
        members = zf.infolist()
        for member in members:
            parts = PurePosixPath(member.filename).parts
            if member.filename.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                raise RuntimeError(f"{zip_path}: unsafe member {member.filename!r} (absolute or '..' path): "
                                   "refusing to extract this archive")
        unpacked = sum(m.file_size for m in members)
        if unpacked > allowance:
            raise RuntimeError(f"{zip_path}: unpacks to {unpacked:,} bytes, more than the {allowance:,} a "
                               f"{packed:,}-byte bundle may (at most {MAX_RATIO}x, {MAX_UNPACKED_BYTES >> 30} GiB): "
                               "refusing it (not an eval bundle, or a zip bomb)")
        zf.extractall(dest)
    roots = sorted(p.parent for p in dest.rglob("core.yaml") if "__MACOSX" not in p.parts)
    if not roots:
        raise RuntimeError(f"{zip_path}: no core.yaml inside: not an eval bundle (expected core.yaml, "
                           "eval_meta_data.csv, eval_data/)")
    return min(roots, key=lambda p: len(p.parts))


def _place(src_root: Path, out: Path, move: bool) -> None:
    for rel in bundle_files(src_root):
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.move if move else shutil.copy2)(str(src_root / rel), str(target))


def _clear(out: Path, keep: tuple[str, ...] = ()) -> None:
    for p in out.iterdir():
        if p.name in keep:
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def run(cfg: Config, inputs: dict[str, Input], out: Path) -> dict:
    from core.eval.bundle import load_bundle

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clear(out, keep=(_DOWNLOAD,))      # a previous attempt's extraction is not trusted; its download is
    if cfg.local_path:
        src = Path(cfg.local_path).expanduser()
        digest = content_digest(src)
        if digest != cfg.content_digest:
            raise RuntimeError(f"{src} changed since the config was built (digest {digest}, config "
                               f"{cfg.content_digest}): rebuild the config to take the new files")
        if src.is_dir():
            log.info("copying the bundle from %s", src)
            _place(src, out, move=False)
        else:
            _place(_extract(src, out / _EXTRACT), out, move=True)
    else:
        from stagekit.fetch import fetch
        zip_path = out / _DOWNLOAD / "eval_bundle.zip"
        zip_path.parent.mkdir(exist_ok=True)
        log.info("downloading %s", cfg.url)
        fetch(cfg.url, zip_path, sha256=cfg.sha256 or None, validate=_check_zip, retries=cfg.retries,
              timeout=cfg.timeout, on_progress=lambda done, total: progress(done, total or 0, phase="download"))
        _place(_extract(zip_path, out / _EXTRACT), out, move=True)
    for scratch in (_EXTRACT, _DOWNLOAD):
        shutil.rmtree(out / scratch, ignore_errors=True)

    bundle = load_bundle(out)
    files = bundle_files(out)
    present = [t.label for t in bundle.present]
    if not present:
        raise RuntimeError(f"the bundle has none of the {len(bundle.tasks)} task files its core.yaml names under "
                           "eval_data/: not an eval bundle, refusing to commit it")
    if bundle.missing:
        log.warning("bundle lacks the data of %d task(s): %s; CORE will be reported over %d/%d tasks",
                    len(bundle.missing), ", ".join(bundle.missing), len(present), len(bundle.tasks))
    return {
        "n_tasks": len(bundle.tasks),
        "n_present": len(present),
        "present": present,
        "missing": list(bundle.missing),
        "files": len(files),
        "bytes": sum((out / f).stat().st_size for f in files),
        "content_digest": content_digest(out),
        "source": cfg.local_path and str(Path(cfg.local_path).expanduser().resolve()) or cfg.url,
    }
