"""BOS-aligned best-fit packing loader for pretraining and validation, with exact resume.

    loader = PackingLoader(train_files, tokenizer, batch_size=32, seq_len=2048, rank=r, world_size=w)
    for step, (x, y) in zip(range(n), loader):      # int64 (B, T) tensors
        ...
        ckpt["loader"] = loader.state_dict()         # plain JSON-able dict
    loader = PackingLoader(..., state=ckpt["loader"])  # yields exactly the batch that came next

Packing (the reference's BOS-aligned best fit): every row holds T+1 tokens and starts with BOS;
documents are BOS-prefixed; a row is filled from a buffer of >= buffer_size tokenized documents by
repeatedly taking the largest document that fits entirely (the earliest one among equal lengths);
when none fits, the shortest document is cropped to fill the row exactly and its tail is dropped.
Nothing is padded (100% utilisation), every token can attend back to its document's BOS, and at
T=2048 on ClimbMix about a third of the tokens are cropped away.

Distribution: the row groups of one pass over the files are dealt round-robin to the ranks (rank r
takes row groups r, r+W, ...). Unlike the reference the count runs across files, not within each
file, so the result equals the reference's whenever files hold a multiple of W row groups and still
feeds every rank when files hold fewer (the shared corpus has one row group per file). If a pass has
fewer row groups than ranks, units of tokenizer_batch_size documents are dealt instead.

Exact resume: the reference resumes at the next row group (skipping the buffer). Here the state
before each batch names the next document to read and every document left in the buffer (as
epoch, unit, document index and token count); restoring re-reads and re-tokenizes exactly those
documents, so the restored loader yields the identical next batch. The token counts double as a
check that the files and the tokenizer are the ones the state was saved with.

Validation: infinite=False makes one pass over the files (the last partial batch is dropped);
max_batches caps the number of batches (counted from the start of the run, resumes included).
Ranks can get different numbers of batches from a finite pass: the caller agrees on a count.

Tokenizing and packing run in a background thread a few batches ahead, so the trainer never waits.
"""
from __future__ import annotations

import bisect
import queue
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

STATE_VERSION = 1
_KEY_MAX = (float("inf"),)  # sorts after every (epoch, unit, doc) key


class LoaderStateError(ValueError):
    """A saved loader state does not fit this loader (other files, ranks or tokenizer)."""


