"""Open the report in a real headless Chromium and check it as a reader would see it, offline.

Driven over the Chrome DevTools protocol (aiohttp's websocket client, already a dependency of dvc): every
request, console message and exception is recorded while the page loads from disk. The page must make no
network request and no failed request, log no error, and every image must decode. A full-page screenshot is
saved to $DMD2_TEST_ARTIFACTS (default tests/artifacts/) for a human to look at.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from eval_helpers import eval_pipeline

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.xdist_group("eval_pipeline"),
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install -y chromium)"),
]
aiohttp = pytest.importorskip("aiohttp", reason="the DevTools client uses aiohttp's websocket support")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-port=0"]
TIMEOUT = 60.0


def artifacts_dir() -> Path:
    path = Path(os.environ.get("DMD2_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


class DevTools:
    """A minimal CDP client: numbered commands, and every event kept in arrival order."""

    def __init__(self, ws):
        self.ws, self.next_id, self.events = ws, 0, []

    async def _receive(self) -> dict:
        msg = await self.ws.receive(timeout=TIMEOUT)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"DevTools connection closed: {msg.type}")
        return json.loads(msg.data)

    async def send(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self._receive()
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    async def wait_for(self, method: str) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            msg = await self._receive()
            self.events.append(msg)
            if msg.get("method") == method:
                return msg

    def of(self, method: str) -> list[dict]:
        return [e["params"] for e in self.events if e.get("method") == method]


def start_chromium(profile: Path) -> tuple[subprocess.Popen, int]:
    with open(profile.parent / "chromium.log", "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    port_file = profile / "DevToolsActivePort"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text().split()[0])
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop_chromium(proc)
    raise RuntimeError(f"chromium did not open its DevTools port; see {profile.parent / 'chromium.log'}")


def stop_chromium(proc: subprocess.Popen) -> None:
    """Stop the process group this test started (the browser and its helpers), and only that."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


IMAGE_CHECK = """Promise.all(Array.from(document.images).map(img =>
  img.decode().then(() => true, () => false).then(ok => ({ok, w: img.naturalWidth, h: img.naturalHeight,
                                                          alt: img.alt}))))"""


async def inspect(port: int, url: str, screenshot: Path) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json(content_type=None)
        page = next(t for t in targets if t.get("type") == "page")
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = DevTools(ws)
            for domain in ("Page", "Runtime", "Log", "Network"):
                await cdp.send(f"{domain}.enable")
            # lay the page out at desktop width first, so the measured height is the one we capture
            await cdp.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
            await cdp.send("Page.navigate", url=url)
            await cdp.wait_for("Page.loadEventFired")
            images = (await cdp.send("Runtime.evaluate", expression=IMAGE_CHECK, awaitPromise=True,
                                     returnByValue=True))["result"]["value"]
            title = (await cdp.send("Runtime.evaluate", expression="document.title", returnByValue=True))["result"]["value"]
            size = (await cdp.send("Page.getLayoutMetrics"))["cssContentSize"]
            await cdp.send("Emulation.setDeviceMetricsOverride", width=1280, height=math.ceil(size["height"]),
                           deviceScaleFactor=1, mobile=False)
            shot = await cdp.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return {"images": images, "title": title, "height": size["height"],
                    "requests": [r["request"]["url"] for r in cdp.of("Network.requestWillBeSent")],
                    "failed": cdp.of("Network.loadingFailed"),
                    "console_errors": [c for c in cdp.of("Runtime.consoleAPICalled") if c["type"] in ("error", "assert")],
                    "exceptions": cdp.of("Runtime.exceptionThrown"),
                    "log_errors": [e["entry"] for e in cdp.of("Log.entryAdded") if e["entry"]["level"] == "error"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return eval_pipeline(tmp_path_factory)


def test_report_renders_offline_in_chromium(root, tmp_path):
    report = root / "results/mnist/report.html"
    screenshot = artifacts_dir() / "report_mnist.png"
    proc, port = start_chromium(tmp_path / "profile")
    try:
        seen = asyncio.run(inspect(port, report.resolve().as_uri(), screenshot))
    finally:
        stop_chromium(proc)

    assert seen["title"] == "DMD2 report: mnist"
    external = [u for u in seen["requests"] if not u.startswith(("file:", "data:", "about:"))]
    assert not external, f"the report fetched from the network: {external}"
    assert not seen["failed"], f"failed requests: {seen['failed']}"
    assert not seen["console_errors"] and not seen["exceptions"] and not seen["log_errors"], seen
    assert len(seen["images"]) >= 7, seen["images"]
    broken = [i for i in seen["images"] if not i["ok"] or i["w"] == 0 or i["h"] == 0]
    assert not broken, f"images that did not decode: {broken}"
    assert seen["height"] > 1500  # the whole report laid out, not an error page

    from PIL import Image

    with Image.open(screenshot) as shot:
        assert shot.width == 1280 and shot.height >= 1500
