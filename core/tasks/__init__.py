"""Chat tasks for SFT and chat evaluation: one module per source, plus the mixture.

    from core.tasks.mixture import TaskSpec, build_mixture, build_task
    from core.tasks.gsm8k import GSM8K; from core.tasks.spelling import SpellingBee, load_words

common.py (Task, answer extraction, multiple-choice prompt), customjson.py (conversations files:
identity), gsm8k.py (calculator tool calls), smoltalk.py (SmolTalk parquet; chitchat offline),
spelling.py (synthetic spelling / letter counting), multiple_choice.py (MMLU / ARC / CORE files),
mixture.py (specs as data -> one shuffled mixture). core never downloads: the sft and chat_eval
stages resolve URLs to local files first.
"""
