"""The web UI in a real browser, on the topology docker-compose.yml runs: a user-code gRPC server, dagster-webserver
and dagster-daemon reading a workspace.yaml made from docker/workspace.yaml (host and port pointed at loopback).

Chromium is Debian's (``/usr/bin/chromium``, or ``$MLLM_CHROMIUM``), driven through the Playwright Python package
(no browser download). The test opens the ingest group's asset graph and saves a screenshot of it, clicks
**Materialize all** (the raw assets run on the embedded demo corpus), waits for the run to succeed on its run page,
and reads ``rows_kept`` on raw_cc3m's asset page. Then it backfills a shard range of images_cc3m from the asset's
Materialize dialog (all three partitions, one run) and checks every shard was downloaded. Screenshots go to the
test's tmp_path and, when set, to ``$MLLM_TEST_ARTIFACTS``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mllm_pipeline_tests.deploy.conftest import REPO, free_port, unavailable

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SLOW = 180_000  # ms: this machine is slow, and a run first imports the whole code location


class Servers:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.home = tmp_path / "dagster_home"
        self.home.mkdir()
        # local instance (SQLite, queued runs that the daemon launches); no first-visit dialog, no telemetry
        (self.home / "dagster.yaml").write_text("nux:\n  enabled: false\ntelemetry:\n  enabled: false\n")
        self.env = {**os.environ, "DAGSTER_HOME": str(self.home), "MLLM_STORAGE_ROOT": str(tmp_path / "root"),
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("MLLM_DEMO_DIR", None)
        # the demo's media are served on loopback by the test, like a local mirror: loopback allowed explicitly
        self.env["MLLM_ALLOW_LOOPBACK"] = "1"
        self.env["MLLM_DEMO_MEDIA_URL"] = f"http://127.0.0.1:{free_port()}"
        self.env.pop("MLLM_WATCH_CONFIG", None)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.bindir = Path(sys.executable).parent

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n{self.log(name)}")
            if ready():
                return
            time.sleep(1)
        raise TimeoutError(f"{what} not ready after {timeout:.0f}s:\n" + "\n".join(
            f"--- {n}\n{self.log(n)}" for n, _ in self.procs))

    def stop(self) -> None:
        for _, proc in reversed(self.procs):  # each was started in its own session: its group id is its pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def dagster_ui(tmp_path) -> Iterator[str]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    servers = Servers(tmp_path)
    from mllm_pipeline.demo.paths import ensure_demo_corpus
    from mllm_pipeline.storage import Storage

    os.environ["MLLM_DEMO_MEDIA_URL"] = servers.env["MLLM_DEMO_MEDIA_URL"]
    ensure_demo_corpus(Storage(servers.env["MLLM_STORAGE_ROOT"]))  # generated first, as a user would
    grpc_port, ui_port = free_port(), free_port()
    # the user-code server exactly as the compose service runs it, on loopback and a free port
    argv = list(compose["services"]["user-code"]["command"])
    argv[argv.index("-h") + 1], argv[argv.index("-p") + 1] = "127.0.0.1", str(grpc_port)
    workspace = yaml.safe_load((REPO / "docker" / "workspace.yaml").read_text())
    workspace["load_from"][0]["grpc_server"].update(host="127.0.0.1", port=grpc_port)
    (tmp_path / "workspace.yaml").write_text(yaml.safe_dump(workspace))
    try:
        servers.start("user-code", [str(servers.bindir / argv[0]), *argv[1:]])
        health = [str(servers.bindir / "dagster"), "api", "grpc-health-check", "-p", str(grpc_port)]
        servers.wait("the user-code server", lambda: subprocess.run(
            health, env=servers.env, capture_output=True).returncode == 0, 300)
        servers.start("webserver", [str(servers.bindir / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(ui_port),
                                    "-w", str(tmp_path / "workspace.yaml")])
        servers.start("daemon", [str(servers.bindir / "dagster-daemon"), "run", "-w", str(tmp_path / "workspace.yaml")])
        base = f"http://127.0.0.1:{ui_port}"
        servers.wait("the webserver", lambda: _http_ok(f"{base}/server_info"), 300)
        from mllm_pipeline.demo.paths import demo_media_served

        with demo_media_served(Storage(servers.env["MLLM_STORAGE_ROOT"])):
            yield base
    finally:
        os.environ.pop("MLLM_DEMO_MEDIA_URL", None)
        servers.stop()
        for name, _ in servers.procs:
            (tmp_path / f"{name}.log").exists() and print(f"--- {name}.log (tail)\n{servers.log(name)[-1500:]}")


def _save(path: Path) -> None:
    target = os.environ.get("MLLM_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


@pytest.fixture
def browser_page(tmp_path):
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        unavailable("the playwright Python package is not installed (pip install playwright)")
    chromium = os.environ.get("MLLM_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).exists():
        unavailable(f"Chromium is not installed at {chromium} (apt-get install chromium, or set MLLM_CHROMIUM)")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000})
        context.set_default_timeout(SLOW)
        # expect() has its own 5 s default, which a loaded 2-core machine overruns while the graph's nodes load
        expect.set_options(timeout=SLOW)
        try:
            yield context.new_page()
        finally:
            context.close()


def test_materialize_the_demo_raw_assets_from_the_ui(dagster_ui, browser_page, tmp_path):
    from playwright.sync_api import expect

    page = browser_page
    # the ingest group's asset graph
    page.goto(f"{dagster_ui}/locations/mllm_pipeline/asset-groups/ingest", wait_until="domcontentloaded")
    for name in ("raw_cc3m", "raw_webvid", "raw_internvid"):
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    expect(page.get_by_text("Never materialized").first).to_be_visible()  # the nodes have their status
    expect(page.get_by_text("Loading...")).to_have_count(0)
    graph = tmp_path / "asset_graph.png"
    page.screenshot(path=str(graph))
    _save(graph)
    assert graph.stat().st_size > 10_000

    # the README's steps in Dagster 1.13's UI: Jobs, demo_pipeline, Materialize all (the job's default config names
    # the demo corpus's files); the run is the newest on the Runs page
    page.goto(dagster_ui, wait_until="domcontentloaded")
    page.locator("a[href='/jobs']").first.click()  # the navigation bar's Jobs
    page.get_by_text("demo_pipeline", exact=True).first.click()
    page.get_by_text("Materialize all", exact=True).first.click()
    with contextlib.suppress(Exception):  # a launchpad opens first when the config needs a look: launch from it
        page.get_by_role("button", name=re.compile(r"^Launch run$")).first.click(timeout=20_000)
    run_link = page.locator("a[href*='/runs/']").filter(has_text=re.compile(r"^[0-9a-f]{8}$")).first
    deadline = time.time() + SLOW / 1000
    while True:  # the launch is a request of its own: look for its run on the Runs page until it is there
        page.goto(f"{dagster_ui}/runs", wait_until="domcontentloaded")
        with contextlib.suppress(Exception):
            run_link.wait_for(timeout=15_000)
        if run_link.count() or time.time() > deadline:
            break
    expect(run_link).to_be_visible()
    run_id = re.search(r"/runs/([0-9a-f-]{36})", run_link.get_attribute("href")).group(1)

    # the run page: wait for Success (the daemon launches it from the queue, then 6 assets on the demo corpus)
    page.goto(f"{dagster_ui}/runs/{run_id}", wait_until="domcontentloaded")
    status = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
    expect(status).to_be_visible(timeout=600_000)
    run_shot = tmp_path / "run.png"
    page.screenshot(path=str(run_shot))
    _save(run_shot)
    assert status.inner_text() == "Success"

    # the asset page shows the materialization's metadata
    page.goto(f"{dagster_ui}/assets/raw_cc3m", wait_until="domcontentloaded")
    expect(page.get_by_text("rows_kept", exact=True).first).to_be_visible()
    row = page.locator("tr", has=page.get_by_text("rows_kept", exact=True)).first
    kept = int(row.locator("td").last.inner_text().strip().replace(",", ""))
    asset_shot = tmp_path / "raw_cc3m.png"
    page.screenshot(path=str(asset_shot), full_page=True)
    _save(asset_shot)

    from mllm_pipeline.storage import Storage

    assert kept == Storage(str(tmp_path / "root")).read_manifest("raw/cc3m")["rows_kept"] > 0

    # a backfill of a shard range from the UI: raw_cc3m again in 20-row shards (3 partitions), then images_cc3m's
    # Materialize dialog, all partitions, Launch backfill; the daemon runs it (one run: single-run backfill policy)
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "MLLM_STORAGE_ROOT": str(tmp_path / "root")}
    env.pop("MLLM_DEMO_DIR", None)
    import json

    from mllm_pipeline.demo.config import raw_run_config
    from mllm_pipeline.demo.paths import demo_dir

    cc3m = {**raw_run_config(demo_dir(Storage(str(tmp_path / "root"))))["ops"]["raw_cc3m"]["config"], "rows_per_shard": 20}
    cli = subprocess.run([str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "mllm_pipeline.definitions",
                          "--select", "raw_cc3m", "--config-json", json.dumps({"ops": {"raw_cc3m": {"config": cc3m}}})],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    page.goto(f"{dagster_ui}/assets/images_cc3m", wait_until="domcontentloaded")
    page.get_by_role("button", name=re.compile(r"Materialize…")).first.click()
    page.get_by_role("button", name="All", exact=True).click()
    expect(page.get_by_text("3 partitions", exact=True)).to_be_visible()
    expect(page.get_by_text("shard-00002").first).to_be_visible()
    page.get_by_role("button", name="Launch backfill").click()
    backfill = page.locator("a[href*='/runs/b/']").first
    expect(backfill).to_be_visible()
    href = backfill.get_attribute("href")
    backfill_id = href.rstrip("/").rsplit("/", 1)[-1]
    import dagster as dg

    deadline = time.monotonic() + 600
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        while (status := instance.get_backfill(backfill_id).status.value) in ("REQUESTED", "CANCELING", "FAILING"):
            assert time.monotonic() < deadline, "the backfill did not finish in 10 minutes"
            time.sleep(2)
        error = instance.get_backfill(backfill_id).error
    page.goto(dagster_ui + href, wait_until="domcontentloaded")
    page.screenshot(path=str(tmp_path / "backfill.png"), full_page=True)  # kept if the next step fails
    expect(page.get_by_text("Succeeded", exact=True).first).to_be_visible(timeout=SLOW)  # what the user sees
    backfill_shot = tmp_path / "backfill.png"
    page.screenshot(path=str(backfill_shot), full_page=True)
    _save(backfill_shot)
    assert status in ("COMPLETED", "COMPLETED_SUCCESS"), (status, error)
    storage = Storage(str(tmp_path / "root"))
    raw = storage.read_manifest("raw/cc3m")
    for i, shard in enumerate(raw["shards"]):
        summary = storage.read_manifest(f"media/cc3m/shard-{i:05d}")["summary"]
        assert summary["attempted"] == shard["rows"], (i, summary, shard)
        assert summary["succeeded"] >= shard["rows"] - 1, (i, summary)  # loopback allowed: only the demo's 404 fails

    # raw_cc3m again on the same file: up to date, same data version, so the media stay fresh ...
    def materialize_raw() -> None:
        proc = subprocess.run([str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m",
                               "mllm_pipeline.definitions", "--select", "raw_cc3m", "--config-json",
                               json.dumps({"ops": {"raw_cc3m": {"config": cc3m}}})],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    materialize_raw()
    assert _stale_status(dagster_ui, "images_cc3m", "shard-00000") == ("FRESH", [])
    # ... and after an upstream change (other shard boundaries) the UI marks them stale, naming raw_cc3m
    cc3m["rows_per_shard"] = 25
    materialize_raw()
    status, causes = _stale_status(dagster_ui, "images_cc3m", "shard-00000")
    assert status == "STALE" and any("raw_cc3m" in c for c in causes), (status, causes)
    page.goto(f"{dagster_ui}/assets/images_cc3m?partition=shard-00000", wait_until="domcontentloaded")
    expect(page.get_by_text("images_cc3m", exact=True).first).to_be_visible()
    expect(page.get_by_text("Loading...")).to_have_count(0)
    page.wait_for_timeout(5000)  # the status panel loads after the page (the picture is for people; the check is above)
    stale_shot = tmp_path / "images_cc3m_after_upstream_change.png"
    page.screenshot(path=str(stale_shot), full_page=True)
    _save(stale_shot)


def _stale_status(base: str, asset: str, partition: str) -> tuple[str, list[str]]:
    """What the UI's stale marker is computed from: the asset node's staleStatus and staleCauses (GraphQL)."""
    import json

    query = """query ($key: AssetKeyInput!, $p: String) { assetNodeOrError(assetKey: $key) {
        ... on AssetNode { staleStatus(partition: $p) staleCauses(partition: $p) { key { path } reason dependency { path } } } } }"""
    body = json.dumps({"query": query, "variables": {"key": {"path": [asset]}, "p": partition}}).encode()
    req = urllib.request.Request(f"{base}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        node = json.load(r)["data"]["assetNodeOrError"]
    return node["staleStatus"], [f"{'/'.join((c['dependency'] or c['key'])['path'])}: {c['reason']}"
                                 for c in node["staleCauses"]]
