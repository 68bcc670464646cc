"""Inference benchmark: time to first token, per-token latency, tokens/s, memory, MFU and MBU of a GPT
generating through core.engine.Engine, swept over prompt lengths and batch sizes (CPU or CUDA).

    nanorun bench-infer export@latest --batch-sizes 1,8,32 --json        # cli/bench_commands.py
    from core.bench_infer import InferSweep, run_sweep, format_report
    result = run_sweep(engine, InferSweep(prompt_lens=(512,), batch_sizes=(1, 8, 32), decode_tokens=64))
    print(format_report(result))                                          # a card and a table

The reference's scripts/infer_bench.py, for any model and any device. Two regimes (its doc): prefill
runs the prompt in parallel (big matmuls, compute-bound: MFU is its distance from the roofline);
decode re-reads every weight and the KV cache for one token per row (bandwidth-bound: MBU is the
achieved bytes/s over the device's peak). Per (prompt length, batch): TTFT = the first next() of
Engine.generate (batch-1 prefill, cache replication, first sample), TPOT = the median decode step,
tokens/s = rows x steps / decode time. Stop tokens and the calculator tool are switched off while
measuring, so every run decodes exactly `decode_tokens` tokens whatever the model writes.

Differences from the reference: bytes per decode step count the matmul weights as stored (in the
compute dtype: the chat loader casts them once, core.engine.inference_weights) and the KV cache read,
not the embedding tables (a decode step looks up one row of each); memory is torch.cuda.max_memory_allocated on CUDA and the process's peak RSS on CPU.
"""
from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from core.gpt import GPTConfig, count_params

# Peak memory bandwidth per GPU (bytes/s, vendor datasheets; the reference's table). Most specific first.
GPU_PEAK_BANDWIDTH = (
    ("gb200", 8.0e12), ("b200", 8.0e12), ("b100", 8.0e12), ("h200", 4.8e12), ("h100 nvl", 3.9e12),
    ("h100 pcie", 2.0e12), ("h100", 3.35e12), ("h800 pcie", 2.0e12), ("h800", 3.35e12), ("a100", 2.0e12),
    ("a800", 2.0e12), ("a40", 696e9), ("a30", 933e9), ("l40s", 864e9), ("l4", 300e9), ("mi300x", 5.3e12),
    ("mi250", 3.28e12), ("rtx 5090", 1.79e12), ("rtx 4090", 1.01e12), ("rtx 3090", 936e9),
)
PROMPT_TEXT = ("The history of science is the study of the development of science, including both the natural "
               "and social sciences. Science is a body of empirical, theoretical, and practical knowledge about "
               "the natural world. ")


def gpu_peak_bandwidth(name: str) -> float | None:
    low = name.lower()
    for key, bw in GPU_PEAK_BANDWIDTH:
        if key in low:
            return bw
    return None


# ---- what the architecture implies (per token, from the config alone) ------------------------------


def matmul_params(config: GPTConfig) -> int:
    """Weights a token multiplies by: the transformer matrices and lm_head (embeddings are lookups)."""
    c = count_params(config)
    return c["transformer_matrices"] + c["lm_head"]


def decode_flops(config: GPTConfig, context: int) -> float:
    """Forward FLOPs of one decode token at `context`: 2 per matmul weight + 4·h·d per attended key."""
    h, d = config.n_head, config.head_dim
    return float(2 * matmul_params(config) + sum(4 * h * d * min(context, w) for w in config.window_sizes()))


def prefill_flops(config: GPTConfig, n: int) -> float:
    """Forward FLOPs of an n-token prompt: causal, so token t attends to min(t, window) keys."""
    h, d = config.n_head, config.head_dim
    attended = 0
    for w in config.window_sizes():
        w = min(w, n)
        attended += w * (w + 1) // 2 + (n - w) * w  # ramp up to the window, then flat
    return float(2 * matmul_params(config) * n + 4 * h * d * attended)


def kv_bytes_per_token(config: GPTConfig, itemsize: int) -> int:
    """KV cache stored per token per row, all layers (the cache is in the compute dtype)."""
    return config.n_layer * 2 * config.n_kv_head * config.head_dim * itemsize


def kv_read_bytes(config: GPTConfig, context: int, itemsize: int) -> int:
    """KV cache read by one decode step per row: sliding-window layers read only their window."""
    return sum(2 * config.n_kv_head * config.head_dim * itemsize * min(context, w) for w in config.window_sizes())


