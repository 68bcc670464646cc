"""The registry of stages: name -> module, imported lazily so `nanorun ls` does not pay for torch.

The executor (pipeline/execute.py) loads stages by name from here only. No stage imports it, so
adding a stage leaves every other stage's code identity (and every artifact) as it was."""
from __future__ import annotations

import importlib

# stage name -> module
STAGE_MODULES = {
    "data_shards": "stages.data_shards",
    "tokenizer": "stages.tokenizer",
    "eval_bundle": "stages.eval_bundle",
    "pretrain": "stages.pretrain",
    "core_eval": "stages.core_eval",
    "sft": "stages.sft",
    "rl": "stages.rl",
    "chat_eval": "stages.chat_eval",
    "export": "stages.export",
    "report": "stages.report",
    "sweep_report": "stages.sweep_report",
    "research_report": "stages.research_report",
}


def get_stage(name: str):
    """The stage module called `name`, or a ValueError listing the known ones."""
    try:
        modname = STAGE_MODULES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(STAGE_MODULES)}") from None
    return importlib.import_module(modname)
