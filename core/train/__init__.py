"""Training entry points (run under torchrun) and the helpers they share.

    python -m core.train.pretrain --help        # base model pretraining (core/train/pretrain.py)
    python -m core.train.sft --help             # chat fine-tuning (core/train/sft.py)
    python -m core.train.rl --help              # reinforcement learning on GSM8K (core/train/rl.py)

core/train/config.py holds each trainer's config (the one source the stages derive theirs from);
core/train/common.py the skeleton every trainer runs (setup, resume, save, the optimizer step with
its log line, the done row), metrics.jsonl, wandb, MFU and the resume checks.
"""