def matmul_weight_bytes(model) -> int:
    """Bytes of the matmul weights as stored (what every decode step must read once)."""
    embeddings = {id(p) for name, p in model.named_parameters() if "wte" in name or "value_embeds" in name}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in embeddings)


# ---- measuring ------------------------------------------------------------------------------------


@dataclass
class InferSweep:
    prompt_lens: tuple[int, ...] = (512,)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    decode_tokens: int = 64
    warmup_tokens: int = 4        # a short untimed generation per row first (allocator, kernel choice)
    temperature: float = 0.0      # greedy, as the reference

    def __post_init__(self):
        self.prompt_lens, self.batch_sizes = tuple(self.prompt_lens), tuple(self.batch_sizes)
        if not self.prompt_lens or min(self.prompt_lens) < 1:
            raise ValueError(f"prompt lengths {self.prompt_lens}: give at least one, each >= 1")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes {self.batch_sizes}: give at least one, each >= 1")
        if self.decode_tokens < 2:
            raise ValueError(f"decode tokens {self.decode_tokens}: at least 2 (the first one is the TTFT)")
        if self.warmup_tokens < 1 or self.temperature < 0:
            raise ValueError(f"warmup tokens {self.warmup_tokens} (>= 1), temperature {self.temperature} (>= 0)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def time_generation(engine, prompt: list[int], batch: int, tokens: int, temperature: float) -> dict:
    """One generation: {ttft, step_times (one per decode step after the first token), peak_mem}."""
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    gen = engine.generate(prompt, num_samples=batch, max_tokens=tokens, temperature=temperature, seed=0)
    t0 = time.perf_counter()
    next(gen)
    _sync(device)
    ttft = time.perf_counter() - t0
    steps = []
    while True:
        t0 = time.perf_counter()
        try:
            next(gen)
        except StopIteration:
            break
        _sync(device)
        steps.append(time.perf_counter() - t0)
    return {"ttft": ttft, "step_times": steps, "peak_mem": _peak_memory(device)}


def build_prompt(tokenizer, n: int) -> list[int]:
    """Exactly n tokens of natural text after <|bos|> (a real prompt keeps greedy decoding varied)."""
    ids = [tokenizer.bos_token_id]
    while len(ids) < n:
        ids += tokenizer.encode(PROMPT_TEXT)
    return ids[:n]


def run_sweep(engine, sweep: InferSweep, peak_flops: float | None = None, peak_bandwidth: float | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """Measure the sweep; returns one JSON-serialisable dict (the card, a prefill row and a decode row
    per prompt length, a row per (prompt length, batch)). Peaks: None = unknown (no MFU/MBU)."""
    say = progress or (lambda s: None)
    model, device = engine.model, engine.device
    cfg: GPTConfig = model.config
    itemsize = torch.empty((), dtype=engine.dtype).element_size()
    w_bytes = matmul_weight_bytes(model)
    notes = []
    if max(sweep.prompt_lens) + sweep.decode_tokens > cfg.sequence_len:
        notes.append(f"prompt + decode > the model's context {cfg.sequence_len}: prompts clamped to "
                     f"{cfg.sequence_len - sweep.decode_tokens} tokens")
    prompt_lens = sorted({max(1, min(n, cfg.sequence_len - sweep.decode_tokens)) for n in sweep.prompt_lens})
    result = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else "cpu", "dtype": str(engine.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "model_config": cfg.to_dict(), "num_params": sum(p.numel() for p in model.parameters()),
        "matmul_weight_bytes": w_bytes, "kv_bytes_per_token": kv_bytes_per_token(cfg, itemsize),
        "peak_flops": peak_flops, "peak_bandwidth": peak_bandwidth,
        "memory": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "sweep": asdict(sweep), "notes": notes, "prefill": [], "rows": [],
    }
    saved = engine.stop_tokens, engine.tool
    engine.stop_tokens, engine.tool = frozenset(), (lambda expr: None)  # decode exactly N tokens, no tool calls
    try:
        for plen in prompt_lens:
            prompt = build_prompt(engine.tokenizer, plen)
            time_generation(engine, prompt, 1, 2, sweep.temperature)  # warm-up
            ttft = time_generation(engine, prompt, 1, 2, sweep.temperature)["ttft"]
            flops = prefill_flops(cfg, plen)
            row = {"prompt_tokens": plen, "time_s": round(ttft, 6), "tok_per_s": round(plen / ttft, 1),
                   "mfu_percent": round(100 * flops / ttft / peak_flops, 3) if peak_flops else None}
            result["prefill"].append(row)
            say(f"prefill {plen} tokens: {row['tok_per_s']:,.0f} tok/s ({ttft * 1e3:.1f} ms)")
            context = plen + sweep.decode_tokens // 2  # the representative decode context
            for batch in sweep.batch_sizes:
                time_generation(engine, prompt, batch, sweep.warmup_tokens + 1, sweep.temperature)
                r = time_generation(engine, prompt, batch, sweep.decode_tokens, sweep.temperature)
                steps = sorted(r["step_times"])
                tpot = steps[len(steps) // 2]
                step_bytes = w_bytes + batch * kv_read_bytes(cfg, context, itemsize)
                step_flops = batch * decode_flops(cfg, context)
                row = {"prompt_tokens": plen, "batch_size": batch, "ttft_s": round(r["ttft"], 6),
                       "tpot_s": round(tpot, 6), "tok_per_s": round(batch * len(steps) / sum(steps), 1),
                       "mbu_percent": round(100 * step_bytes / tpot / peak_bandwidth, 3) if peak_bandwidth else None,
                       "mfu_percent": round(100 * step_flops / tpot / peak_flops, 4) if peak_flops else None,
                       "peak_mem_bytes": r["peak_mem"], "decode_steps": len(steps)}
                result["rows"].append(row)
                say(f"prompt {plen} batch {batch}: TTFT {row['ttft_s'] * 1e3:.1f} ms, TPOT {tpot * 1e3:.2f} ms, "
                    f"{row['tok_per_s']:,.0f} tok/s")
    finally:
        engine.stop_tokens, engine.tool = saved
    return result


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_report(r: dict) -> str:
    """The human-readable card and table of a run_sweep result."""
    cfg = r["model_config"]
    peaks = (f"peak {r['peak_flops'] / 1e12:.1f} TFLOP/s" if r["peak_flops"] else "peak FLOP/s unknown") + " | " + \
            (f"{r['peak_bandwidth'] / 1e12:.2f} TB/s" if r["peak_bandwidth"] else "peak bandwidth unknown")
    lines = [f"model d{cfg['n_layer']} ({cfg['n_embd']} wide, {cfg['n_head']} heads, {cfg['n_kv_head']} kv, windows "
             f"{cfg['window_pattern']}, context {cfg['sequence_len']}) | {r['num_params']:,} params | "
             f"{r['device_name']} {r['dtype']} | {peaks}",
             f"matmul weights {r['matmul_weight_bytes'] / 2 ** 20:.1f} MiB | KV cache {r['kv_bytes_per_token']:,} "
             f"bytes/token/row | memory = {r['memory']}"]
    lines += [f"note: {n}" for n in r["notes"]]
    for p in r["prefill"]:
        lines.append(f"prefill (batch 1, {p['prompt_tokens']} tokens): {p['tok_per_s']:,.0f} tok/s | "
                     f"{p['time_s'] * 1e3:.1f} ms | MFU {_pct(p['mfu_percent'])}%")
    head = (f"{'prompt':>6} {'batch':>5} {'TTFT ms':>9} {'TPOT ms':>9} {'tok/s':>10} {'MBU %':>7} {'MFU %':>7} "
            f"{'mem MiB':>9} {'steps':>5}")
    lines += [head, "-" * len(head)]
    for x in r["rows"]:
        lines.append(f"{x['prompt_tokens']:>6} {x['batch_size']:>5} {x['ttft_s'] * 1e3:>9.1f} {x['tpot_s'] * 1e3:>9.2f} "
                     f"{x['tok_per_s']:>10,.0f} {_pct(x['mbu_percent']):>7} {_pct(x['mfu_percent']):>7} "
                     f"{x['peak_mem_bytes'] / 2 ** 20:>9.0f} {x['decode_steps']:>5}")
    return "\n".join(lines)


def device_peaks(device: torch.device | str, dtype: torch.dtype) -> tuple[float | None, float | None, str]:
    """(peak FLOP/s, peak bytes/s, where they come from) for MFU/MBU: datasheets for known GPUs (an
    unknown GPU gets a measured matmul peak and no bandwidth), a measured matmul peak on CPU."""
    from core.train.telemetry import peak_flops

    device = torch.device(device)
    flops, source = peak_flops(device, dtype)
    bandwidth = gpu_peak_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return flops, bandwidth, source + ("" if bandwidth else "; peak bandwidth unknown (no MBU)")
