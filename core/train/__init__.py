"""Training entry points (run under torchrun) and the helpers they share.

    python -m core.train.pretrain --help        # base model pretraining (core/train/pretrain.py)

core/train/common.py holds what every trainer needs besides the model: the per-step log line and
its parser, peak FLOPs for MFU, metrics.jsonl, wandb, seeding and the resume checks.
"""
