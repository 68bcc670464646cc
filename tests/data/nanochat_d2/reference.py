"""Make this folder's reference numbers with nanochat itself (not nanorun): val bpb with nanochat's
loader and evaluate_bpb, CORE with nanochat's evaluate_example, one verdict per example, and the
token ids nanochat's tokenizer gives a text. Run from a nanochat checkout (see README.md here):

    cd nanochat && NANOCHAT_BASE_DIR=/work/nanochat-run python PATH/TO/reference.py > reference.json
"""
import hashlib
import json
import os
import random
import sys

import pyarrow.parquet as pq
import torch
import yaml

from nanochat.checkpoint_manager import load_model
from nanochat.core_eval import evaluate_example
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes

BPB_BATCH, BPB_STEPS = 4, 8           # 4 rows x 128 tokens x 8 steps of the val shard
CORE_TASKS = ("copa", "openbook_qa", "lambada_openai", "winograd", "winogrande", "piqa")
MAX_PER_TASK = 24
TEXT = ("The quick brown fox jumps over the lazy dog; 1234567 numbers, ÜNICODE ✓ and\ttabs\n\n"
        "def f(x):\n    return x ** 2  # code\r\n<|bos|> is text here. Ship's log, day 42: whales!")

device = torch.device("cpu")
model, tokenizer, meta = load_model("base", device, phase="eval")
out = {"meta_step": meta["step"], "text": TEXT, "text_ids": tokenizer.encode(TEXT)}
# every document of the val shard, encoded: the sha256 of the JSON of the id lists (too many ids to keep)
val_shard = sorted(os.listdir(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "base_data_climbmix")))[-1]
docs = pq.read_table(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "base_data_climbmix", val_shard)).column("text").to_pylist()
ids = [tokenizer.encode(d) for d in docs]
out["val_shard_ids"] = {"docs": len(docs), "tokens": sum(map(len, ids)),
                        "sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}

T = model.config.sequence_len
loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, BPB_BATCH, T, "val", device=device)
out["bpb"] = {"batch_size": BPB_BATCH, "seq_len": T, "steps": BPB_STEPS,
              "val_bpb": evaluate_bpb(model, loader, BPB_STEPS, get_token_bytes(device=device))}

bundle = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "eval_bundle")
tasks = {t["label"]: t for t in yaml.safe_load(open(os.path.join(bundle, "core.yaml")))["icl_tasks"]}
core = {}
for label in CORE_TASKS:
    t = tasks[label]
    task_meta = {"task_type": t["icl_task_type"], "dataset_uri": t["dataset_uri"],
                 "num_fewshot": t["num_fewshot"][0], "continuation_delimiter": t.get("continuation_delimiter", " ")}
    with open(os.path.join(bundle, "eval_data", t["dataset_uri"]), encoding="utf-8") as f:
        data = [json.loads(line.strip()) for line in f]
    random.Random(1337).shuffle(data)   # base_eval.evaluate_core's shuffle before the cut
    data = data[:MAX_PER_TASK]
    verdicts = [bool(evaluate_example(i, model, tokenizer, data, device, task_meta)) for i in range(len(data))]
    core[label] = {"verdicts": verdicts, "accuracy": sum(verdicts) / len(verdicts)}
    print(label, core[label]["accuracy"], file=sys.stderr)
out["core"] = {"max_per_task": MAX_PER_TASK, "tasks": core}
json.dump(out, sys.stdout, indent=1)
print()
