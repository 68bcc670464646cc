"""Training entry points (run under torchrun) and the helpers they share.

    python -m core.train.pretrain --help        # base model pretraining (core/train/pretrain.py)
    python -m core.train.sft --help             # chat fine-tuning (core/train/sft.py)
    python -m core.train.rl --help              # reinforcement learning on GSM8K (core/train/rl.py)

core/train/config.py holds each trainer's config (the one source the stages derive theirs from);
core/train/common.py the skeleton every trainer runs (setup, resume, save, the optimizer step, SIGTERM,
the done row) and the resume checks; core/train/telemetry.py what it reports (the step line, MFU's
peak, metrics.jsonl, wandb).
"""
