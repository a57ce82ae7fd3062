"""The chat page at / in headless Chromium (Debian's `chromium`, driven by Playwright; never a
browser download): send a message, watch the reasoning and the answer stream in apart, read the
stats line, send a follow-up and check what went over the wire (no reasoning in the history).

The screenshot is kept as an artifact: printed path under pytest's tmp_path, and copied into
$NANOSEEK_ARTIFACTS when that is set. Skipped, saying why, when no Chromium is installed.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from serving import ANSWER, REASONING, Server, thinking_checkpoint

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
                             shutil.which("chromium")) if p and Path(p).is_file()), None)
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the [test] extra")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found: apt-get install -y chromium "
                                                         "(or set CHROMIUM=/path/to/chromium)")


@pytest.fixture(scope="module")
def server():
    s = Server(thinking_checkpoint(), "--served-model-name", "tiny-thinker")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(server):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 900, "height": 700})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def test_chat_page_streams_reasoning_and_answer(server, page, tmp_path):
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny-thinker'")
    page.click("#settings summary")                                # open the settings block
    page.fill("#temperature", "0")
    # count the updates the reasoning block gets: more than one means it streamed in
    page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
        .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#prompt", "What is 2+2?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".turn.assistant[data-done=true]")
    turn = page.locator(".turn.assistant").first
    assert turn.locator(".reasoning-text").text_content() == REASONING
    assert turn.locator(".answer").inner_text() == ANSWER
    assert turn.locator("details.reasoning").get_attribute("open") is None      # folded once the answer began
    stats = turn.locator(".stats").inner_text()
    assert "tok/s" in stats and "cache hits 0/" in stats and "$0.0" in stats, stats
    assert page.evaluate("window.updates") > 10

    page.fill("#prompt", "Hi!")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.turn.assistant[data-done=true]').length === 2")
    second = page.locator(".turn.assistant").nth(1).locator(".stats").inner_text()
    assert "cache hits 0/" not in second, second                  # the first turn's prefix was cached
    page.locator(".turn.assistant details.reasoning summary").first.click()     # unfold the first reasoning again
    assert turn.locator(".reasoning-text").inner_text() == REASONING
    screenshot = tmp_path / "chat.png"
    page.screenshot(path=str(screenshot), full_page=True)
    if os.environ.get("NANOSEEK_ARTIFACTS"):
        Path(os.environ["NANOSEEK_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(os.environ["NANOSEEK_ARTIFACTS"]) / "chat.png")
    print(f"screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000

    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]
    assert sent[1]["messages"][1] == {"role": "assistant", "content": ANSWER}       # no reasoning sent back
    assert sent[0]["stream"] is True and sent[0]["stream_options"] == {"include_usage": True}


def test_chat_page_shows_errors(server, page):
    page.goto(server.url + "/")
    page.click("#settings summary")
    page.fill("#max-tokens", "999999")                             # beyond the context: the server says 400
    page.fill("#prompt", "What is 2+2?")
    page.press("#prompt", "Enter")
    error = page.wait_for_selector(".turn.assistant .error")
    assert "max_tokens" in error.inner_text()
    page.fill("#max-tokens", "1024")
