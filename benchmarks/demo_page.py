"""The demo page as a person meets it, in real Chromium: ``python -m benchmarks.demo_page --tracking-uri URI
--image PHOTO --second-image PHOTO``. Starts ``python -m llm_caption.demo`` on a free port and measures

* ``page_up_s``: from the command's start until the page has loaded in the browser (models still loading);
* ``models_loaded_s``: until the demo's log says the captioners and the chat model are loaded;
* ``first_caption_s``: upload -> captions on the page, the first upload (it may wait for the captioners);
* ``caption_s``: upload -> captions on the page once the models are loaded (the second photo);
* ``chat_first_text_s`` / ``chat_answer_s``: send -> first streamed text / the whole answer on the page.

Screenshots of both tabs go to ``--shots`` (the README's are taken this way on the real registry). The figures are
printed as JSON; ``--json`` writes them to a file as well. Helpers for reading the page are shared with
``tests/test_demo.py``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PROMPT = "یک شعر کوتاه درباره دانشگاه تهران بنویس"


def table_rows(page, elem_id: str) -> list[list[str]]:
    """The data rows of a Gradio 6 Dataframe as text. It is virtualised: the rows are ``<div role="row">`` of
    ``<div role="gridcell">``; its only ``<tbody>`` is a hidden sizing row, and the header a ``<tr>`` of ``<th>``."""
    return page.locator(f"#{elem_id} [role=row]:has([role=gridcell])").evaluate_all(
        "rows => rows.sort((a, b) => Number(a.getAttribute('aria-rowindex')) - Number(b.getAttribute('aria-rowindex')))"
        ".map(r => Array.from(r.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim()))")


def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 180.0, page=None):
    """``predicate()`` once it is truthy; an AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if page is not None:
            page.wait_for_timeout(100)
        else:
            time.sleep(0.1)


def caption_rows(page) -> list[list[str]]:
    return [r for r in table_rows(page, "captions") if len(r) == 2 and r[1]]


def settled_text(locator, quiet_s: float = 2.0) -> Callable[[], str | None]:
    """A predicate: the last element's text once it has stopped changing for ``quiet_s`` (a streamed answer)."""
    seen = {"text": None, "since": 0.0}

    def check() -> str | None:
        text = locator.last.inner_text().strip() if locator.count() else ""
        if not text or "…" in text:
            seen["text"] = None
            return None
        if text != seen["text"]:
            seen.update(text=text, since=time.monotonic())
            return None
        return text if time.monotonic() - seen["since"] >= quiet_s else None
    return check


def measure(tracking_uri: str, image: Path, second_image: Path, shots: Path | None, prompt: str = PROMPT,
            threads: int | None = None, cwd: Path | None = None) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    from .latency import _free_port

    port = _free_port()
    log_path = Path(cwd or ".") / "demo_page.log"
    cmd = [sys.executable, "-m", "llm_caption.demo", "--tracking-uri", tracking_uri, "--port", str(port)]
    if threads:
        cmd += ["--threads", str(threads)]
    figures: dict[str, Any] = {}
    with log_path.open("w") as log:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"})
        url = f"http://127.0.0.1:{port}"
        try:
            def up() -> bool:
                assert proc.poll() is None, f"the demo exited: see {log_path}"
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        return response.status == 200
                except OSError:
                    return False

            wait_for(up, "the demo's HTTP server", timeout_s=120)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 1000}, locale="en-US")
                    page.goto(url, wait_until="networkidle", timeout=120_000)
                    figures["page_up_s"] = time.monotonic() - start

                    upload = page.locator("#caption-upload input[type=file]")
                    sent = time.monotonic()
                    upload.set_input_files(str(image))
                    rows = wait_for(lambda: caption_rows(page), "captions", page=page, timeout_s=600)
                    figures["first_caption_s"] = time.monotonic() - sent

                    def loaded() -> bool:
                        text = log_path.read_text(errors="replace")
                        return "chat model" in text and " loaded" in text.split("chat model", 1)[1] or \
                            "could not be loaded" in text
                    wait_for(loaded, "the models", timeout_s=600, page=page)
                    figures["models_loaded_s"] = time.monotonic() - start

                    # a second, different photo once the models are loaded: the page's rows change when its
                    # captions arrive (clearing the upload leaves the last captions on the page)
                    first_rows = rows
                    first_maps = page.locator("#heatmaps img").first.get_attribute("src")
                    page.locator("#caption-upload").get_by_role("button", name="Clear", exact=True).click()
                    wait_for(lambda: page.locator("#caption-upload input[type=file]").count(), "the cleared upload",
                             page=page)
                    sent = time.monotonic()
                    page.locator("#caption-upload input[type=file]").set_input_files(str(second_image))

                    def new_rows():
                        now = caption_rows(page)
                        maps = page.locator("#heatmaps img")
                        moved = now != first_rows or (maps.count() and maps.first.get_attribute("src") != first_maps)
                        return now if now and moved else None
                    rows = wait_for(new_rows, "the second photo's captions", page=page)
                    figures["caption_s"] = time.monotonic() - sent
                    figures["captions"] = rows
                    heat = page.locator("#heatmaps img")
                    figures["heatmaps"] = heat.count()
                    if shots:  # after Gradio's pending fade on the outputs has gone
                        page.wait_for_timeout(2000)
                        page.screenshot(path=str(shots / "demo_captions.png"), full_page=True)

                    page.get_by_role("tab", name="Persian chat").click()
                    page.locator("#chat-input textarea").fill(prompt)
                    said = page.locator('#chatbot [data-testid="bot"]')
                    sent = time.monotonic()
                    page.locator("#chat-send").click()
                    wait_for(lambda: said.count() and said.last.inner_text().strip() not in ("", "…"),
                             "the first streamed text", page=page)
                    figures["chat_first_text_s"] = time.monotonic() - sent
                    answer = wait_for(settled_text(said), "the chat answer", page=page, timeout_s=600)
                    figures["chat_answer_s"] = time.monotonic() - sent - 2.0  # less the 2 s of quiet that settle it
                    figures["answer"] = answer
                    if shots:
                        page.screenshot(path=str(shots / "demo_chat.png"), full_page=True)
                finally:
                    browser.close()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    figures["traceback_in_log"] = "Traceback" in log_path.read_text(errors="replace")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_page", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="the store whose registry the page reads")
    parser.add_argument("--image", type=Path, required=True, help="the photo to upload first")
    parser.add_argument("--second-image", type=Path, required=True,
                        help="another photo, uploaded once the models are loaded (caption_s)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--shots", type=Path, default=None, help="folder for demo_captions.png and demo_chat.png")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.shots:
        args.shots.mkdir(parents=True, exist_ok=True)
    figures = measure(args.tracking_uri, args.image, args.second_image, args.shots, args.prompt, args.threads)
    text = json.dumps(figures, ensure_ascii=False, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
