"""nanochat checkpoints in and out: read a nanochat run's model and tokenizer, write a nanorun model
in the layout nanochat's scripts load (docs/nanochat.md says what each file holds).

    from core.nanochat import find_checkpoint, read_checkpoint, read_tokenizer, write_nanochat
    found = find_checkpoint(Path("~/.cache/nanochat/base_checkpoints/d4"))   # model_*.pt, meta_*.json, kind
    config, state, meta = read_checkpoint(found)          # GPTConfig, state_dict, nanochat's meta
    tokenizer = read_tokenizer(found.tokenizer_dir)      # a core.tokenizer.Tokenizer, same ids as nanochat's
    write_nanochat("out/", config, state, tokenizer, kind="sft", step=800)   # NANOCHAT_BASE_DIR=out

nanochat's layout under its base dir: tokenizer/{tokenizer.pkl, token_bytes.pt} (a pickled tiktoken
Encoding and the byte length of each token) and {base,chatsft,chatrl}_checkpoints/<tag>/
model_<step:06d>.pt + meta_<step:06d>.json (a torch state_dict and {"step", "model_config", ...}).
Nothing read here can run code: the weights load with torch's weights_only=True and the tokenizer
pickle with an unpickler that admits one class, tiktoken's Encoding, whose state (name, split
pattern, mergeable ranks, special tokens) is all it keeps; tiktoken itself is not needed, neither
to read nor to write (the tokenizer.pkl written equals the file nanochat writes, byte for byte).
Every problem with the files is a NanochatError: one line that says what is wrong and what to do.
"""
from __future__ import annotations

import copyreg
import hashlib
import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from core.gpt import GPTConfig
from core.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

ENCODING_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"
# nanochat's checkpoint folders (checkpoint_manager.load_model) and nanorun's trainer kinds
KIND_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
# the fields of nanochat's GPTConfig; nanorun's other fields must keep their defaults (nanochat fixes them)
CONFIG_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")
_MODEL_RE = re.compile(r"^model_(\d+)\.pt$")


class NanochatError(ValueError):
    """A nanochat directory or file that cannot be read or written as asked (one line)."""


# ---- the tokenizer pickle ------------------------------------------------------------------------


class _EncodingState:
    """What unpickling tiktoken.core.Encoding yields here: its __setstate__ state, nothing else."""

    def __setstate__(self, state):
        self.state = state


class _EncodingUnpickler(pickle.Unpickler):
    # A tiktoken Encoding pickles as NEWOBJ(tiktoken.core.Encoding) + BUILD(a dict of str, bytes and
    # ints): the only global it names is the class. Anything else (os.system, builtins.eval, ...)
    # is how a crafted pickle runs code, so it is refused before it is even looked up.
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise NanochatError(f"tokenizer pickle names {module}.{name}: only tiktoken.core.Encoding is admitted "
                            "(a crafted or foreign pickle is never executed); use nanochat's own tokenizer.pkl")


def read_encoding(path: Path | str) -> dict:
    """The state of a pickled tiktoken Encoding: {"name", "pat_str", "mergeable_ranks", "special_tokens"}."""
    path = Path(path)
    try:
        obj = _EncodingUnpickler(io.BytesIO(path.read_bytes())).load()
    except NanochatError:
        raise
    except FileNotFoundError:
        raise NanochatError(f"no {path.name} in {path.parent}: a nanochat tokenizer directory holds "
                            f"{ENCODING_FILE} and {TOKEN_BYTES_FILE}") from None
    except Exception as e:  # truncated, not a pickle, ...
        raise NanochatError(f"{path} is not a readable pickle ({type(e).__name__}: {str(e)[:120]})") from None
    state = getattr(obj, "state", None)
    if not isinstance(obj, _EncodingState) or not isinstance(state, dict) \
            or not {"pat_str", "mergeable_ranks", "special_tokens"} <= set(state):
        raise NanochatError(f"{path} does not hold a custom tiktoken Encoding (a registered encoding such as "
                            "cl100k_base is pickled by name only and has no nanochat special tokens)")
    return state


