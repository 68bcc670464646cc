"""`nanorun bench-infer`: what a trained model costs to run (the reference's infer_bench, any artifact).

    nanorun bench-infer                                      # export@latest, else sft@latest
    nanorun bench-infer pretrain@latest --batch-sizes 1,8,32 --prompt-lens 128,512 --decode-tokens 128
    nanorun bench-infer ./my-model --device cuda --json | tail -1 | jq '.rows'

REF resolves as for `nanorun chat` (cli/chat_commands.py: an export, sft or pretrain ref, or a
bundle folder). Progress goes to stderr while it runs; stdout gets the card and the table (TTFT,
TPOT, tokens/s, MBU, MFU, memory per prompt length and batch size), and with --json one JSON line
last. The measurement itself is core/bench_infer.py.
"""
from __future__ import annotations

import json
import logging
import sys


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from stages.base import ConfigError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: comma-separated whole numbers, e.g. 1,8,32") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text!r}: give at least one number, each >= 1")
    return values


class _NotChatTuned(logging.Filter):
    """find_chat_model warns that a base model is not chat-tuned: true, and beside the point here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "not chat-tuned" not in record.getMessage()


class BenchInfer:
    @staticmethod
    def add_arguments(p):
        p.add_argument("ref", nargs="?", metavar="REF",
                       help="export/sft/pretrain artifact (ref, fingerprint prefix, stage@alias) or a bundle "
                            "folder (default: export@latest, else sft@latest)")
        p.add_argument("--device", default="", help="cpu | cuda | mps (default: autodetect)")
        p.add_argument("--dtype", default="", help="compute dtype: bfloat16 | float32 | float16 "
                                                   "(default: bf16 on recent GPUs, fp32 on CPU)")
        p.add_argument("--prompt-lens", default="512", help="prompt lengths to sweep, e.g. 128,512 (default 512)")
        p.add_argument("--batch-sizes", default="1,8,32", help="decode batch sizes to sweep (default 1,8,32)")
        p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per row (default 64)")
        p.add_argument("--warmup-tokens", type=int, default=4, help="untimed tokens per run first (default 4)")
        p.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: GPU datasheet, or a "
                                                        "measured matmul on CPU)")
        p.add_argument("--peak-bandwidth", type=float, help="peak memory bytes/s for MBU (default: GPU "
                                                            "datasheet; unknown on CPU)")
        p.add_argument("--json", action="store_true", help="print the whole result as one JSON line last")

    @staticmethod
    def run(args) -> int:
        import torch

        from core.bench_infer import InferSweep, device_peaks, format_report, run_sweep
        from core.common import parse_dtype
        from cli.chat_commands import _device, _store_for, find_chat_model
        from stages.base import ConfigError

        try:
            sweep = InferSweep(prompt_lens=_ints(args.prompt_lens, "--prompt-lens"),
                               batch_sizes=_ints(args.batch_sizes, "--batch-sizes"),
                               decode_tokens=args.decode_tokens, warmup_tokens=args.warmup_tokens)
            dtype = parse_dtype(args.dtype) if args.dtype else None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        chat_log = logging.getLogger("nanorun.chat")
        quiet = _NotChatTuned()
        chat_log.addFilter(quiet)
        try:
            found = find_chat_model(args.ref, _store_for(args))
        finally:
            chat_log.removeFilter(quiet)
        device = _device(args.device)
        engine, _ = found.load(device, dtype)
        if args.peak_flops and args.peak_bandwidth:  # both given: measuring them costs minutes on a CPU in bf16
            flops, bandwidth, source = args.peak_flops, args.peak_bandwidth, "given (--peak-flops, --peak-bandwidth)"
        else:
            flops, bandwidth, source = device_peaks(engine.device, engine.dtype)
            flops = args.peak_flops or flops
            bandwidth = args.peak_bandwidth or bandwidth
        progress = (lambda s: None) if args.quiet else (lambda s: print(f"[bench-infer] {s}", file=sys.stderr,
                                                                           flush=True))
        progress(f"{found.name} ({found.kind}) on {engine.device}, {str(engine.dtype).removeprefix('torch.')}; "
                 f"peaks: {source}")
        with torch.inference_mode():
            result = run_sweep(engine, sweep, peak_flops=flops, peak_bandwidth=bandwidth, progress=progress)
        result.update(model=found.name, kind=found.kind, peak_source=source)
        print(format_report(result), flush=True)
        if args.json:
            print(json.dumps(result), flush=True)
        return 0
