"""MFU's peak: measured once per hardware and reused by every attempt of a run (core/train/telemetry.py)."""
import json

import torch

from core.train.telemetry import peak_flops


def test_two_attempts_report_the_same_peak(tmp_path):
    cache = tmp_path / "peak_flops.json"
    first = peak_flops("cpu", torch.float32, cache=cache)
    saved = json.loads(cache.read_text())
    # a second measurement would differ (timing noise): make the stored number unmistakable
    cache.write_text(json.dumps({**saved, "flops": 1234.5}))
    second = peak_flops("cpu", torch.float32, cache=cache)
    assert second == (1234.5, first[1])


def test_other_hardware_measures_again(tmp_path):
    cache = tmp_path / "peak_flops.json"
    cache.write_text(json.dumps({"hardware": "some other machine", "flops": 1.0, "source": "x"}))
    flops, source = peak_flops("cpu", torch.float32, cache=cache)
    assert flops > 1e6 and "measured" in source
    assert json.loads(cache.read_text())["flops"] == flops
