"""Export bundles: a trained model as a self-contained folder that loads with no training state.

    from core.export import export_bundle, load
    info = export_bundle("run/checkpoints/step_000200", "run/tokenizer", "bundle/")   # what the export stage does
    model, tokenizer, gen = load("bundle/")              # anywhere: no store, no optimizer, no run config
    engine = Engine(model, tokenizer)
    for column, _ in engine.generate(render_chat(tokenizer, msgs), temperature=gen.temperature, top_k=gen.top_k): ...

A bundle (format "nanorun-gpt", version 1):
    model.safetensors        the weights only (fp32 master weights, or bf16/fp16 when exported so)
    config.json              format + version, architecture (GPTConfig.to_dict()), kind (base | sft), step,
                             parameter counts, weights dtype/size, tokenizer vocab + sha256, lineage refs
    tokenizer.json           the tokenizer the model was trained with, byte for byte (+ token_bytes.npy)
    generation_config.json   sampling defaults, stop tokens by name and id, bos, context length
    README.md                the model card
Why safetensors and not torch.save: a pickle runs code on load, safetensors is plain tensors (and
memory-maps), so a bundle from anywhere is safe to open. Why the tokenizer's sha256: a bundle is a
folder people copy around; swapping tokenizer.json for another one of the same vocab size would
silently produce garbage, so load() refuses it (the store-side equivalent is check_tokenizer).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

FORMAT = "nanorun-gpt"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation_config.json"
CARD_FILE = "README.md"
TOKENIZER_FILES = ("tokenizer.json", "token_bytes.npy")
BUNDLE_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILES[0], GENERATION_FILE)
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What the engine stops on (core/engine.py): the end of the assistant's turn, or a new document.
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")


class BundleError(ValueError):
    """A folder is not a (complete, consistent, known-version) export bundle; the message says what to do."""


@dataclass
class GenerationConfig:
    """Sampling defaults shipped with a bundle (the chat CLI and web server use them when not told)."""

    temperature: float = 0.6
    top_k: int | None = 50          # None or 0 = off
    top_p: float | None = None      # None or 1 = off
    max_tokens: int = 512
    context_length: int = 2048      # the model's training sequence length: prompt + reply should fit
    bos_token: str = "<|bos|>"
    bos_token_id: int = -1
    stop_tokens: list[str] = field(default_factory=lambda: list(STOP_TOKENS))
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"generation temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"generation top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"generation top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1 or self.context_length < 1:
            raise ValueError(f"generation max_tokens and context_length must be >= 1, got "
                             f"{self.max_tokens} and {self.context_length}")
        if self.stop_token_ids and len(self.stop_tokens) != len(self.stop_token_ids):  # [] = ids not known
            raise ValueError(f"generation stop_tokens {self.stop_tokens} and stop_token_ids {self.stop_token_ids} "
                             "must name the same tokens")

    @classmethod
    def for_tokenizer(cls, tokenizer, context_length: int, **sampling) -> "GenerationConfig":
        return cls(context_length=context_length, bos_token="<|bos|>", bos_token_id=tokenizer.bos_token_id,
                   stop_tokens=list(STOP_TOKENS), stop_token_ids=[tokenizer.encode_special(n) for n in STOP_TOKENS],
                   **sampling)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})  # newer optional keys are ignored


# --------------------------------------------------------------------------------------------
# Writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def export_bundle(checkpoint_dir: Path | str, tokenizer_dir: Path | str, out: Path | str, *,
                  dtype: str = "float32", generation: dict | None = None, tokenizer_fingerprint: str | None = None,
                  lineage: dict | None = None, title: str | None = None, card_sections: list[str] = ()) -> dict:
    """Write a bundle for the model in `checkpoint_dir` (core.checkpoint layout) and the tokenizer in
    `tokenizer_dir` into `out`; returns config.json's contents plus {"files": {name: bytes}}.

    dtype: how the weights are stored (float32 = the master weights exactly; bfloat16/float16 halve
    the size). generation: GenerationConfig sampling fields (temperature, top_k, top_p, max_tokens).
    tokenizer_fingerprint: the tokenizer artifact's fingerprint, checked against the one the model
    was trained with. lineage: refs the model came from (recorded in config.json). card_sections:
    Markdown appended to the model card (training report, evaluations)."""
    from safetensors.torch import save_file

    from core.checkpoint import check_tokenizer, load_model
    from core.tokenizer import Tokenizer

    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: use one of {', '.join(WEIGHT_DTYPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(tokenizer_dir)
    tokenizer = Tokenizer.from_directory(tok_dir)
    model, meta = load_model(Path(checkpoint_dir), device="cpu", dtype=torch.float32)
    check_tokenizer(meta, tokenizer_fingerprint, tokenizer.vocab_size, "export")
    config = model.config
    if config.vocab_size != tokenizer.vocab_size:
        raise BundleError(f"export: the model has a {config.vocab_size}-token vocabulary but the tokenizer "
                          f"has {tokenizer.vocab_size}: pass the tokenizer the model was trained with")
    gen = GenerationConfig.for_tokenizer(tokenizer, config.sequence_len, **(generation or {}))

    # Weights only (never optimizer or loop state). Non-float tensors keep their dtype.
    target = WEIGHT_DTYPES[dtype]
    tensors = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    part = out / (WEIGHTS_FILE + ".part")
    # One metadata key only: safetensors writes the metadata map in hash order, so several keys would
    # make the same weights a different file (and sha256) on every export. Our format lives in config.json.
    save_file(tensors, str(part), metadata={"format": "pt"})
    os.replace(part, out / WEIGHTS_FILE)
    del tensors
    # The tokenizer's own files, byte for byte (what the model was trained with).
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out / name)
    if not (out / TOKENIZER_FILES[1]).is_file():
        tokenizer.save(out)

    counts = model.param_counts()
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": config.to_dict(),
        "kind": meta.get("kind", "base"),
        "step": meta.get("step"),
        "num_params": counts["total"],
        "num_scaling_params": model.num_scaling_params(),
        "param_counts": counts,
        "weights": {"file": WEIGHTS_FILE, "dtype": dtype, "bytes": (out / WEIGHTS_FILE).stat().st_size},
        "tokenizer": {"file": TOKENIZER_FILES[0], "vocab_size": tokenizer.vocab_size,
                      "sha256": _sha256(out / TOKENIZER_FILES[0]),
                      "fingerprint": (meta.get("tokenizer") or {}).get("fingerprint") or tokenizer_fingerprint},
        "lineage": dict(lineage or {}),
    }
    _write_json(out / CONFIG_FILE, info)
    _write_json(out / GENERATION_FILE, gen.to_dict())
    (out / CARD_FILE).write_text(model_card(info, gen, title=title, sections=card_sections))
    return {**info, "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}}


def _n(v) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v)


def model_card(info: dict, gen: GenerationConfig, *, title: str | None = None, sections: list[str] = ()) -> str:
    """README.md of a bundle: what the model is, how to load it, then the given sections."""
    a, kind = info["architecture"], info["kind"]
    what = {"sft": "a chat model (supervised fine-tuned)", "base": "a base (pretrained, not chat-tuned) model",
            "rl": "a chat model (supervised fine-tuned, then reinforcement learning on GSM8K)"}.get(kind, f"a {kind} model")
    title = title or f"nanorun GPT d{a['n_layer']} ({kind})"
    out = [f"# {title}", "",
           f"{what.capitalize()} in the nanochat architecture, exported by nanorun "
           f"(bundle format {info['format']} v{info['format_version']}). This folder is self-contained: "
           "weights, architecture, tokenizer and sampling defaults; no optimizer or training state.", "",
           "## Architecture", "",
           "| | |", "|---|---|",
           f"| layers / width / heads (kv) | {a['n_layer']} / {a['n_embd']} / {a['n_head']} ({a['n_kv_head']}) |",
           f"| context length | {a['sequence_len']} (sliding-window pattern {a['window_pattern']}) |",
           f"| vocabulary | {a['vocab_size']} (padded to a multiple of {a['pad_vocab_to']}) |",
           f"| parameters | {_n(info['num_params'])} total, {_n(info['num_scaling_params'])} in matrices + lm_head |",
           f"| weights | `{info['weights']['file']}`, {info['weights']['dtype']}, "
           f"{_n(info['weights']['bytes'])} bytes |",
           f"| training step | {info['step']} |", "",
           "GPT with untied embedding / lm_head, parameter-free RMSNorm (QK-norm), RoPE (base "
           f"{a['rope_base']:g}), ReLU² MLP, value embeddings on alternating layers, per-layer residual "
           f"scalars, smear and backout; logits soft-capped at {a['softcap']:g}.", "",
           "## Tokenizer", "",
           f"Byte-level BPE, {info['tokenizer']['vocab_size']} tokens (`tokenizer.json`, HF `tokenizers` format; "
           f"sha256 `{info['tokenizer']['sha256'][:16]}…`), trained as tokenizer artifact "
           f"`{info['tokenizer'].get('fingerprint') or 'unknown'}`. Chat turns: `<|bos|><|user_start|>…<|user_end|>"
           "<|assistant_start|>…<|assistant_end|>`.", "",
           "## Generation defaults", "",
           f"temperature {gen.temperature}, top-k {gen.top_k or 'off'}, top-p {gen.top_p or 'off'}, "
           f"at most {gen.max_tokens} new tokens; stops on {', '.join(f'`{t}`' for t in gen.stop_tokens)} "
           f"(ids {gen.stop_token_ids}); `generation_config.json`.", ""]
    if info.get("lineage"):
        out += ["## Lineage", "", "| role | artifact |", "|---|---|"]
        out += [f"| {role} | `{ref}` |" for role, ref in info["lineage"].items()]
        out.append("")
    out += ["## How to load", "", "```python",
            "from core.export import load",
            "from core.engine import Engine, render_chat",
            "model, tokenizer, gen = load(\"path/to/this/folder\")      # device=\"cuda\" on a GPU",
            "engine = Engine(model, tokenizer)",
            "prompt = render_chat(tokenizer, [{\"role\": \"user\", \"content\": \"Hello!\"}])",
            "tokens, _ = engine.generate_batch(prompt, max_tokens=gen.max_tokens, temperature=gen.temperature, "
            "top_k=gen.top_k)",
            "print(tokenizer.decode(tokens[0][len(prompt):]))",
            "```", "",
            "or `nanorun chat path/to/this/folder` / `nanorun serve path/to/this/folder`.", ""]
    for s in sections:
        out += [s.rstrip(), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Reading


def read_config(path: Path | str) -> dict:
    """config.json of the bundle at `path`, checked to be a bundle of a version this code reads."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path} is not a directory: an export bundle is a folder (config.json, "
                          f"{WEIGHTS_FILE}, tokenizer.json, ...)")
    f = path / CONFIG_FILE
    if not f.is_file():
        raise BundleError(f"{path} is not an export bundle: it has no {CONFIG_FILE} (make one with "
                          "`nanorun stage export --input model=... --input tokenizer=...`, then `nanorun pull`)")
    try:
        info = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{f} is not valid JSON ({e}): the bundle is damaged; export or pull it again") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else None
        raise BundleError(f"{path} is not a nanorun export bundle: {CONFIG_FILE} has format {got!r}, expected "
                          f"{FORMAT!r} (a folder from another library needs its own loader)")
    version = info.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{f}: bad format_version {version!r}: the bundle is damaged; export it again")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path} is a {FORMAT} bundle of format version {version}, but this nanorun reads "
                          f"versions up to {FORMAT_VERSION}: upgrade nanorun (or re-export with this version)")
    missing = [n for n in BUNDLE_FILES if not (path / n).is_file()]
    if missing:
        raise BundleError(f"{path} is an incomplete export bundle: missing {', '.join(missing)}; "
                          "copy the whole folder (or `nanorun pull` it again)")
    check_config(path, info)
    return info