class PackingLoader:
    """Iterable of (inputs, targets) int64 (B, T) batches; see the module docstring."""

    def __init__(self, files, tokenizer, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1, *,
                 state: dict | None = None, infinite: bool = True, max_batches: int | None = None,
                 device: str | torch.device | None = None, buffer_size: int = 1000,
                 tokenizer_batch_size: int = 128, prefetch: int = 2, num_threads: int | None = None):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("PackingLoader needs at least one parquet file")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if buffer_size < 1 or tokenizer_batch_size < 1 or prefetch < 1:
            raise ValueError("buffer_size, tokenizer_batch_size and prefetch must be >= 1")
        self.tokenizer = tokenizer
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.infinite, self.max_batches = infinite, max_batches
        self.buffer_size, self.chunk = buffer_size, tokenizer_batch_size
        self.prefetch, self.num_threads = prefetch, num_threads
        self.device = torch.device(device) if device is not None else None
        self.bos = tokenizer.bos_token_id
        self.units, self.unit_kind = self._deal_units()
        if not self.units:
            raise ValueError(f"rank {rank} of {world_size} gets no data: the files hold too few documents")
        self._state = self._check_state(state) if state is not None else {
            "epoch": 1, "unit": 0, "doc": self.units[0][2], "buffer": [], "batches": 0,
            "stats": {"rows": 0, "docs": 0, "docs_cropped": 0, "tokens_in": 0, "tokens_cropped": 0}}
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._done = False

    # ---- static plan ------------------------------------------------------------------------------
    def _deal_units(self) -> tuple[list[tuple[int, int, int, int]], str]:
        """This rank's units (file index, row group, first doc, end doc) for one pass."""
        groups = []
        for fi, f in enumerate(self.files):
            md = pq.ParquetFile(f).metadata
            if "text" not in md.schema.names:
                raise ValueError(f"{f} has no 'text' column (columns: {md.schema.names})")
            groups += [(fi, rg, 0, md.row_group(rg).num_rows) for rg in range(md.num_row_groups)]
        groups = [g for g in groups if g[3] > 0]
        if len(groups) >= self.world_size:
            return groups[self.rank::self.world_size], "row_group"
        chunks = [(fi, rg, d, min(d + self.chunk, n)) for fi, rg, _, n in groups for d in range(0, n, self.chunk)]
        return chunks[self.rank::self.world_size], "chunk"

    def _check_state(self, state: dict) -> dict:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise LoaderStateError(f"not a PackingLoader state (version {STATE_VERSION}): {str(state)[:200]}")
        want = {"rank": self.rank, "world_size": self.world_size, "files": [f.name for f in self.files]}
        got = {k: state.get(k) for k in want}
        if got != want:
            diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
            raise LoaderStateError(f"loader state was saved for other data or ranks (saved, now): {diff}; "
                                   "resume with the same files and number of processes")
        return {k: state[k] for k in ("epoch", "unit", "doc", "buffer", "batches", "stats")}

    # ---- public -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """State before the next batch: PackingLoader(..., state=this) yields that same batch next."""
        s = self._state
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "files": [f.name for f in self.files], "epoch": s["epoch"], "unit": s["unit"], "doc": s["doc"],
                "buffer": [list(b) for b in s["buffer"]], "batches": s["batches"], "stats": dict(s["stats"])}

    def stats(self) -> dict:
        """Packing statistics so far (carried across resume): utilisation and share of tokens cropped."""
        s = self._state["stats"]
        filled = s["rows"] * (self.T + 1)
        return {**s, "batches": self._state["batches"], "epoch": self._state["epoch"],
                "utilisation": 1.0 if filled else 0.0,  # rows are always filled exactly (no padding)
                "cropped_frac": s["tokens_cropped"] / s["tokens_in"] if s["tokens_in"] else 0.0}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is None:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        (x, y), self._state = item
        if self.device is not None and self.device.type == "cuda":
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.device is not None and self.device.type != "cpu":
            return x.to(self.device), y.to(self.device)
        return x, y

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:  # unblock a producer waiting on a full queue
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)

    def __del__(self):
        stop = getattr(self, "_stop", None)  # absent when __init__ raised
        if stop is not None:
            stop.set()

    # ---- producer ---------------------------------------------------------------------------------
    def _start(self):
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, name=f"packing-loader-r{self.rank}", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self):
        pin = self.device is not None and self.device.type == "cuda"
        try:
            for rows, state in _Packer(self, self._state).batches():
                x = torch.from_numpy(rows[:, :-1].copy())
                y = torch.from_numpy(rows[:, 1:].copy())
                if pin:  # pinned host memory: the copy to the GPU is asynchronous (overlaps compute)
                    x, y = x.pin_memory(), y.pin_memory()
                if not self._put(((x, y), state)):
                    return
            self._put(None)
        except BaseException as e:  # surfaces in the consumer's next()
            self._put(e)


