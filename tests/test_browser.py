"""The Gradio app in a real browser: Playwright drives Debian's Chromium against `demos/app.py` on localhost.

Playwright's own browser download cannot work offline, so the tests launch /usr/bin/chromium
(`apt-get install chromium`; `make system-deps` does it as root). Screenshots go to
results/tmp/screenshots/.
"""
import os
import re
import tempfile

import pytest

from .app_server import ROOT, free_port, start_app

CHROMIUM = "/usr/bin/chromium"
SHOTS = os.path.join(ROOT, "results", "tmp", "screenshots")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_TIMEOUT = 240_000  # ms; the first request of a tab also loads its model

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="needs Debian's chromium: apt-get install chromium (make system-deps as root)")


@pytest.fixture(scope="module")
def server():
    """The app in its own process, on a free port given through Gradio's GRADIO_SERVER_PORT."""
    port = free_port()
    proc, url = start_app(["--threads", "1"], env={"GRADIO_SERVER_PORT": str(port)})
    if url is None:
        proc.kill()
        pytest.fail("the app did not start")
    assert url == f"http://127.0.0.1:{port}/"
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="tp-chromium-")  # a fresh profile, never the user's
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[*ARGS, f"--disk-cache-dir={profile}/cache"],
                              headless=True)
        yield b
        b.close()


def open_tab(browser, url, tab):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    page.get_by_role("tab", name=tab).click()
    return page


def fill(page, selector, value):
    box = page.locator(selector)
    box.fill(str(value))
    box.press("Tab")  # commit the value before clicking run


def shot(page, name):
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, name), full_page=True)


def kept_count(page, prefix="llm"):
    return re.search(r"keeps (\d+) of (\d+)", page.locator(f"#{prefix}-status").inner_text()).groups()


def test_llm_tab(server, browser):
    from playwright.sync_api import expect

    page = open_tab(browser, server, "LLM")
    fill(page, "#llm-layer textarea, #llm-layer input", "4")
    fill(page, "#llm-keep input", 0.5)
    fill(page, "#llm-max-new input", 6)
    page.click("#llm-run")
    expect(page.locator("#llm-status")).to_contain_text("keeps", timeout=RUN_TIMEOUT)
    kept, total = map(int, kept_count(page))
    assert 0 < kept < total
    assert page.locator("#llm-dense textarea").input_value().strip()
    assert page.locator("#llm-pruned textarea").input_value().strip()
    stats = page.locator("#llm-stats").inner_text()
    assert "prefill time" in stats and "FLOPs" in stats and "KV cache" in stats
    expect(page.locator("#llm-plot img, #llm-plot svg").first).to_be_visible()
    expect(page.locator("#llm-tokens")).to_contain_text("dropped at layer 4")
    shot(page, "app_llm.png")

    fill(page, "#llm-keep input", 1.5)  # a bad value typed in a box: the library's message, no trace
    page.click("#llm-run")
    expect(page.locator("#llm-status")).to_contain_text("keep_ratio must be a number in [0, 1], got 1.5",
                                                         timeout=RUN_TIMEOUT)
    assert "Traceback" not in page.content()
    shot(page, "app_llm_error.png")
    page.close()