# The JSON types of the sampling defaults (GenerationConfig checks their ranges).
_GENERATION_TYPES = {"temperature": (int, float), "top_k": (int, type(None)), "top_p": (int, float, type(None)),
                     "max_tokens": (int,), "context_length": (int,)}
_ROPE_BYTES_FREE = 256 << 20  # a rotary table this large is allowed whatever the weights' size


def check_config(path: Path, info: dict) -> None:
    """BundleError unless config.json's architecture and generation_config.json are well-typed and
    describe a model that model.safetensors can hold, checked before anything is allocated: a
    config claiming a huge model would otherwise make load() allocate it first (gigabytes) and only
    then find that the weights do not fit."""
    from core.gpt import GPTConfig, count_params

    arch, where = info.get("architecture"), path / CONFIG_FILE
    if not isinstance(arch, dict):
        raise BundleError(f"{where}: 'architecture' is {type(arch).__name__}, not an object; the bundle is damaged")
    for f in fields(GPTConfig):
        value, kind = arch.get(f.name, f.default), type(f.default)
        ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
        if not ok:
            raise BundleError(f"{where}: architecture.{f.name} is {value!r:.40}, not a {kind.__name__}; "
                              "the bundle is damaged")
    try:
        config = GPTConfig.from_dict(arch)
    except (TypeError, ValueError) as e:
        raise BundleError(f"{where}: bad architecture ({e}); the bundle is damaged") from None
    for key, kinds in (("weights", {"dtype": str, "bytes": int}), ("tokenizer", {"sha256": str})):
        part = info.get(key) or {}
        bad = [k for k, kind in kinds.items() if part.get(k) is not None and not isinstance(part.get(k), kind)] \
            if isinstance(part, dict) else [key]
        if bad:
            raise BundleError(f"{where}: {key} has a field of the wrong type ({', '.join(bad)}); the bundle is damaged")
    dtype = (info.get("weights") or {}).get("dtype", "float32")
    if dtype not in WEIGHT_DTYPES:
        raise BundleError(f"{where}: weights dtype {dtype!r:.40} is not one of {', '.join(WEIGHT_DTYPES)}")
    size = (path / WEIGHTS_FILE).stat().st_size
    needed = count_params(config)["total"] * WEIGHT_DTYPES[dtype].itemsize
    if needed > size:
        raise BundleError(f"{path / WEIGHTS_FILE} is truncated or does not match {CONFIG_FILE}'s architecture: that "
                          f"needs {needed:,} bytes of {dtype} weights, the file holds {size:,}; copy or pull the "
                          "bundle again")
    rope = 10 * config.sequence_len * config.head_dim * 4  # core.gpt: cos + sin over 10 x sequence_len positions
    if rope > max(size, _ROPE_BYTES_FREE):
        raise BundleError(f"{where}: sequence_len {config.sequence_len} needs a {rope:,}-byte rotary table, more "
                          f"than the {size:,}-byte model itself; the bundle is damaged")
    gen_file = path / GENERATION_FILE
    try:
        gen = json.loads(gen_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{gen_file} is not valid JSON ({e}); the bundle is damaged") from None
    if not isinstance(gen, dict):
        raise BundleError(f"{gen_file}: not a JSON object; the bundle is damaged")
    for name, types in _GENERATION_TYPES.items():
        if name in gen and (not isinstance(gen[name], types) or isinstance(gen[name], bool)):
            raise BundleError(f"{gen_file}: {name} is {gen[name]!r:.40}, not a number of the right kind; "
                              "fix it or export the bundle again")
    try:
        GenerationConfig.from_dict(gen)
    except (TypeError, ValueError) as e:
        raise BundleError(f"{gen_file} is invalid ({e}); fix it or export the bundle again") from None


def load(path: Path | str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(GPT in eval mode, Tokenizer, GenerationConfig) from a bundle folder.

    device: where the weights go; dtype: the compute dtype (default: core.common.compute_dtype,
    i.e. bf16 on recent GPUs, fp32 on CPU). Weights stored in bf16/fp16 are upcast into the fp32
    parameters, like a checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from core.gpt import GPTConfig, build_model
    from core.tokenizer import Tokenizer

    path = Path(path)
    info = read_config(path)
    try:
        config = GPTConfig.from_dict(info["architecture"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path / CONFIG_FILE}: bad architecture ({e}); the bundle is damaged") from None
    weights = path / WEIGHTS_FILE
    expected = (info.get("weights") or {}).get("bytes")
    if expected is not None and weights.stat().st_size != expected:
        raise BundleError(f"{weights} is {weights.stat().st_size:,} bytes but the bundle says {expected:,}: "
                          "it is truncated or from another export; copy or pull the bundle again")
    tok_info = info.get("tokenizer") or {}
    if tok_info.get("sha256") and _sha256(path / TOKENIZER_FILES[0]) != tok_info["sha256"]:
        raise BundleError(f"{path / TOKENIZER_FILES[0]} is not the tokenizer this model was exported with "
                          "(sha256 differs): put the bundle's own tokenizer.json back")
    tokenizer = Tokenizer.from_directory(path)
    if tokenizer.vocab_size != config.vocab_size:
        raise BundleError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}: "
                          "the bundle mixes files of two exports")
    device = torch.device(device)
    model = build_model(config, device=device, dtype=dtype, init=False)
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"cannot read {weights}: {e}; copy or pull the bundle again") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise BundleError(f"{weights} does not match {CONFIG_FILE}'s architecture: {' '.join(first[:3])}") from None
    model.eval()
    try:
        gen = GenerationConfig.from_dict(json.loads((path / GENERATION_FILE).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise BundleError(f"{path / GENERATION_FILE} is invalid ({e}); the bundle is damaged") from None
    return model, tokenizer, gen
