"""`nanorun import nanochat DIR` and `nanorun export REF --format nanochat --to DIR`: checkpoints
to and from nanochat (karpathy/nanochat), file formats in core/nanochat.py.

    nanorun import nanochat ~/.cache/nanochat                        # the largest base_checkpoints/dN
    nanorun import nanochat ~/.cache/nanochat/chatsft_checkpoints/d20 --step 800
    nanorun stage core_eval --input model=pretrain@latest --input tokenizer=tokenizer@latest --input bundle=...
    nanorun export pretrain@latest --format nanochat --to out/      # NANOCHAT_BASE_DIR=out python -m scripts.chat_cli

Import commits two artifacts, a tokenizer (stage `tokenizer`) and the model (stage `pretrain`,
`sft` or `rl` by the folder it lies in, or --kind), whose provenance says `imported from nanochat`
with the meta's step and config and the sha256 of every source file. Their fingerprints hash those
digests, so importing the same files twice is a no-op, and every stage takes them like trained
artifacts. Export writes the newest checkpoint of a trainer artifact, with its tokenizer, in
nanochat's base-dir layout; importing that folder again gives back the same weights and tokenizer.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

IMPORT_VERSION = "nanochat-import-1"   # the code_version of imported artifacts
STAGE_OF_KIND = {"base": "pretrain", "sft": "sft", "rl": "rl"}


def _store(args):
    from cli.main import open_store_from

    return open_store_from(args)


def _commit(store, stage: str, label: str, identity: dict, inputs: dict, fill, metrics: dict, provenance: dict):
    """Commit an artifact whose files fill(work_dir) writes, unless the same one is committed already."""
    from artifacts.lease import Lease
    from artifacts.manifest import ArtifactRef, Manifest, fingerprint

    ref = ArtifactRef(stage, label, fingerprint(stage, IMPORT_VERSION, identity,
                                                {k: r.fingerprint for k, r in inputs.items()}))
    existing = store.manifest(ref)
    if existing is not None:
        return existing, False
    with Lease(store, ref):
        work = store.work_dir(ref, clear=True)
        fill(work)
        m = Manifest(stage=stage, label=label, fingerprint=ref.fingerprint, code_version=IMPORT_VERSION,
                     identity=identity, runtime={}, inputs=dict(inputs), files=[], metrics=metrics,
                     provenance=provenance)
        return store.commit(ref, work, m), True


def import_nanochat(store, path, *, kind: str | None = None, step: int | None = None,
                    tokenizer_dir: str | None = None) -> tuple:
    """(tokenizer manifest, model manifest) of a nanochat checkpoint, committed into `store`."""
    from core.checkpoint import META, MODEL, step_dir_name
    from core.layouts import CHECKPOINT_POINTER
    from core.nanochat import ENCODING_FILE, TOKEN_BYTES_FILE, NanochatError, find_checkpoint, read_checkpoint, \
        read_tokenizer, sha256_file

    import torch

    found = find_checkpoint(path, step=step, kind=kind, tokenizer_dir=tokenizer_dir)
    tokenizer = read_tokenizer(found.tokenizer_dir)
    config, state, meta = read_checkpoint(found)
    if tokenizer.vocab_size != config.vocab_size:
        raise NanochatError(f"{found.tokenizer_dir} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                            f"{config.vocab_size}: pass --tokenizer with the tokenizer it was trained with")
    tok_files = [found.tokenizer_dir / f for f in (ENCODING_FILE, TOKEN_BYTES_FILE)
                 if (found.tokenizer_dir / f).is_file()]
    tok_sha = {f.name: sha256_file(f) for f in tok_files}
    source = {"imported_from": "nanochat"}
    tok_m, _ = _commit(store, "tokenizer", "nanochat", {**source, "sha256": tok_sha}, {}, tokenizer.save,
                       {"vocab_size": tokenizer.vocab_size},
                       {**source, "source": str(found.tokenizer_dir.resolve()), "sha256": tok_sha})
    model_sha = {found.model.name: sha256_file(found.model), found.meta.name: sha256_file(found.meta)}
    rel = f"checkpoints/{step_dir_name(found.step)}"

    def fill(work: Path):
        ck = work / rel
        ck.mkdir(parents=True)
        torch.save(state, ck / MODEL)
        (ck / META).write_text(json.dumps({
            "model_config": config.to_dict(), "kind": found.kind, "step": found.step,
            "tokenizer": {"fingerprint": tok_m.fingerprint, "vocab_size": tokenizer.vocab_size},
            "imported_from": {"format": "nanochat", "step": found.step, "meta": meta}}, indent=2, default=str))
        (work / CHECKPOINT_POINTER).write_text(json.dumps({"checkpoint": rel, "step": found.step}) + "\n")

    identity = {**source, "kind": found.kind, "step": found.step, "sha256": model_sha}
    model_m, _ = _commit(store, STAGE_OF_KIND[found.kind], f"nanochat_d{config.n_layer}", identity,
                         {"tokenizer": tok_m.ref}, fill,
                         {"checkpoint": rel, "iterations": found.step, "kind": found.kind,
                          "final_val_bpb": meta.get("val_bpb"), "imported_from": "nanochat"},
                         {**source, "source": str(found.model.parent.resolve()), "step": found.step,
                          "model_config": meta.get("model_config"), "sha256": {**model_sha, **tok_sha}})
    return tok_m, model_m


class Import:
    @staticmethod
    def add_arguments(p):
        p.add_argument("format", choices=["nanochat"], help="where the checkpoint comes from")
        p.add_argument("dir", help="nanochat base dir (NANOCHAT_BASE_DIR), a *_checkpoints dir or a model dir (d20)")
        p.add_argument("--kind", choices=sorted(STAGE_OF_KIND), help="base | sft | rl (default: from the folder name)")
        p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
        p.add_argument("--tokenizer", metavar="DIR", help="nanochat tokenizer dir (default: DIR's tokenizer/)")

    @staticmethod
    def run(args) -> int:
        from core.nanochat import NanochatError

        try:
            tok_m, model_m = import_nanochat(_store(args), args.dir, kind=args.kind, step=args.step,
                                             tokenizer_dir=args.tokenizer)
        except NanochatError as e:
            print(f"nanorun import: error: {e}", file=sys.stderr)
            return 2
        role = "base" if model_m.stage == "pretrain" else "model"
        print(f"imported {tok_m.ref} and {model_m.ref} from nanochat (step {model_m.metrics['iterations']}); "
              f"use --input tokenizer={tok_m.ref} --input {role}={model_m.ref}")
        return 0


def export_nanochat(store, text: str, out: Path, tokenizer: str | None = None) -> Path:
    """Write trainer artifact `text` (pretrain, sft or rl) and its tokenizer as a nanochat base dir."""
    from core.checkpoint import load_checkpoint
    from core.gpt import GPTConfig
    from core.layouts import model_checkpoint, tokenizer_dir
    from core.nanochat import NanochatError, write_nanochat
    from core.tokenizer import Tokenizer

    ref = store.resolve(text)
    m = store.require(ref)
    tok_ref = store.resolve(tokenizer) if tokenizer else m.inputs.get("tokenizer")
    if tok_ref is None:
        raise NanochatError(f"{ref} names no tokenizer input: pass --tokenizer REF")
    try:
        ck = load_checkpoint(model_checkpoint(store.materialize(ref)))
    except FileNotFoundError as e:
        raise NanochatError(str(e)) from None
    kind = ck.meta.get("kind", "base")
    tok = Tokenizer.from_directory(tokenizer_dir(store.materialize(tok_ref)))
    from core.checkpoint import check_tokenizer

    check_tokenizer(ck.meta, tok_ref.fingerprint, tok.vocab_size, "export")
    return write_nanochat(out, GPTConfig.from_dict(ck.meta["model_config"]), ck.model_state(), tok,
                          kind=kind if kind in STAGE_OF_KIND else "base", step=ck.step,
                          meta_extra={"exported_from": str(ref)})


class Export:
    @staticmethod
    def add_arguments(p):
        p.add_argument("ref", help="a pretrain, sft or rl artifact")
        p.add_argument("--format", choices=["nanochat"], required=True, help="the layout to write")
        p.add_argument("--to", required=True, metavar="DIR", help="destination (a nanochat base dir)")
        p.add_argument("--tokenizer", metavar="REF", help="tokenizer artifact (default: the model's input)")

    @staticmethod
    def run(args) -> int:
        from core.nanochat import NanochatError

        try:
            model_dir = export_nanochat(_store(args), args.ref, Path(args.to), args.tokenizer)
        except NanochatError as e:
            print(f"nanorun export: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {model_dir} and {Path(args.to) / 'tokenizer'}; run nanochat with NANOCHAT_BASE_DIR={args.to}")
        return 0
