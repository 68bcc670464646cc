"""core/export.py check_config: a bundle's config.json and generation_config.json are checked before
anything is built, so a hostile or damaged config is one BundleError, not a traceback or a huge
allocation (the `nanorun chat`/`serve` CLI turns it into one line and exit 2)."""
from __future__ import annotations

import json
import resource

import pytest

from core.export import BundleError, load, read_config
from tests.conftest import free_port
from tests.core.test_export import _copy, bundle, source, tok  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("file, key, value, message", [
    ("config.json", "n_layer", 10**6, "truncated or does not match config.json's architecture"),
    ("config.json", "n_embd", 1 << 20, "truncated or does not match"),
    ("config.json", "sequence_len", 1 << 30, "rotary table"),
    ("config.json", "n_layer", "12", "architecture.n_layer is '12', not a int"),
    ("config.json", "n_head", True, "architecture.n_head is True"),
    ("config.json", "softcap", None, "architecture.softcap is None, not a float"),
    ("config.json", "window_pattern", 7, "architecture.window_pattern is 7, not a str"),
    ("config.json", "n_layer", -1, "bad architecture"),
    ("config.json", "architecture", [], "'architecture' is list, not an object"),
    ("config.json", "weights", {"dtype": "int4"}, "weights dtype 'int4'"),
    ("config.json", "weights", {"bytes": "many"}, "weights has a field of the wrong type \\(bytes\\)"),
    ("config.json", "tokenizer", [1], "tokenizer has a field of the wrong type"),
    ("generation_config.json", "temperature", "hot", "temperature is 'hot', not a number"),
    ("generation_config.json", "max_tokens", 2.5, "max_tokens is 2.5"),
    ("generation_config.json", "top_k", -3, "top_k must be >= 0"),
    ("generation_config.json", None, [1, 2], "not a JSON object"),
])
def test_hostile_configs_are_refused_before_building(bundle, tmp_path, file, key, value, message):
    path = _copy(bundle, tmp_path)
    data = json.loads((path / file).read_text())
    if key is None:
        data = value
    elif file == "config.json" and key not in ("architecture", "weights", "tokenizer"):
        data["architecture"][key] = value
    else:
        data[key] = value
    (path / file).write_text(json.dumps(data))
    # the check must come before any allocation: a model this size would not fit in 1 GiB
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (max(_vm_now() + (1 << 30), 1 << 32), hard))
    try:
        with pytest.raises(BundleError, match=message):
            read_config(path)
        with pytest.raises(BundleError, match=message):
            load(path)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_the_cli_says_so_in_one_line(bundle, tmp_path, capsys):
    from cli.main import main
    from tests.cli.test_cli import one_line_error

    path = _copy(bundle, tmp_path)
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "temperature": "hot"}))
    for command in ("chat", "serve"):
        code = main([command, str(path), *(["-p", "hi"] if command == "chat" else ["--port", str(free_port())])])
        one_line_error(code, capsys.readouterr().err, "temperature is 'hot'")


def _vm_now() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