class _Encoding:
    """Stands in for tiktoken.core.Encoding when writing: pickles as that class with `state`."""

    def __init__(self, state: dict):
        self.state = state

    def __reduce_ex__(self, protocol):
        return copyreg.__newobj__, (_Encoding,), self.state


class _EncodingPickler(pickle._Pickler):
    # The pure-Python pickler, because its save_global can be replaced: the stock one imports the
    # class's module to check the name, and tiktoken need not be installed. The opcodes written are
    # the ones pickle.dump(encoding) writes, so the file equals nanochat's byte for byte.
    def save_global(self, obj, name=None):
        if obj is not _Encoding:
            raise pickle.PicklingError(f"{obj!r}: only the tokenizer's state is written")
        for part in ("tiktoken.core", "Encoding"):
            self.write(pickle.SHORT_BINUNICODE + bytes([len(part)]) + part.encode())
            self.memoize(part)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def write_encoding(path: Path | str, state: dict) -> None:
    """Write `state` as pickle.dump(tiktoken Encoding) does (protocol 4), without tiktoken."""
    buf = io.BytesIO()
    _EncodingPickler(buf, protocol=4).dump(_Encoding(state))
    Path(path).write_bytes(buf.getvalue())


def read_tokenizer(tokenizer_dir: Path | str) -> Tokenizer:
    """nanochat's tokenizer directory as a nanorun Tokenizer with the same token ids; its
    token_bytes.pt, when present, must agree with the tokenizer (else the directory is mixed up)."""
    d = Path(tokenizer_dir)
    state = read_encoding(d / ENCODING_FILE)
    if state["pat_str"] != SPLIT_PATTERN:
        raise NanochatError(f"{d / ENCODING_FILE}: its split pattern {state['pat_str'][:60]!r}... is not the one "
                            "nanochat (and nanorun) use; nanorun cannot encode like this tokenizer")
    ranks = state["mergeable_ranks"]
    n = len(ranks)
    expected = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    if state["special_tokens"] != expected:
        raise NanochatError(f"{d / ENCODING_FILE}: special tokens {state['special_tokens']} are not nanochat's "
                            f"9 specials after the {n} ordinary tokens")
    try:
        tok = Tokenizer.from_mergeable_ranks(ranks)
    except ValueError as e:
        raise NanochatError(f"{d / ENCODING_FILE}: {e}") from None
    tb = d / TOKEN_BYTES_FILE
    if tb.is_file():
        theirs = load_tensors(tb)
        if not isinstance(theirs, torch.Tensor) or theirs.tolist() != tok.token_bytes().tolist():
            raise NanochatError(f"{tb} does not match {ENCODING_FILE} (byte lengths per token differ): the two "
                                "files come from different tokenizers")
    return tok


def encoding_state(tokenizer: Tokenizer, name: str = "rustbpe") -> dict:
    """A nanorun tokenizer as the state of nanochat's tiktoken Encoding (what write_encoding pickles)."""
    n = tokenizer.vocab_size - len(SPECIAL_TOKENS)
    if tokenizer.bos_token_id != n:
        raise NanochatError(f"the tokenizer's specials do not follow its {n} ordinary tokens: not nanochat's layout")
    merges = len(json.loads(tokenizer.hf.to_str())["model"]["merges"])
    if merges != n - 256:
        # rustbpe can learn a merge that rebuilds a token it already has (core/tokenizer.py keeps it
        # as a second merge into that token); a {bytes: id} table has no place for it
        raise NanochatError(f"the tokenizer has {merges} merges for {n - 256} merged tokens: nanochat's "
                            "tiktoken format cannot carry the extra ones (the ids would differ); not exportable")
    return {"name": name, "pat_str": SPLIT_PATTERN,
            "mergeable_ranks": {tokenizer.decode_bytes([i]): i for i in range(n)},
            "special_tokens": {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}}