def test_vit_tab(server, browser):
    from playwright.sync_api import expect

    page = open_tab(browser, server, "ViT")
    fill(page, "#vit-layer textarea, #vit-layer input", "2, 4")
    fill(page, "#vit-keep input", 0.5)
    page.click("#vit-run")
    expect(page.locator("#vit-status")).to_contain_text("dense says", timeout=RUN_TIMEOUT)
    expect(page.locator("#vit-dense")).to_contain_text("ankle boot")
    expect(page.locator("#vit-pruned")).to_contain_text("ankle boot")
    expect(page.locator("#vit-overlays img")).to_have_count(1)
    expect(page.locator("#vit-status")).to_contain_text("layer 2: 32 of 64 patches kept; layer 4: 16 of 64")
    expect(page.locator("#vit-status")).to_contain_text("forward time")
    shot(page, "app_vit.png")

    page.locator("#vit-model").get_by_text("tiny-clip").click()
    fill(page, "#vit-labels textarea, #vit-labels input", "ankle boot, bag, dress")
    fill(page, "#vit-layer textarea, #vit-layer input", "")
    page.click("#vit-run")
    expect(page.locator("#vit-status")).to_contain_text("FLOPs", timeout=RUN_TIMEOUT)
    expect(page.locator("#vit-dense")).to_contain_text("ankle boot")
    expect(page.locator("#vit-overlays img")).to_have_count(1)
    expect(page.locator("#vit-status")).to_contain_text("layer 2: 32 of 64 patches kept")  # tome's own layer, CLS aside
    page.close()


def test_lvlm_tab(server, browser):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(server)
    page.get_by_role("tab", name="LLM").wait_for()  # the page has rendered its tabs
    if page.get_by_role("tab", name="LVLM").count() == 0:
        pytest.skip("no LVLM adapter in this checkout yet, so no LVLM tab")
    page.get_by_role("tab", name="LVLM").click()
    fill(page, "#lvlm-keep input", 0.25)
    page.click("#lvlm-run")
    expect(page.locator("#lvlm-status")).to_contain_text("visual tokens", timeout=RUN_TIMEOUT)
    assert page.locator("#lvlm-dense textarea, #lvlm-dense input").first.input_value().strip()
    assert page.locator("#lvlm-pruned textarea, #lvlm-pruned input").first.input_value().strip()
    expect(page.locator("#lvlm-overlays img")).to_have_count(1)
    expect(page.locator("#lvlm-status")).to_contain_text("16 of 64 patches kept")
    shot(page, "app_lvlm.png")
    page.close()


def test_t2i_tab(server, browser):
    from playwright.sync_api import expect

    page = open_tab(browser, server, "Text to image")
    fill(page, "#t2i-budget input", 0.5)
    page.click("#t2i-run")
    expect(page.locator("#t2i-status")).to_contain_text("the judge reads", timeout=RUN_TIMEOUT)
    expect(page.locator("#t2i-status")).to_contain_text("FLOPs of one U-Net call")
    expect(page.locator("#t2i-dense img")).to_have_count(1)
    expect(page.locator("#t2i-pruned img")).to_have_count(1)
    shot(page, "app_t2i.png")
    page.close()


def test_two_users_at_once_keep_their_own_settings(server, browser):
    """Two browser contexts (two users), different keep ratios, requests in flight together."""
    from playwright.sync_api import expect

    pages = {}
    for keep in (0.25, 0.75):
        ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
        page = ctx.new_page()
        page.goto(server)
        page.get_by_role("tab", name="LLM").click()
        fill(page, "#llm-keep input", keep)
        fill(page, "#llm-max-new input", 4)
        pages[keep] = page
    solo = {}
    for keep, page in pages.items():  # each alone first
        page.click("#llm-run")
        expect(page.locator("#llm-status")).to_contain_text("keeps", timeout=RUN_TIMEOUT)
        solo[keep] = (kept_count(page), page.locator("#llm-pruned textarea").input_value())
    assert solo[0.25][0] != solo[0.75][0]
    before = {keep: page.locator("#llm-status").inner_text() for keep, page in pages.items()}
    for page in pages.values():  # now both at once
        page.click("#llm-run")
    for keep, page in pages.items():
        expect(page.locator("#llm-status")).not_to_have_text(before[keep], timeout=RUN_TIMEOUT)  # a new request
        expect(page.locator("#llm-status")).to_contain_text("keeps")
        assert (kept_count(page), page.locator("#llm-pruned textarea").input_value()) == solo[keep]
    shot(pages[0.25], "app_two_users_a.png")
    for page in pages.values():
        page.context.close()
