"""Artifact identity: canonical JSON, fingerprints, references and the manifest record.

An artifact lives at `{root}/{stage}/{label}-{fingerprint}`. Its fingerprint hashes exactly what
determines its contents: the stage name, the stage's code_version, the identity part of its config
and the fingerprints of its inputs. Runtime settings (batch size per device, number of processes,
logging cadence) are recorded in the manifest but never hashed.

The manifest (MANIFEST.json, written last) is the commit point: an artifact without one does not
exist as far as every reader is concerned.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from artifacts.redact import redact_value

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_VERSION = 1
FINGERPRINT_LEN = 16  # hex chars of sha256 kept in paths and refs (64 bits)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")  # no '-' (it separates the fingerprint)
_FP_RE = re.compile(r"^[0-9a-f]{%d}$" % FINGERPRINT_LEN)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# A manifest's fields and the JSON type each must have: a manifest is read from storage anyone may
# have written to, and a wrong type must be reported, not crash whoever reads it later.
_SCHEMA = {"stage": str, "label": str, "fingerprint": str, "code_version": str, "identity": dict,
           "runtime": dict, "inputs": dict, "files": list, "metrics": dict, "provenance": dict}
_JSON_NAMES = {str: "string", dict: "object", list: "array"}


class CanonicalJSONError(TypeError):
    """A value cannot be serialised deterministically (so it must not feed a fingerprint)."""


def _canonicalize(value: Any, where: str) -> Any:
    # Only types with one obvious JSON form are accepted: a set has no order, a float NaN has no
    # JSON spelling, an arbitrary object's repr may hold a memory address.
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CanonicalJSONError(f"{where}: non-finite float {value!r} has no canonical JSON form")
        if value.is_integer() and abs(value) < 2**53:
            # 1.0 and 1 must hash alike: configs come from YAML, CLI flags and Python defaults.
            return int(value)
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CanonicalJSONError(f"{where}: dict key {k!r} is not a string")
            out[k] = _canonicalize(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonicalize(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canonicalize({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where)
    raise CanonicalJSONError(
        f"{where}: {type(value).__name__} value {value!r} cannot be serialised deterministically; "
        "use str/int/float/bool/None, lists, tuples, dicts with string keys or dataclasses"
    )


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, integral floats as ints; refuses the rest."""
    return json.dumps(_canonicalize(value, "$"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(stage: str, code_version: str, identity: dict, input_fingerprints: dict[str, str]) -> str:
    # Credentials in URLs are not part of what an artifact is (artifacts/redact.py), and a
    # fingerprint must not be a way to test guesses of them.
    payload = {
        "stage": stage,
        "code_version": code_version,
        "identity": redact_value(identity),
        "inputs": input_fingerprints,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:FINGERPRINT_LEN]


@dataclass(frozen=True, order=True)
class ArtifactRef:
    """`stage/label-fingerprint`: where an artifact lives relative to a store root."""

    stage: str
    label: str
    fingerprint: str

    def __post_init__(self):
        if not _NAME_RE.match(self.stage):
            raise ValueError(f"bad stage name {self.stage!r}: lowercase letters, digits and _ only")
        if not _LABEL_RE.match(self.label):
            raise ValueError(f"bad label {self.label!r}: letters, digits, '_' and '.' only (no '-')")
        if not _FP_RE.match(self.fingerprint):
            raise ValueError(f"bad fingerprint {self.fingerprint!r}: expected {FINGERPRINT_LEN} hex chars")

    @property
    def name(self) -> str:
        return f"{self.label}-{self.fingerprint}"

    @property
    def key(self) -> str:
        """Path of the artifact directory relative to the store root."""
        return f"{self.stage}/{self.name}"

    def __str__(self) -> str:
        return self.key

    @classmethod
    def parse(cls, text: str) -> "ArtifactRef":
        """Parse the full form `stage/label-fingerprint` (prefixes and aliases: see the store)."""
        stage, sep, name = text.strip().strip("/").partition("/")
        label, dash, fp = name.rpartition("-")
        if not sep or not dash:
            raise ValueError(f"not an artifact ref: {text!r} (expected stage/label-fingerprint)")
        return cls(stage, label, fp)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "label": self.label, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict) -> "ArtifactRef":
        return cls(d["stage"], d["label"], d["fingerprint"])


@dataclass(frozen=True)
class FileEntry:
    path: str  # POSIX path relative to the artifact directory
    size: int
    sha256: str

    def __post_init__(self):
        if not isinstance(self.path, str):
            raise ValueError(f"artifact file path must be a string, got {self.path!r}")
        p = PurePosixPath(self.path)
        if p.is_absolute() or ".." in p.parts or self.path in ("", "."):
            raise ValueError(f"artifact file path must be relative and inside the artifact: {self.path!r}")
        if type(self.size) is not int or self.size < 0:
            raise ValueError(f"{self.path}: size must be a non-negative integer, got {self.size!r}")
        if not isinstance(self.sha256, str) or not _SHA_RE.match(self.sha256):
            raise ValueError(f"{self.path}: sha256 must be 64 lowercase hex chars, got {self.sha256!r}")


@dataclass
class Manifest:
    stage: str
    label: str
    fingerprint: str
    code_version: str
    identity: dict
    runtime: dict
    inputs: dict[str, ArtifactRef]  # input name -> artifact it was built from
    files: list[FileEntry]
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.stage, self.label, self.fingerprint)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(f"{self.ref}: no file {path!r} in the manifest")

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "stage": self.stage,
            "label": self.label,
            "fingerprint": self.fingerprint,
            "code_version": self.code_version,
            "identity": self.identity,
            "runtime": self.runtime,
            "inputs": {k: v.to_dict() for k, v in sorted(self.inputs.items())},
            "files": [dataclasses.asdict(f) for f in sorted(self.files, key=lambda f: f.path)],
            "metrics": self.metrics,
            "provenance": self.provenance,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, ensure_ascii=False, default=str) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        """The manifest a parsed MANIFEST.json describes; CorruptManifestError (one line) if any field
        is missing or of the wrong type."""
        try:
            if d.get("version") != MANIFEST_VERSION:
                raise ValueError(f"unsupported manifest version {d.get('version')!r}")
            for key, kind in _SCHEMA.items():
                if key not in d:
                    if key in ("metrics", "provenance"):  # optional
                        continue
                    raise ValueError(f"missing field {key!r}")
                if not isinstance(d[key], kind):
                    raise ValueError(f"field {key!r} must be a JSON {_JSON_NAMES[kind]}, got {d[key]!r:.60}")
            files = []
            for i, f in enumerate(d["files"]):
                if not isinstance(f, dict) or set(f) != {"path", "size", "sha256"}:
                    raise ValueError(f"files[{i}] must be an object with path, size and sha256, got {f!r}")
                files.append(FileEntry(**f))
            if len({f.path for f in files}) != len(files):
                raise ValueError("the same file is listed twice")
            inputs = {}
            for k, v in d["inputs"].items():
                if not isinstance(v, dict) or not all(isinstance(v.get(x), str) for x in ("stage", "label", "fingerprint")):
                    raise ValueError(f"inputs.{k} must be an object with stage, label and fingerprint, got {v!r}")
                inputs[k] = ArtifactRef.from_dict(v)
            m = cls(stage=d["stage"], label=d["label"], fingerprint=d["fingerprint"], code_version=d["code_version"],
                    identity=d["identity"], runtime=d["runtime"], inputs=inputs, files=files,
                    metrics=d.get("metrics", {}), provenance=d.get("provenance", {}))
            m.ref  # validates stage/label/fingerprint
            return m
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptManifestError(f"corrupt manifest: {e}") from e

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> "Manifest":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CorruptManifestError(f"corrupt manifest at {where}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CorruptManifestError(f"corrupt manifest at {where}: expected a JSON object")
        try:
            return cls.from_dict(d)
        except CorruptManifestError as e:
            raise CorruptManifestError(f"{e} (at {where})") from e


class CorruptManifestError(ValueError):
    """A MANIFEST.json exists but cannot be read: the artifact is not trusted as committed."""
