"""kedro-viz as a user sees it: the server starts, headless Chromium renders every pipeline.

Needs Debian's ``chromium`` (``make browser`` installs it). The server runs in its own process
group, which is stopped as a whole (uvicorn leaves a child behind otherwise).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kedro.framework.project import pipelines
from kedro.framework.startup import bootstrap_project

from conftest import REPO_ROOT
from servers import free_port, stop_group, wait_for_http

PIPELINES = ("data_engineering", "llm_finetuning", "caption_training", "evaluation", "reporting")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# Skip kedro-viz's feature tour so its pop-up does not cover the graph.
NO_TOUR = """localStorage.setItem("KedroViz", JSON.stringify({"showFeatureHints": false, "featureHintStep": 0}));"""


@pytest.fixture
def viz_server(tmp_path):
    """``kedro viz run`` on the project, in its own process group; yields the base URL."""
    port = free_port()
    log = (tmp_path / "kedro_viz.log").open("w")
    kedro = Path(sys.executable).with_name("kedro")
    proc = subprocess.Popen([str(kedro), "viz", "run", "--no-browser", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/api/main", proc, tmp_path / "kedro_viz.log")
        yield url
    finally:
        stop_group(proc)
        log.close()


def namespaces(name: str) -> set[str]:
    """Top-level namespaces of a pipeline's nodes (kedro-viz draws each as one collapsed node)."""
    return {n.namespace.split(".")[0] for n in pipelines[name].nodes if n.namespace}


def _expected_node(pipeline) -> str:
    """A node kedro-viz draws for ``pipeline``: a top-level node, or the collapsed namespace of a nested one."""
    for node in pipeline.nodes:
        if not node.namespace:
            return node.name
    return pipeline.nodes[0].namespace.split(".")[0]


def test_kedro_viz_renders_all_five_pipelines(viz_server):
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM) or Path(CHROMIUM).exists(), \
        "Debian chromium is not installed: run `make browser` (apt-get install -y chromium)"
    bootstrap_project(REPO_ROOT)
    expected = {name: _expected_node(pipelines[name]) for name in PIPELINES}
    screenshot = REPO_ROOT / "data" / "08_reporting" / "kedro_viz.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.add_init_script(NO_TOUR)
            page.goto(viz_server, wait_until="networkidle", timeout=120_000)
            page.wait_for_selector(".pipeline-node", timeout=120_000)
            page.screenshot(path=str(screenshot))

            selector = page.locator("[data-test='kedro-pipeline-selector']")
            selector.locator(".dropdown__label").click()
            listed = set(selector.locator(".menu-option__content").evaluate_all("els => els.map(e => e.title)"))
            assert set(PIPELINES) <= listed, f"pipeline selector lists {sorted(listed)}"
            selector.locator(".dropdown__label").click()

            for name in PIPELINES:
                selector.locator(".dropdown__label").click()
                selector.locator(f".menu-option__content[title='{name}']").click()
                assert selector.locator(".dropdown__label").inner_text().strip() == name
                node = page.locator(f".pipeline-node[data-node-fullname='{expected[name]}']")
                node.first.wait_for(state="visible", timeout=60_000)
                # wait for the transition to end: the drawn task nodes are exactly this pipeline's
                wanted = {n.name for n in pipelines[name].nodes if not n.namespace}
                deadline = time.monotonic() + 60
                while True:
                    drawn = set(page.locator(".pipeline-node--task").evaluate_all(
                        "els => els.map(e => e.getAttribute('data-node-fullname'))"))
                    if wanted <= drawn and not (drawn - wanted - namespaces(name)):
                        break
                    assert time.monotonic() < deadline, f"{name}: drawn {sorted(drawn)}, expected {sorted(wanted)}"
                    page.wait_for_timeout(250)
                page.wait_for_timeout(800)  # let the layout animation settle for the screenshot
                page.screenshot(path=str(screenshot.with_name(f"kedro_viz_{name}.png")))
        finally:
            browser.close()
    for path in [screenshot] + [screenshot.with_name(f"kedro_viz_{name}.png") for name in PIPELINES]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
