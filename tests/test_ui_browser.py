"""The status page in a real browser: headless Chromium (Debian's `chromium`, driven by
Playwright through executable_path; never `playwright install`) against a real
`corral serve` with real runners.

One server per module (a second one, with an API key, only for the key prompt).
Screenshots go to test-artifacts/ (ignored by git). Skipped, with the reason, when
there is no chromium or no playwright.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TINY, TINY_B
from tests.support.live_server import ROOT, ServerProcess

CHROMIUM = os.environ.get("CORRAL_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"
KEY = "browser-test-key"

pytestmark = [
    pytest.mark.e2e, pytest.mark.timeout(300),
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) or shutil.which("chromium")),
                       reason=f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)"),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(hf_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("ui-browser-home"), hf_cache) as s:
        yield s


class Page:
    """A browser tab on the status page that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any, url: str, ignore: tuple[str, ...] = ()) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.ignore = ignore
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(url + "/ui")

    def _console(self, message: Any) -> None:
        if message.type == "error" and not any(i in message.text for i in self.ignore):
            self.errors.append(message.text)

    def row(self, model: str) -> Any:
        return self.page.locator(f'#model-rows tr[data-model="{model}"]')

    def footprints(self) -> dict[str, int]:
        cells = self.page.locator("#permodel .footprint")
        return {cells.nth(i).get_attribute("data-model"): int(cells.nth(i).get_attribute("data-bytes"))
                for i in range(cells.count())}

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser: Any, server: ServerProcess) -> Iterator[Page]:
    p = Page(browser, server.url)
    yield p
    p.close()


def generate(server: ServerProcess, model: str, headers: dict[str, str] | None = None) -> None:
    with server.client(headers=headers or {}) as c:
        r = c.post("/api/generate", json={"model": model, "prompt": "Hi", "stream": False,
                                          "options": {"num_predict": 3}})
        assert r.status_code == 200, r.text


def ps_sizes(server: ServerProcess) -> dict[str, int]:
    models = httpx.get(server.url + "/api/ps").json()["models"]
    return {m["name"].removesuffix(":latest"): m["size"] for m in models}


def load_both(page: Page, server: ServerProcess) -> None:
    """Both test models loaded, each with its row on the page."""
    generate(server, TINY)
    generate(server, TINY_B)
    page.row(TINY).wait_for(timeout=5000)
    page.row(TINY_B).wait_for(timeout=5000)


def test_two_models_with_footprints_summing_to_ps_and_no_console_errors(page: Page, server: ServerProcess) -> None:
    load_both(page, server)
    sizes = ps_sizes(server)
    shown = page.footprints()
    assert shown == sizes and set(shown) == {TINY, TINY_B}
    # the memory bar holds each model's parts, and the requests table the two generates
    for model in (TINY, TINY_B):
        assert page.page.locator(f'#membar .seg[data-model="{model}"]').count() >= 3
    # a request is recorded as its response ends, so its row may come one update after the model's
    page.page.wait_for_function("document.querySelectorAll('#request-rows tr').length >= 2", timeout=5000)
    assert page.page.locator("#conn-text").inner_text() == "live"
    page.page.wait_for_function("document.getElementById('log').textContent.length > 0", timeout=5000)
    page.shot("ui-two-models")
    assert page.errors == []


def test_updates_within_2s_when_a_model_is_evicted(page: Page, server: ServerProcess) -> None:
    load_both(page, server)
    sizes = ps_sizes(server)
    with server.client() as c:
        # only one fits from now on: the next load evicts the other one for memory
        limit = max(sizes.values()) + 1024 * 1024
        assert c.patch("/api/settings", json={"memory_limit": limit}).status_code == 200
        try:
            assert c.post("/api/generate", json={"model": TINY_B, "keep_alive": 0}).status_code == 200
            page.row(TINY_B).wait_for(state="detached", timeout=2000)
            generate(server, TINY_B)  # evicts TINY
            assert TINY not in ps_sizes(server)
            evicted = time.monotonic()
            page.row(TINY).wait_for(state="detached", timeout=2000)
            assert time.monotonic() - evicted < 2
            page.row(TINY_B).wait_for(timeout=2000)
        finally:
            assert c.patch("/api/settings", json={"memory_limit": None}).status_code == 200  # the default
    page.shot("ui-after-eviction")
    assert page.errors == []


def test_unload_and_pin_from_the_page(page: Page, server: ServerProcess) -> None:
    generate(server, TINY)
    row = page.row(TINY)
    row.wait_for(timeout=5000)
    row.locator("button.pin").click()
    page.page.wait_for_function(
        f"document.querySelector('#model-rows tr[data-model=\"{TINY}\"] button.pin')?.textContent === 'Unpin'",
        timeout=5000)
    assert TINY in httpx.get(server.url + "/api/settings").json()["pinned"]
    page.row(TINY).locator("button.pin").click()
    page.page.wait_for_function(
        f"document.querySelector('#model-rows tr[data-model=\"{TINY}\"] button.pin')?.textContent === 'Pin'",
        timeout=5000)
    assert TINY not in httpx.get(server.url + "/api/settings").json()["pinned"]
    page.row(TINY).locator("button.unload").click()
    page.row(TINY).wait_for(state="detached", timeout=5000)
    assert TINY not in ps_sizes(server)
    # and load it again from the form
    page.page.fill("#load-name", TINY)
    page.page.click("#load-form button")
    page.row(TINY).locator(".badge.ready").wait_for(timeout=30000)
    assert TINY in ps_sizes(server)
    page.shot("ui-after-actions")
    assert page.errors == []


def test_key_prompt_then_data_after_entering_it(browser: Any, hf_cache: Path,
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("ui-browser-key-home")
    with ServerProcess(home, hf_cache, env={"CORRAL_API_KEY": KEY}) as keyed:
        generate(keyed, TINY, headers={"Authorization": f"Bearer {KEY}"})
        # the browser logs each 401 answer as a failed resource load: expected here
        p = Page(browser, keyed.url, ignore=("401",))
        try:
            p.page.locator("#keyform").wait_for(state="visible", timeout=5000)
            assert not p.page.locator("#models").is_visible()
            p.shot("ui-key-prompt")
            p.page.fill("#key-input", "wrong")
            p.page.click("#key-form button")
            p.page.wait_for_function("document.getElementById('conn-text').textContent === 'wrong API key'",
                                     timeout=5000)
            p.page.fill("#key-input", KEY)
            p.page.click("#key-form button")
            p.row(TINY).wait_for(timeout=5000)
            assert p.page.evaluate("sessionStorage.getItem('corral.apiKey')") == KEY
            assert p.page.locator("#conn-text").inner_text() == "live"
            p.row(TINY).locator("button.unload").click()  # actions carry the key too
            p.row(TINY).wait_for(state="detached", timeout=5000)
            p.shot("ui-key-entered")
            assert p.errors == []
        finally:
            p.close()
