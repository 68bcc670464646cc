"""The operational path end to end: a Prefect server on loopback, the process work pool, the
deployments of prefect.yaml, a worker, a speedrun triggered through the API, its rerun served
entirely from the store, a refused nightly run watched from the command line, and a screenshot
of the finished run in the Prefect UI.

Slow (a few minutes on 2 cores): the speedrun runs the `tiny` preset for real.
"""
from __future__ import annotations

import subprocess

import httpx
import pytest

from artifacts import open_store
from flows.leaderboard import REFUSED
from pipeline.recipes import speedrun_steps
from pipeline.execute import load_stage
from tests.conftest import png_size
from tests.flows.prefect_server import BIN, background, prefect_server, run, task_runs, wait_flow_run

pytestmark = pytest.mark.slow


def _trigger(api: str, params: dict) -> str:
    dep = httpx.get(f"{api}/deployments/name/speedrun/speedrun", timeout=10)
    assert dep.status_code == 200, dep.text
    fr = httpx.post(f"{api}/deployments/{dep.json()['id']}/create_flow_run", json={"parameters": params}, timeout=10)
    assert fr.status_code in (200, 201), fr.text
    return fr.json()["id"]


def test_speedrun_deployment_end_to_end(tmp_path, shared_data, chromium):
    store_dir = tmp_path / "store"
    params = {"preset": "tiny", "store": str(store_dir), "eval_bundle": str(shared_data / "eval_bundle"),
              "chat_data": str(shared_data / "chat")}
    graph = speedrun_steps("tiny", eval_bundle=params["eval_bundle"], chat_data=params["chat_data"])  # rl off
    with prefect_server(tmp_path) as (api, env):
        run([str(BIN / "prefect"), "work-pool", "create", "nanorun-local", "--type", "process"], env)
        out = run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
        deployments = {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()}
        assert {"speedrun", "stage", "nightly-leaderboard"} <= set(deployments), out
        nightly = deployments["nightly-leaderboard"]
        assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
        assert nightly["schedules"][0]["schedule"]["timezone"] == "UTC"
        # keep the 03:00 run out of this test's worker (the schedule itself is checked above)
        httpx.patch(f"{api}/deployments/{nightly['id']}", json={"paused": True}, timeout=10).raise_for_status()

        with background([str(BIN / "prefect"), "worker", "start", "--pool", "nanorun-local", "--name", "e2e"],
                        env, tmp_path / "worker.log"):
            first = wait_flow_run(api, _trigger(api, params), timeout=900)
            assert first["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-5000:]
            tasks = task_runs(api, first["id"])
            assert sorted(t["name"] for t in tasks) == sorted(n.name for n in graph)
            assert all(t["state"]["type"] == "COMPLETED" and t["state"]["name"] != "Cached" for t in tasks)

            store = open_store(str(store_dir))
            for node in graph:  # every stage's artifact is committed and verifies deeply
                stage = load_stage(node.stage).NAME
                (manifest,) = store.list(stage)
                assert store.verify(manifest.ref, deep=True).ok

            second = wait_flow_run(api, _trigger(api, params), timeout=300)
            assert second["state"]["type"] == "COMPLETED"
            again = task_runs(api, second["id"])
            assert sorted(t["state"]["name"] for t in again) == ["Cached"] * len(graph), again

            # a second nightly run of a night that has a report is refused: `--watch` ends saying so
            store.set_alias("report", "nightly-tiny-2026-11-21", store.list("report")[0].ref)
            watch = subprocess.run([str(BIN / "prefect"), "deployment", "run", "nightly-leaderboard/nightly-leaderboard",
                                    "--param", "preset=tiny", "--param", f"store={store_dir}", "--param",
                                    "date=2026-11-21", "--watch", "--watch-timeout", "300"], env=env,
                                   capture_output=True, text=True, timeout=360)
            said = " ".join((watch.stdout + watch.stderr).split())
            assert watch.returncode == 1 and f"Flow run finished in state '{REFUSED}'." in said, said[-3000:]
            # (the run's ERROR line with the full reason may reach the server after the watch ended)
            assert "Traceback" not in said, said[-3000:]
            (refused,) = [fr for fr in httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
                          if fr["state"]["name"] == REFUSED]
            assert refused["state"]["message"].startswith("nightly tiny 2026-11-21 already has a report")

        page = chromium.new_page(viewport={"width": 1400, "height": 900})
        ui = api.removesuffix("/api")
        page.goto(f"{ui}/runs/flow-run/{first['id']}", wait_until="networkidle", timeout=60_000)
        page.get_by_text(first["name"]).first.wait_for(timeout=30_000)
        page.get_by_text("Completed").first.wait_for(timeout=30_000)
        shot = tmp_path / "speedrun-run-page.png"
        page.screenshot(path=str(shot), full_page=True)
        # the run report's charts render in the UI (embedded: the UI cannot fetch file:// links)
        arts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [first["id"]]},
                                                                         "type": {"any_": ["markdown"]}}},
                          timeout=10).json()
        (report,) = [a for a in arts if (a.get("key") or "").startswith("speedrun-report-")]
        page.goto(f"{ui}/artifacts/artifact/{report['id']}", wait_until="networkidle", timeout=60_000)
        page.locator("img[alt=loss]").first.wait_for(timeout=30_000)
        widths = page.evaluate("Array.from(document.images).filter(i => i.src.startsWith('data:image/png'))"
                               ".map(i => i.complete ? i.naturalWidth : 0)")
        page.screenshot(path=str(tmp_path / "speedrun-report.png"), full_page=True)
        page.close()
        assert len(widths) >= 2 and all(w > 0 for w in widths), widths
        width, height = png_size(shot)
        assert width >= 1000 and height >= 600 and shot.stat().st_size > 30_000