# ---- checkpoints ---------------------------------------------------------------------------------


def load_tensors(path: Path):
    """torch.load with weights_only=True (tensors and plain values, never code); one line if not."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a crafted pickle (UnpicklingError), a truncated zip, ...
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise NanochatError(f"{path} cannot be loaded with weights_only=True (tensors only, never code): "
                            f"{reason}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Found:
    """One nanochat checkpoint on disk: its files, the tokenizer directory beside it and its kind."""

    model: Path
    meta: Path
    step: int
    kind: str                  # base | sft | rl
    tokenizer_dir: Path


def find_checkpoint(path: Path | str, *, step: int | None = None, kind: str | None = None,
                    tokenizer_dir: Path | str | None = None) -> Found:
    """A nanochat checkpoint from a base dir (NANOCHAT_BASE_DIR: the largest dN of the kind), a
    checkpoints folder (base_checkpoints/) or a model folder (base_checkpoints/d4/); the newest
    step unless `step`. The kind comes from the folder names unless given; the tokenizer from
    `tokenizer_dir` or the base dir's tokenizer/."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise NanochatError(f"{p} is not a directory: give a nanochat base dir, a *_checkpoints dir or a model dir")
    if kind is not None and kind not in KIND_DIRS:
        raise NanochatError(f"kind {kind!r}: use one of {', '.join(KIND_DIRS)}")
    if not any(_MODEL_RE.match(f.name) for f in p.iterdir()):
        if p.name not in KIND_DIRS.values():  # a base dir: pick the checkpoints folder of the kind
            kinds = [k for k, sub in KIND_DIRS.items() if (p / sub).is_dir()] if kind is None else [kind]
            if len(kinds) != 1 or not (p / KIND_DIRS[kinds[0]]).is_dir():
                raise NanochatError(f"{p} holds {'no' if not kinds else 'several'} nanochat checkpoint folders "
                                    f"({', '.join(KIND_DIRS.values())}): pass --kind or the folder itself")
            p = p / KIND_DIRS[kinds[0]]
        tags = sorted((int(m.group(1)), d) for d in p.iterdir() if (m := re.match(r"^d(\d+)$", d.name)) and d.is_dir())
        if not tags:
            raise NanochatError(f"{p} holds no model folder dN (e.g. d20) with model_*.pt files")
        p = tags[-1][1]  # nanochat's default: the largest model
    steps = sorted(int(m.group(1)) for f in p.iterdir() if (m := _MODEL_RE.match(f.name)))
    if not steps:
        raise NanochatError(f"{p} holds no model_<step>.pt")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise NanochatError(f"{p} has no checkpoint at step {step} (steps: {steps})")
    meta = p / f"meta_{step:06d}.json"
    if not meta.is_file():
        raise NanochatError(f"{p} has model_{step:06d}.pt but no {meta.name}")
    if kind is None:
        kinds = [k for k, sub in KIND_DIRS.items() if p.parent.name == sub]
        if not kinds:
            raise NanochatError(f"cannot tell the kind of {p} (its folder is not one of "
                                f"{', '.join(KIND_DIRS.values())}): pass --kind base|sft|rl")
        kind = kinds[0]
    tok = Path(tokenizer_dir) if tokenizer_dir else p.parent.parent / "tokenizer"
    if not (tok / ENCODING_FILE).is_file():
        raise NanochatError(f"no nanochat tokenizer at {tok} ({ENCODING_FILE}): pass --tokenizer DIR")
    return Found(model=p / f"model_{step:06d}.pt", meta=meta, step=step, kind=kind, tokenizer_dir=tok)


