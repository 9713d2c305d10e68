"""``python -m llm_caption.demo`` in real Chromium: a registry with two captioners (one with soft attention) and a
Persian chat model from a two-method study; the page captions an uploaded real image (every shown version, the
champion marked, attention heatmaps), streams the chat champion's answer, compares the study's methods, and says
what is wrong with a non-image upload. Screenshots go to ``$DEMO_SCREENSHOTS`` (default: the test's folder)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "llm"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.demo_page import CHROMIUM, CHROMIUM_ARGS, PROMPT, settled_text, table_rows, wait_for  # noqa: E402
from caption_fixtures import tiny_captioner  # noqa: E402
from chat_fixtures import load_conf  # noqa: E402
from gemma_fixtures import _gemma_spec, _gemma_tokenizer  # noqa: E402
from conftest import mlflow_state, restore_mlflow_state
from llm_caption.captioning.pyfunc import log_captioner
from llm_caption.llm.adapters import save_finetuned
from llm_caption.llm.experiment import method_settings
from llm_caption.llm.methods import MethodContext, build_method
from llm_caption.llm.models import load_model, load_tokenizer, write_tiny_gemma3
from llm_caption.llm.registration import register_adapter
from llm_caption.llm.text_metrics import persian_share
from llm_caption.registry import register_and_promote, showcase_versions
from servers import free_port, stop_group, wait_for_http

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# The tiny random chat model writes random words; a large penalty on other scripts keeps its letters Persian, so
# the page's Persian text is the model's own.
GENERATION = {"max_new_tokens": 8, "do_sample": False, "no_repeat_ngram_size": 3, "non_persian_penalty": 100.0}


def _method_model(spec, method, seed):
    cfg = load_conf("conf/base/parameters_llm_finetuning.yml")["llm_finetuning"]
    method_cfg, _ = method_settings(cfg, method)
    torch.manual_seed(seed)
    model = build_method(load_model(spec), method_cfg, MethodContext(tokenizer=load_tokenizer(spec), seed=seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model, method_cfg


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, empty_store):
    """The registry the page reads: image-captioner v1 (show_tell) and v2 (show_attend_tell, champion);
    persian-chat-adapter@champion, the LoRA of a study of two methods (LoRA, LoHa) on a tiny Gemma-3."""
    root = tmp_path_factory.mktemp("demo")
    shutil.copy2(empty_store, root / "mlflow.db")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    plain = tiny_captioner(root / "plain", architecture="show_tell")
    attention = tiny_captioner(root / "attention", architecture="show_attend_tell")
    spec = write_tiny_gemma3(root / "tiny_gemma", _gemma_tokenizer(), _gemma_spec())
    state = mlflow_state()
    cwd = os.getcwd()
    try:
        os.chdir(root)
        mlflow.set_tracking_uri(tracking)
        mlflow.set_experiment("demo")
        for value, cap in ((0.10, plain), (0.20, attention)):
            with mlflow.start_run():
                uri = log_captioner(cap["decoder"], cap["config"], cap["vocab"], cap["encoder_weights"])
            register_and_promote(uri, "image-captioner", "val_bleu4", value, True, "split-a",
                                 extra_tags={"architecture": cap["config"]["architecture"]})
        with mlflow.start_run(run_name="study"):
            runs = {}
            for seed, (method, bits, chrf) in enumerate((("lora", 2.0, 20.0), ("loha", 2.5, 15.0))):
                model, method_cfg = _method_model(spec, method, seed)
                adapter = save_finetuned(model, root / "adapters" / method, method, method_cfg, spec)
                with mlflow.start_run(run_name=method, nested=True, tags={"llm_caption.method": method}) as run:
                    mlflow.log_metrics({"bits_per_char": bits, "chrf_pp": chrf})
                    mlflow.log_artifacts(str(adapter), artifact_path="adapter")
                    runs[method] = (run.info.run_id, adapter)
            run_id, adapter = runs["lora"]
            decision = register_adapter(str(adapter), "lora", 2.0, "split-a", "persian-chat-adapter", run_id=run_id,
                                        generation=GENERATION, pip_requirements=["mlflow"], metric="bits_per_char")
        assert decision["promoted"], decision
        shown = showcase_versions("image-captioner", "architecture")
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        os.chdir(cwd)
        restore_mlflow_state(state)
    assert [(v["version"], v["champion"]) for v in shown] == [("2", True), ("1", False)]
    image = root / "photo.jpg"
    shutil.copy2(attention["image_paths"][0], image)
    return {"root": root, "tracking": tracking, "image": image, "adapters": runs}


@pytest.fixture(scope="module")
def demo_page(demo_store):
    port = free_port()
    log_path = demo_store["root"] / "demo.log"
    log = log_path.open("w")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "llm_caption.demo", "--tracking-uri", demo_store["tracking"],
                             "--port", str(port), "--threads", "1"], cwd=demo_store["root"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url, proc, log_path)
        yield {"url": url, "up_s": time.monotonic() - start, "log": log_path}
    finally:
        stop_group(proc)
        log.close()


def test_the_demo_page_captions_chats_and_refuses_in_chromium(demo_store, demo_page, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian chromium is not installed: run `make browser`"
    shots = Path(os.environ.get("DEMO_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is text, not a photo")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # en-US: Gradio picks its UI language (the File's "Clear" button) from the browser's locale.
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, locale="en-US")
            page.goto(demo_page["url"], wait_until="networkidle", timeout=120_000)

            # Captions: every shown version, the champion first and marked, heatmaps of the attention model.
            page.locator("#caption-upload input[type=file]").set_input_files(str(demo_store["image"]))
            rows = wait_for(lambda: [r for r in table_rows(page, "captions") if len(r) == 2 and r[1]],
                             "captions", page=page)
            assert len(rows) == 2, rows
            assert "v2" in rows[0][0] and "champion" in rows[0][0] and "show_attend_tell" in rows[0][0]
            assert "v1" in rows[1][0] and "champion" not in rows[1][0] and "show_tell" in rows[1][0]
            heat = page.locator("#heatmaps img")
            wait_for(lambda: heat.count() > 0, "heatmaps", page=page)
            assert heat.count() == len(rows[0][1].split())  # one map per word of the champion's caption
            source = heat.first.get_attribute("src")
            with urllib.request.urlopen(source if source.startswith("http") else demo_page["url"] + source) as r:
                assert r.read()[:4] in (b"\x89PNG", b"RIFF", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb")
            page.screenshot(path=str(shots / "demo_captions.png"), full_page=True)

            # A file that is not an image: a message on the page, no traceback. A single-file gr.File that holds a
            # file shows it with a Clear button and no file input: clear it first.
            page.locator("#caption-upload").get_by_role("button", name="Clear", exact=True).click()
            page.locator("#caption-upload input[type=file]").set_input_files(str(not_an_image))
            note = wait_for(lambda: "⚠" in page.locator("#caption-note").inner_text()
                             and page.locator("#caption-note").inner_text(), "the upload error", page=page)
            assert "notes.jpg" in note and "not an image in an accepted format" in note, note
            assert "Traceback" not in page.content()

            # Persian chat: the champion's answer, streamed into the page.
            page.get_by_role("tab", name="Persian chat").click()
            page.locator("#chat-input textarea").fill(PROMPT)
            page.locator("#chat-send").click()
            # Gradio 6 nests `.message` (a group div around each message div), so pick bubbles by role: the
            # message div of each bubble carries data-testid "user" or "bot".
            asked = page.locator('#chatbot [data-testid="user"]')
            said = page.locator('#chatbot [data-testid="bot"]')
            answer = wait_for(settled_text(said), "the chat answer", page=page)
            assert PROMPT in asked.first.inner_text()
            assert persian_share(answer) > 0.9, answer
            page.screenshot(path=str(shots / "demo_chat.png"), full_page=True)

            # Compare methods: one row per method of the study, with its figures and its answer.
            page.get_by_text("Compare methods").click()
            page.locator("#compare-send").click()
            def answered() -> list[list[str]] | None:  # one read of the table: it is re-rendered at every row
                rows = table_rows(page, "compare-table")
                return rows if len(rows) == 2 and all(len(r) == 4 and r[3] and r[3] != "…" for r in rows) else None

            compared = wait_for(answered, "the comparison", page=page)
            assert [r[:3] for r in compared] == [["lora", "2.000", "20.0"], ["loha", "2.500", "15.0"]]
            # the adapters answer through transformers in fp32, the champion's chat through bf16 layers
            # (llm/fast_gemma.py), so the champion's row need not be the chat tab's answer; two methods, two answers
            assert compared[0][3] != compared[1][3], compared
        finally:
            browser.close()
    assert "Traceback" not in demo_page["log"].read_text()
    assert demo_page["up_s"] < 120


def test_the_page_is_up_before_the_models(demo_store, tmp_path):
    """The page answers while the models load (here: before the captioners' first request)."""
    from llm_caption.demo import Backend, DemoError

    backend = Backend(demo_store["tracking"])
    with pytest.raises(DemoError, match="no file"):
        backend.caption_file(None)
    backend.start()
    out = backend.caption_file(str(demo_store["image"]))
    assert len(out["rows"]) == 2 and out["heatmaps"]
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (backend.image_limits.max_image_bytes + 1))
    with pytest.raises(DemoError, match="over the .*-byte limit"):
        backend.caption_file(str(big))
    with pytest.raises(DemoError, match="characters"):
        list(backend.stream_reply([{"role": "user", "content": "س" * 100_000}]))
