"""Where a project's data lives: one resolution the CLI, the worker's flow runs and the tests share.

    nanorun config                 # each setting, its value and where it came from
    nanorun config --init          # write ./nanorun.toml naming ../shared/data beside the checkout
    NANORUN_CONFIG=/etc/nanorun.toml nanorun speedrun --plan   # another settings file

Layers, lowest first: defaults < the settings file < environment variables < command-line flags.
The settings file is $NANORUN_CONFIG when set (it must exist), else `nanorun.toml` in the working
directory, else `nanorun.toml` at the root of a local store. A worker runs its flows in the
checkout (prefect.yaml's pull step), so a `nanorun.toml` there serves the CLI and the UI alike: the
same recipe plans the same fingerprints from both (docs/settings.md). Relative paths in the file
are relative to the file. Keys:

    store = "/mnt/runs"                       # or "s3://bucket/prefix"       (env NANORUN_STORE)
    eval_bundle = "../shared/data/eval_bundle"  # CORE bundle dir/zip or URL (env NANORUN_EVAL_BUNDLE)
    chat_data = "../shared/data/chat"          # SFT / chat-eval files       (env NANORUN_CHAT_DATA)

No torch, no prefect: `nanorun config` stays instant.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "nanorun.toml"
CONFIG_ENV = "NANORUN_CONFIG"
# setting -> (environment variable, what the default means)
KEYS = {
    "store": ("NANORUN_STORE", "the local root $NANORUN_HOME"),
    "eval_bundle": ("NANORUN_EVAL_BUNDLE", "none: the public URL (CORE is skipped when it cannot be had)"),
    "chat_data": ("NANORUN_CHAT_DATA", "none: the tasks that need no files"),
}
PATH_KEYS = ("store", "eval_bundle", "chat_data")
SHARED_DIRS = {"eval_bundle": "eval_bundle", "chat_data": "chat"}  # what --init looks for in ../shared/data


def _error(msg: str) -> Exception:
    from stages.base import ConfigError  # a user error: the CLI prints one line and exits 2

    return ConfigError(msg)


@dataclass(frozen=True)
class Setting:
    value: str | None
    source: str  # "default", "FILE", "env NAME" or "--flag"


def _is_url(value: str) -> bool:
    return "://" in value


def _read_file(path: Path) -> dict[str, str]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise _error(f"settings file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise _error(f"settings file {path}: not valid TOML ({e})") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise _error(f"settings file {path}: unknown key(s) {unknown}; known: {', '.join(KEYS)}")
    out = {}
    for key, value in data.items():
        if not isinstance(value, str) or not value:
            raise _error(f"settings file {path}: {key} must be a non-empty string, got {value!r}")
        if key in PATH_KEYS and not _is_url(value):  # relative to the file, wherever it is read from
            value = os.path.normpath((path.parent / Path(value).expanduser()).absolute())
        out[key] = value
    return out


def settings_file(store: str | None = None) -> Path | None:
    """The settings file in use: $NANORUN_CONFIG, ./nanorun.toml, else <local store root>/nanorun.toml."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise _error(f"{CONFIG_ENV}={explicit}: no such settings file")
        return path.absolute()
    candidates = [Path.cwd() / FILE_NAME]
    if store and not _is_url(store):
        candidates.append(Path(store).expanduser() / FILE_NAME)
    return next((p.absolute() for p in candidates if p.is_file()), None)


def resolve(flags: dict[str, str | None] | None = None) -> tuple[dict[str, Setting], Path | None]:
    """(every setting with its source, the settings file read): defaults < settings file < env vars <
    flags (None = not given)."""
    flags = flags or {}
    out = {key: Setting(None, "default") for key in KEYS}

    def above_file(key: str) -> Setting | None:
        if flags.get(key):
            return Setting(flags[key], f"--{key.replace('_', '-')}")
        env = KEYS[key][0]
        if os.environ.get(env):
            return Setting(os.environ[env], f"env {env}")
        return None

    store = above_file("store")
    if store is None:  # the default root may hold the settings file too
        from artifacts.store import nanorun_home

        root = str(nanorun_home())
    else:
        root = store.value
    path = settings_file(root)
    file_values = _read_file(path) if path else {}
    for key in KEYS:
        if (s := above_file(key)) is not None:
            out[key] = s
        elif key in file_values:
            out[key] = Setting(file_values[key], str(path))
    return out, path


def value(key: str, flag: str | None = None) -> str | None:
    """One setting's value (flag first); what speedrun_steps and the CLI's --store default use."""
    return resolve({key: flag})[0][key].value


def init_file(directory: Path, shared: Path) -> tuple[Path, list[str] | None]:
    """Write directory/nanorun.toml naming the folders of `shared` that exist (relative to the file),
    unless the file exists. Returns (path, the lines written, or None when it was left alone)."""
    path = directory / FILE_NAME
    if path.exists():
        return path, None
    lines = [f'{key} = "{os.path.relpath(shared / sub, directory)}"'
             for key, sub in SHARED_DIRS.items() if (shared / sub).is_dir()]
    path.write_text("# nanorun settings (pipeline/settings.py); `nanorun config` shows what is in effect\n"
                    + "".join(line + "\n" for line in lines))
    return path, lines