def config_from_meta(meta: dict, where: str) -> GPTConfig:
    """nanochat's model_config as a GPTConfig; a field nanorun's model does not have is refused
    (it would change the forward pass in a way nanorun does not implement)."""
    mc = meta.get("model_config")
    if not isinstance(mc, dict):
        raise NanochatError(f"{where}: no model_config object in the meta")
    unknown = sorted(set(mc) - set(CONFIG_FIELDS))
    if unknown:
        raise NanochatError(f"{where}: model_config field(s) {unknown} are not in the model nanorun implements "
                            f"(it knows {', '.join(CONFIG_FIELDS)}); this nanochat version cannot be imported")
    mc = {"window_pattern": "L", **mc}  # nanochat's own default for checkpoints that predate the field
    try:
        return GPTConfig.from_dict(mc)
    except (TypeError, ValueError) as e:
        raise NanochatError(f"{where}: model_config {mc} is not a valid model ({e})") from None


def read_checkpoint(found: Found) -> tuple[GPTConfig, dict, dict]:
    """(config, fp32 state_dict in nanorun's names, meta) of a nanochat checkpoint."""
    try:
        meta = json.loads(found.meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NanochatError(f"{found.meta} is not readable JSON ({e})") from None
    config = config_from_meta(meta, str(found.meta))
    state = load_tensors(found.model)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NanochatError(f"{found.model} is not a state_dict of tensors")
    # torch.compile'd models save their keys under _orig_mod. (nanochat strips it the same way);
    # embeddings may be bf16 (nanochat keeps them in its compute dtype): master weights are fp32 here
    state = {k.removeprefix("_orig_mod."): v.float() if v.is_floating_point() else v for k, v in state.items()}
    from core.gpt import build_model

    model = build_model(config, device="meta", init=False)
    want = model.state_dict()
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise NanochatError(f"{found.model} does not match its model_config: missing {missing[:4]}, unexpected "
                            f"{extra[:4]} (an older nanochat without resid/x0 lambdas, smear or backout?)")
    bad = [k for k in want if tuple(want[k].shape) != tuple(state[k].shape)]
    if bad:
        raise NanochatError(f"{found.model}: tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, the config "
                            f"needs {tuple(want[bad[0]].shape)}")
    return config, state, meta


def nanochat_config(config: GPTConfig) -> dict:
    """GPTConfig as nanochat's model_config; refuses what nanochat's model cannot express."""
    d = config.to_dict()
    fixed = {k: v for k, v in GPTConfig(**{k: d[k] for k in CONFIG_FIELDS}).to_dict().items() if k not in CONFIG_FIELDS}
    differs = {k: d[k] for k, v in fixed.items() if d[k] != v}
    if differs:
        raise NanochatError(f"model config {differs} differs from what nanochat hard-codes {fixed}: "
                            "nanochat could not run this model")
    return {k: d[k] for k in CONFIG_FIELDS}


def write_nanochat(out: Path | str, config: GPTConfig, state: dict, tokenizer: Tokenizer, *, kind: str,
                   step: int, meta_extra: dict | None = None) -> Path:
    """Write a nanochat base dir: tokenizer/ and <kind>_checkpoints/d<n_layer>/model_+meta_<step>.
    Returns the model folder. Weights are written as given (fp32 masters: nanochat casts on load)."""
    if kind not in KIND_DIRS:
        raise NanochatError(f"kind {kind!r}: use one of {', '.join(KIND_DIRS)}")
    model_config = nanochat_config(config)
    if tokenizer.vocab_size != config.vocab_size:
        raise NanochatError(f"tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}")
    out = Path(out)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    write_encoding(tok_dir / ENCODING_FILE, encoding_state(tokenizer))
    torch.save(tokenizer.token_bytes(), tok_dir / TOKEN_BYTES_FILE)
    model_dir = out / KIND_DIRS[kind] / f"d{config.n_layer}"
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, model_dir / f"model_{step:06d}.pt")
    meta = {"step": step, "model_config": model_config, **(meta_extra or {})}
    (model_dir / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return model_dir
