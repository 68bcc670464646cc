"""`nanorun chat` and `nanorun serve`: talk to a trained model in the terminal or in the browser.

    nanorun chat                                        # export@latest, else sft@latest; interactive
    nanorun chat sft@latest -p "Why is the sky blue?"   # one shot: the reply on stdout
    nanorun chat pretrain@latest --temperature 0        # a base model works too (with a warning)
    nanorun chat ./my-model                             # a bundle folder (nanorun pull export@latest --to my-model)
    nanorun --store s3://bucket/runs chat export@latest # pulled from S3 on first use, sha256-verified
    nanorun serve [REF] [--host 127.0.0.1] [--port 8000] [--workers 1] [--max-queue 8] [--device cuda]
    NANORUN_SERVE_TOKEN=... nanorun serve --host 0.0.0.0 --allow-host chat.example.org   # others may connect

REF is anything the store resolves (stage/label-fp, a fingerprint prefix, stage@alias) naming an
export bundle, an sft or a pretrain artifact, or a local bundle folder. Both commands load through
find_chat_model() / load_chat_model(), also usable from Python:

    from cli.chat_commands import load_chat_model
    engine, tokenizer, name = load_chat_model("sft@latest", open_store(), device="cpu")

Sampling defaults come from the bundle's generation_config.json (checkpoints: temperature 0.6,
top-k 50, 512 tokens); flags override them. A model that cannot be found or loaded is one line and
exit 2 (ModelLoadError is a StoreError), before any server starts.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from artifacts.errors import StoreError, UnknownRefError

log = logging.getLogger("nanorun.chat")
DEFAULT_REFS = ("export@latest", "sft@latest")  # what `nanorun chat` talks to when given no REF


class ModelLoadError(StoreError):
    """A ref or folder does not hold a model we can chat with (the message says what would)."""


@dataclass
class ChatModel:
    """A model found in a store or folder, ready to load once per replica (files are local already)."""

    name: str                     # shown to the user: a short ref (sft/d4-3f2a1b2c) or the folder's name
    kind: str                     # base | sft | rl
    path: Path                    # the bundle folder, or the checkpoint directory (step_NNNNNN)
    bundle: bool
    tokenizer_dir: Path | None = None          # checkpoints only: the tokenizer artifact's files
    tokenizer_fingerprint: str | None = None
    generation: dict = field(default_factory=dict)  # temperature, top_k, max_tokens defaults
    num_params: int | None = None

    def load(self, device: str = "cpu", dtype=None):
        """(Engine, Tokenizer) on `device`; ModelLoadError for a damaged or mismatched model."""
        from core.engine import Engine, inference_weights

        try:
            if self.bundle:
                from core.export import load

                model, tokenizer, _ = load(self.path, device=device, dtype=dtype)
            else:
                from core.checkpoint import check_tokenizer, load_model
                from core.tokenizer import Tokenizer

                tokenizer = Tokenizer.from_directory(self.tokenizer_dir)
                model, meta = load_model(self.path, device=device, dtype=dtype)
                check_tokenizer(meta, self.tokenizer_fingerprint, tokenizer.vocab_size, self.name)
        except (ValueError, OSError) as e:  # BundleError, TokenizerMismatchError, a damaged checkpoint
            raise ModelLoadError(f"cannot load {self.name}: {e}") from e
        return Engine(inference_weights(model), tokenizer), tokenizer


def short_name(ref) -> str:
    return f"{ref.stage}/{ref.label}-{ref.fingerprint[:8]}"


def _from_bundle(path: Path, name: str) -> ChatModel:
    import json

    from core.export import GENERATION_FILE, BundleError, read_config

    try:
        info = read_config(path)
        gen = json.loads((path / GENERATION_FILE).read_text())
    except (BundleError, ValueError) as e:
        raise ModelLoadError(str(e)) from None
    return ChatModel(name=name, kind=info.get("kind", "base"), path=path, bundle=True,
                     num_params=info.get("num_params"),
                     generation={k: gen[k] for k in ("temperature", "top_k", "max_tokens") if k in gen})


def _from_ref(ref, store) -> ChatModel:
    from core.export import CONFIG_FILE, WEIGHTS_FILE
    from core.layouts import CHECKPOINT_POINTER, model_checkpoint, tokenizer_dir

    m = store.require(ref)
    files = {f.path for f in m.files}
    name = short_name(ref)
    if {CONFIG_FILE, WEIGHTS_FILE} <= files:
        return _from_bundle(store.materialize(ref), name)
    if CHECKPOINT_POINTER not in files:
        raise ModelLoadError(f"{ref} is a {ref.stage} artifact, which holds no model: give an export, sft or "
                             "pretrain artifact (`nanorun ls export`, `nanorun ls sft`) or a bundle folder")
    tok_ref = m.inputs.get("tokenizer")
    if tok_ref is None:
        raise ModelLoadError(f"{ref} does not name the tokenizer it was trained with (no 'tokenizer' input): "
                             "export it with `nanorun stage export --input model=... --input tokenizer=...`")
    # S3: both are downloaded (resumably) and sha256-verified into the machine's cache on first use.
    return _trainer_model(name, model_checkpoint(store.materialize(ref)), tokenizer_dir(store.materialize(tok_ref)),
                          tok_ref.fingerprint)


def _from_pulled(path: Path, tokenizer: str | None, store) -> ChatModel:
    """A trainer artifact (sft, rl, pretrain) copied out with `nanorun pull`: its checkpoint from the
    folder, its tokenizer from --tokenizer (a folder or a ref), else the one its manifest names,
    from the store."""
    from artifacts import StoreError
    from artifacts.manifest import MANIFEST_NAME, Manifest
    from core.layouts import model_checkpoint, tokenizer_dir

    m = Manifest.from_json((path / MANIFEST_NAME).read_text(), where=str(path / MANIFEST_NAME))
    tok_ref = m.inputs.get("tokenizer")
    if tokenizer and Path(tokenizer).expanduser().is_dir():
        from artifacts.local import require_intact_folder

        require_intact_folder(Path(tokenizer).expanduser())
        tok_dir = tokenizer_dir(Path(tokenizer).expanduser())
    else:
        if store is None:
            from artifacts import open_store

            store = open_store()
        try:
            tok_dir = tokenizer_dir(store.materialize(store.resolve(tokenizer) if tokenizer else tok_ref))
        except (StoreError, TypeError) as e:
            raise ModelLoadError(f"{path} is a pulled {m.stage} artifact whose tokenizer ({tok_ref}) is not in "
                                 f"{store.url}: pull it too (`nanorun pull {tok_ref} --to DIR`) and pass --tokenizer "
                                 f"DIR ({e})") from None
    return _trainer_model(path.name, model_checkpoint(path), tok_dir, tok_ref.fingerprint if tok_ref else None)


def _trainer_model(name: str, ckpt: Path, tok_dir: Path, tok_fingerprint: str | None) -> ChatModel:
    from core.checkpoint import load_checkpoint

    meta = load_checkpoint(ckpt).meta
    n = None
    if "model_config" in meta:
        from core.gpt import GPTConfig, count_params

        n = count_params(GPTConfig.from_dict(meta["model_config"]))["total"]
    return ChatModel(name=name, kind=meta.get("kind", "base"), path=ckpt, bundle=False, tokenizer_dir=tok_dir,
                     tokenizer_fingerprint=tok_fingerprint, num_params=n)


def find_chat_model(text: str | None, store, tokenizer: str | None = None) -> ChatModel:
    """Resolve REF (None: export@latest, then sft@latest), an export bundle folder or a pulled
    trainer artifact folder (sft, rl, pretrain; tokenizer: see _from_pulled) to a loadable model."""
    from core.layouts import CHECKPOINT_POINTER

    if text is not None and Path(text).expanduser().exists():
        from artifacts.local import require_intact_folder

        path = Path(text).expanduser().absolute()
        require_intact_folder(path)  # a pulled folder carries its manifest: damage is refused here too
        pulled = (path / CHECKPOINT_POINTER).is_file()
        found = _from_pulled(path, tokenizer, store) if pulled else _from_bundle(path, path.name)
    else:
        if store is None:
            from artifacts import open_store

            store = open_store()
        if text is None:
            for candidate in DEFAULT_REFS:
                try:
                    ref = store.resolve(candidate)
                except UnknownRefError:
                    continue
                log.info("no model named: using %s = %s", candidate, ref)
                break
            else:
                raise ModelLoadError(f"no model to chat with in {store.url}: neither export@latest nor sft@latest "
                                     "exists; name one (an export, sft or pretrain ref, e.g. pretrain@latest for "
                                     "a base model; `nanorun ls` lists them), or run `nanorun speedrun` first")
        else:
            try:
                ref = store.resolve(text)
            except UnknownRefError as e:
                if text.startswith((".", "/", "~")):
                    raise ModelLoadError(f"{text} is neither a folder nor an artifact ref ({e})") from None
                raise
        found = _from_ref(ref, store)
    from core.layouts import CHAT_KINDS

    if found.kind not in CHAT_KINDS:
        log.warning("%s is a %s model, not chat-tuned: expect it to continue text rather than answer "
                    "(chat with an sft or export artifact for a chat model)", found.name, found.kind)
    return found


def load_chat_model(text: str | None, store, device: str = "cpu"):
    """(Engine, Tokenizer, display name) for REF / a bundle folder / the default (see find_chat_model)."""
    found = find_chat_model(text, store)
    engine, tokenizer = found.load(device)
    return engine, tokenizer, found.name


# ---- the subcommands ---------------------------------------------------------------------------------
def _common_arguments(p) -> None:
    p.add_argument("ref", nargs="?", metavar="REF",
                   help="export/sft/rl/pretrain artifact (ref, fingerprint prefix, stage@alias), an export bundle "
                        "folder or a folder from `nanorun pull` (default: export@latest, else sft@latest)")
    p.add_argument("--tokenizer", metavar="DIR|REF",
                   help="for a pulled trainer folder: its tokenizer (default: the one its manifest names, from the store)")
    p.add_argument("--device", default="", help="cpu | cuda | mps (default: autodetect)")
    p.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default: the model's)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens, 0 = off (default: the model's)")
    p.add_argument("--max-tokens", type=int, help="at most this many new tokens per reply (default: the model's)")


def _store_for(args):
    from artifacts import open_store

    from core.layouts import CHECKPOINT_POINTER

    folder = Path(args.ref).expanduser() if args.ref else None
    if folder is not None and folder.exists() and not (folder / CHECKPOINT_POINTER).is_file():
        return None  # an export bundle folder needs no store (a pulled trainer folder may: its tokenizer)
    return open_store(args.store)


def _sampling(args, found: ChatModel) -> dict:
    from stages.base import ConfigError

    gen = {"temperature": 0.6, "top_k": 50, "max_tokens": 512, **found.generation}
    for key in gen:
        if getattr(args, key, None) is not None:
            gen[key] = getattr(args, key)
    if not 0 <= gen["temperature"] <= 2:
        raise ConfigError(f"--temperature {gen['temperature']}: between 0 (greedy) and 2")
    if gen["top_k"] is not None and gen["top_k"] < 0:
        raise ConfigError(f"--top-k {gen['top_k']}: 0 (off) or more")
    if gen["max_tokens"] < 1:
        raise ConfigError(f"--max-tokens {gen['max_tokens']}: at least 1")
    return gen


def _device(name: str) -> str:
    from core.common import autodetect_device

    return name or autodetect_device()


class Chat:
    @staticmethod
    def add_arguments(p):
        _common_arguments(p)
        p.add_argument("-p", "--prompt", help="answer this one message and exit (the reply goes to stdout)")
        p.add_argument("--seed", type=int, help="sampling seed of the first reply (default: random)")

    @staticmethod
    def run(args) -> int:
        from core.chat_cli import check_text, run_chat
        from stages.base import ConfigError

        if args.prompt is not None:
            try:
                check_text(args.prompt, "the prompt (-p)")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        found = find_chat_model(args.ref, _store_for(args), args.tokenizer)
        gen = _sampling(args, found)
        device = _device(args.device)
        engine, tokenizer = found.load(device)
        if args.prompt is None:
            params = f", {found.num_params / 1e6:.1f}M params" if found.num_params else ""
            print(f"{found.name} ({found.kind}{params}) on {device}", file=sys.stderr)
        try:
            run_chat(engine, tokenizer, prompt=args.prompt, temperature=gen["temperature"], top_k=gen["top_k"],
                     max_tokens=gen["max_tokens"], seed=args.seed, input_fn=input, output=sys.stdout)
        except ValueError as e:  # one shot: the prompt alone does not fit the context
            raise ConfigError(str(e).replace("type `clear` to start a new one", "shorten the prompt")) from None
        return 0


def replica_devices(device: str, workers: int) -> list[str]:
    """One device per worker: a bare 'cuda' spreads the replicas over the visible GPUs."""
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        if n > 1:
            return [f"cuda:{i % n}" for i in range(workers)]
    return [device] * workers


def _check_port_free(host: str, port: int) -> None:
    import socket

    from stages.base import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: cannot resolve it ({e})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as uvicorn sets it: a port left in TIME_WAIT by the last server is free, one
        # that something listens on is not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}): stop what uses it or pass "
                              f"--port with a free one") from None


class Serve:
    @staticmethod
    def add_arguments(p):
        _common_arguments(p)
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
        p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
        p.add_argument("--workers", type=int, default=1, help="model replicas generating in parallel (default 1)")
        p.add_argument("--max-queue", type=int, default=8,
                       help="requests that may wait for a worker; more get 503 at once (default 8)")
        p.add_argument("--token", default=os.environ.get("NANORUN_SERVE_TOKEN"),
                       help="require this bearer token (API: 'Authorization: Bearer T'; browser: open /?token=T "
                            "once); required with a non-loopback --host (default: env NANORUN_SERVE_TOKEN)")
        p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="a Host name clients use to reach the server, besides loopback names, IP addresses "
                            "and --host (repeatable; '*' accepts any: no DNS-rebinding protection)")
        p.add_argument("--max-body", type=int, metavar="BYTES",
                       help="largest request body; larger is 413 (default 1 MiB, core.web.MAX_BODY)")
        p.add_argument("--docs", action="store_true", help="also serve the API docs at /docs and /openapi.json")

    @staticmethod
    def run(args) -> int:
        from core.web import MAX_BODY, create_app, is_loopback
        from core.web_server import serve
        from stages.base import ConfigError

        if args.workers < 1 or args.max_queue < 0 or not 0 < args.port < 65536 or (args.max_body is not None and args.max_body < 1):
            raise ConfigError(f"--workers {args.workers} (>= 1), --max-queue {args.max_queue} (>= 0), --port "
                              f"{args.port} (1-65535) and --max-body {args.max_body} (>= 1): one of them is out "
                              "of range")
        token = (args.token or "").strip() or None
        if token is None and not is_loopback(args.host):
            raise ConfigError(f"--host {args.host} lets other machines reach the model: give a token (--token or "
                              "env NANORUN_SERVE_TOKEN, e.g. $(openssl rand -hex 16)), or bind 127.0.0.1")
        _check_port_free(args.host, args.port)  # before loading a model for a server that cannot start
        found = find_chat_model(args.ref, _store_for(args), args.tokenizer)
        gen = _sampling(args, found)
        devices = replica_devices(_device(args.device), args.workers)
        first = found.load(devices[0])  # fail here, as one line, rather than in a server that never gets ready
        counter = itertools.count()

        def load_engine():  # core.web calls it once per worker, in its loader thread
            i = next(counter)
            return first if i == 0 else found.load(devices[i])

        app = create_app(load_engine, model_name=found.name, num_workers=args.workers, max_queue=args.max_queue,
                         temperature=gen["temperature"], top_k=gen["top_k"] or 0, max_tokens=gen["max_tokens"],
                         max_body=args.max_body or MAX_BODY, allowed_hosts=[args.host, *args.allow_host], token=token,
                         docs=args.docs)
        serve(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
              token=token is not None)
        return 0
