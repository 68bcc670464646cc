"""Reports shown in the Prefect UI carry their charts: the UI's browser cannot fetch file:// or
s3:// links into a store, so images are embedded as data URIs."""
from __future__ import annotations

import base64


def test_report_images_are_embedded(tmp_path, monkeypatch):
    import prefect.artifacts

    from flows.speedrun import publish_markdown

    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
    (tmp_path / "loss.png").write_bytes(png)
    got = {}
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", lambda **kw: got.update(kw))
    publish_markdown("# r\n\n![loss](loss.png)\n\n![gone](missing.png) [link](x.md)\n", tmp_path,
                     key="speedrun-report-CPU demo", description="d")
    md = got["markdown"]
    assert f"![loss](data:image/png;base64,{base64.b64encode(png).decode()})" in md
    assert "![gone](missing.png)" in md and "[link](x.md)" in md  # nothing to embed: left as it was
    assert "file://" not in md and got["key"] == "speedrun-report-cpu-demo"