class _Packer:
    """The deterministic packing state machine, run by the producer thread."""

    def __init__(self, loader: PackingLoader, state: dict):
        self.L = loader
        self.epoch, self.unit, self.doc = state["epoch"], state["unit"], state["doc"]
        self.n_batches = state["batches"]
        self.stats = dict(state["stats"])
        self._pf: dict[int, pq.ParquetFile] = {}
        self._unit_cache: tuple[tuple, list[np.ndarray]] | None = None
        # buffer: entries (length, key) sorted, key = (epoch, unit, doc) = stream order; tokens by key.
        self.entries: list[tuple[int, tuple]] = []
        self.tokens: dict[tuple, np.ndarray] = {}
        self._restore_buffer(state["buffer"])
        self.exhausted = False

    def _read_docs(self, unit_idx: int) -> list[str]:
        fi, rg, d0, d1 = self.L.units[unit_idx]
        pf = self._pf.get(fi)
        if pf is None:
            self._pf = {fi: pq.ParquetFile(self.L.files[fi])}  # keep only the current file open
            pf = self._pf[fi]
        return pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()[d0:d1]

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        ids = self.L.tokenizer.encode(texts, prepend=self.L.bos, num_threads=self.L.num_threads)
        return [np.asarray(x, dtype=np.int32) for x in ids]

    def _restore_buffer(self, saved: list) -> None:
        by_unit: dict[int, list] = {}
        for epoch, unit, doc, n in saved:
            by_unit.setdefault(unit, []).append((epoch, doc, n))
        for unit, items in by_unit.items():
            if not 0 <= unit < len(self.L.units):
                raise LoaderStateError(f"loader state names unit {unit} but this rank has {len(self.L.units)}")
            d0 = self.L.units[unit][2]
            texts = self._read_docs(unit)
            toks = self._encode([texts[doc - d0] for _, doc, _ in items])
            for (epoch, doc, n), t in zip(items, toks):
                if len(t) != n:
                    raise LoaderStateError(
                        f"document {doc} of {self.L.files[self.L.units[unit][0]].name} has {len(t)} tokens now but "
                        f"{n} when the state was saved: the tokenizer or the data changed; resume with the same ones")
                key = (epoch, unit, doc)
                self.tokens[key] = t
                self.entries.append((n, key))
        self.entries.sort()

    def _state(self) -> dict:
        buf = sorted(self.tokens)  # stream order
        return {"epoch": self.epoch, "unit": self.unit, "doc": self.doc, "batches": self.n_batches,
                "buffer": [[k[0], k[1], k[2], len(self.tokens[k])] for k in buf], "stats": dict(self.stats)}

    def _refill(self) -> bool:
        """Tokenize the next tokenizer_batch_size documents of this rank's stream into the buffer."""
        units, chunk = self.L.units, self.L.chunk
        if self.unit >= len(units):  # end of a pass
            if not self.L.infinite:
                return False
            self.epoch, self.unit, self.doc = self.epoch + 1, 0, units[0][2]
        u = units[self.unit]
        key = (self.epoch, self.unit)
        if self._unit_cache is None or self._unit_cache[0] != key:
            # Tokenize a whole unit (a row group) in one call: the tokenizer's thread pool works best on
            # big batches. A resumed unit only needs its remaining documents.
            docs = self._read_docs(self.unit)[self.doc - u[2]:]
            self._unit_cache = (key, self.doc, self._encode(docs))
        _, first, toks = self._unit_cache
        end = min(self.doc + chunk, u[3])
        for d in range(self.doc, end):
            t = toks[d - first]
            k = (self.epoch, self.unit, d)
            self.tokens[k] = t
            bisect.insort(self.entries, (len(t), k))
        self.doc = end
        if self.doc >= u[3]:
            self.unit += 1
            if self.unit < len(units):
                self.doc = units[self.unit][2]
            self._unit_cache = None
        return True

    def _pop(self, i: int) -> np.ndarray:
        n, k = self.entries.pop(i)
        return self.tokens.pop(k)

    def batches(self) -> Iterator[tuple[np.ndarray, dict]]:
        L = self.L
        cap = L.T + 1
        st = self.stats
        while L.max_batches is None or self.n_batches < L.max_batches:
            rows = np.empty((L.B, cap), dtype=np.int64)
            for r in range(L.B):
                pos = 0
                while pos < cap:
                    while len(self.entries) < L.buffer_size and not self.exhausted:
                        if not self._refill():
                            self.exhausted = True
                    if not self.entries:
                        return  # finite mode: the data ran out mid-batch; the partial batch is dropped
                    remaining = cap - pos
                    # Largest document that fits; among equal lengths the earliest (the reference's
                    # linear scan picks the first strictly larger one).
                    i = bisect.bisect_right(self.entries, (remaining, _KEY_MAX)) - 1
                    if i >= 0:
                        i = bisect.bisect_left(self.entries, (self.entries[i][0],))
                        doc = self._pop(i)
                        rows[r, pos:pos + len(doc)] = doc
                        pos += len(doc)
                    else:  # nothing fits: crop the shortest (earliest among equals) to fill the row
                        doc = self._pop(0)
                        rows[r, pos:] = doc[:remaining]
                        pos = cap
                        st["docs_cropped"] += 1
                        st["tokens_cropped"] += len(doc) - remaining
                    st["docs"] += 1
                    st["tokens_in"] += len(doc)
                st["rows"] += 1
            self.n_batches += 1
            yield rows, self._state()
