"""The kiosk page in a real headless Chromium (Debian's chromium + chromedriver) against the
real service streaming a real clip through a real bundle. Between them sits a TCP relay that
the test can unplug, as a screen's network or a browser tab going away would."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import references, speech_dir
from service_helpers import Service

from edgestream.export.wer import word_error_rate

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

# Record every change of a caption element, so the test sees a partial become its final.
OBSERVE = """
window.__changes = [];
new MutationObserver(() => {
  for (const el of document.querySelectorAll('#captions .line'))
    window.__changes.push([el.id, el.className, el.textContent]);
}).observe(document.getElementById('captions'), {subtree: true, childList: true,
                                                  characterData: true, attributes: true});
"""


class Relay:
    """localhost TCP relay to the service; `unplug()` drops every connection and refuses new
    ones until `plug()`."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def unplug(self) -> None:
        self.up = False
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self.sockets = []

    def plug(self) -> None:
        self.up = True

    def close(self) -> None:
        self.unplug()
        self.listener.close()


@pytest.fixture
def browser():  # type: ignore[no-untyped-def]
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("EDGESTREAM_SYSTEM_TESTS") == "required":
            pytest.fail("chromium and chromedriver are missing: bash devices/setup.sh test "
                        "installs them (apt install chromium chromium-driver)")
        pytest.skip("needs Debian's chromium and chromium-driver (apt install chromium "
                    "chromium-driver)")
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--kiosk",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,720",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    driver.set_window_size(1280, 720)
    yield driver
    driver.quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def start(bundle: Path, clip: str, port: int, events: Path) -> Service:
    return Service(["--bundle", str(bundle), "--input", str(speech_dir() / clip),
                    "--serve", f"127.0.0.1:{port}", "--jsonl", str(events), "--threads", "1"], {})


def finals_in(events: Path) -> list[dict]:
    if not events.exists():
        return []
    return [e for e in map(json.loads, events.read_text().splitlines()) if e["type"] == "final"]


def test_page_shows_captions_reconnects_and_survives_a_restart(real_bundle: Path, browser,  # type: ignore[no-untyped-def]
                                                               tmp_path: Path) -> None:
    port = free_port()
    first = start(real_bundle, "beckett.wav", port, tmp_path / "a.jsonl")
    relay = Relay(port)
    try:
        first.url()
        browser.get(f"http://127.0.0.1:{relay.port}/")
        browser.execute_script(OBSERVE)
        wait_until(lambda: browser.find_element("id", "state").get_attribute("data-state")
                   == "live", 20, "the page to connect")
        # the clip is 10 s, streamed in real time: wait for its six lines on the page
        wait_until(lambda: len(browser.find_elements("css selector", ".line.final")) >= 6,
                   40, "six final lines")
        changes = browser.execute_script("return window.__changes")
        shown = [t.strip() for t in browser.execute_script(
            "return [...document.querySelectorAll('.line.final')].map(e => e.textContent)")]
        sent = finals_in(tmp_path / "a.jsonl")
        assert shown == [f["text"] for f in sent if f["text"]]
        assert word_error_rate([references()["beckett.wav"]], [" ".join(shown)]) <= 0.1, shown
        # at least one line was shown as a partial first and replaced in place by its final
        partial_ids = {c[0] for c in changes if "partial" in c[1]}
        final_ids = {c[0] for c in changes if "final" in c[1]}
        assert partial_ids & final_ids, changes

        # the screen goes away; the service restarts and captions a new clip meanwhile
        relay.unplug()
        wait_until(lambda: browser.find_element("id", "state").get_attribute("data-state")
                   == "offline", 10, "the page to notice")
        assert first.stop() == 0
        second = start(real_bundle, "arctic_a0007.wav", port, tmp_path / "b.jsonl")
        try:
            second.url()
            wait_until(lambda: [f for f in finals_in(tmp_path / "b.jsonl") if f["text"]], 40,
                       "the restarted service's first final")
            time.sleep(2.0)  # the clip's last words
            missed = [f["text"] for f in finals_in(tmp_path / "b.jsonl") if f["text"]]
            relay.plug()
            wait_until(lambda: browser.find_elements("css selector", ".divider"), 20,
                       "the page to reconnect and say the service restarted")
            banner = browser.find_element("id", "banner")
            assert banner.is_displayed() and "restarted" in banner.text
            texts = wait_until(lambda: [e.text for e in browser.find_elements(
                "css selector", ".divider ~ .line.final")] or None, 10, "the missed finals")
            assert texts[: len(missed)] == missed, (texts, missed)
            assert word_error_rate([references()["arctic_a0007.wav"]], [" ".join(texts)]) <= 0.35
            # the captions from before the restart are still on the screen, above the divider
            assert len(browser.find_elements("css selector", ".line.final")) >= 6 + len(missed)
            ARTIFACTS.mkdir(exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "kiosk.png"))
            browser.get(f"http://127.0.0.1:{relay.port}/?theme=dark")
            wait_until(lambda: len(browser.find_elements("css selector", ".line.final")) > 0,
                       10, "the replay after a reload")
            time.sleep(0.5)
            browser.save_screenshot(str(ARTIFACTS / "kiosk-dark.png"))
            assert (ARTIFACTS / "kiosk.png").stat().st_size > 10_000
        finally:
            assert second.stop() == 0
    finally:
        relay.close()
        if first.proc.poll() is None:
            first.stop()
