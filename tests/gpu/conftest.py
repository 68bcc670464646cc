"""The GPU kit's tests (`pytest -m gpu`, run by bench/gpu_check.py): marked `gpu`, skipped with the
reason when no CUDA GPU is visible (CI, laptops). They import core, torch, tokenizers and safetensors
only, like the node they run on.

NANORUN_GPU_TESTS_DEVICE=cpu runs them on the CPU instead, to check a test's own logic without a GPU
(slowly; the parts that need CUDA hardware, such as NCCL and FP8 GEMMs, still skip)."""
from __future__ import annotations

import os

import pytest
import torch

FORCED = os.environ.get("NANORUN_GPU_TESTS_DEVICE", "")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or FORCED:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `bash scripts/gpu_check.sh` on a GPU node)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(FORCED or "cuda")

