"""The dashboard in a real browser: headless Chromium, driven over the Chrome DevTools Protocol (a plain
websocket, through aiohttp), opens the dashboard of a two-node swarm, sees both nodes and the pipeline,
sends a chat and sees the streamed text. Screenshots land in tmp_path (and /work/notes when it exists)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests.swarm_harness import demo_pair, ready_swarm

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
NOTES = Path("/work/notes")
KEY = "browser-test-key"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)")


class Chromium:
    """One headless Chromium and its first page, spoken to over the DevTools websocket."""

    def __init__(self, profile: Path):
        self.profile = profile
        self.proc: subprocess.Popen | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws = None
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.exceptions: list[str] = []
        self.reader: asyncio.Task | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=open(self.profile.parent / "chromium.log", "wb"))
        port_file, deadline = self.profile / "DevToolsActivePort", time.monotonic() + 30
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            assert self.proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self.reader = asyncio.ensure_future(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")

    async def _read(self) -> None:
        async for msg in self.ws:
            frame = json.loads(msg.data)
            if "id" in frame and frame["id"] in self.pending:
                self.pending.pop(frame["id"]).set_result(frame)
            elif frame.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(json.dumps(frame["params"]["exceptionDetails"])[:2000])

    async def send(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        self.pending[msg_id] = asyncio.get_running_loop().create_future()
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        frame = await asyncio.wait_for(self.pending[msg_id], 30)
        assert "error" not in frame, f"{method}: {frame['error']}"
        return frame["result"]

    async def js(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def until(self, expression: str, what: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        text = await self.js("document.body ? document.body.innerText : ''")
        raise AssertionError(f"timed out waiting for {what}; the page says:\n{text}")

    async def screen(self, width: int, height: int, mobile: bool = False) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=mobile)

    async def screenshot(self, path: Path, width: int, mobile: bool = False) -> None:
        """The whole page at this width (the viewport grows to the page's height)."""
        await self.screen(width, 800, mobile)
        height = await self.js("Math.ceil(document.documentElement.scrollHeight)")
        await self.screen(width, int(height), mobile)
        await asyncio.sleep(0.3)  # one frame at the new size
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser-swarm")
    with ready_swarm(demo_pair(tmp, api_key=KEY), nodes=2) as daemons:
        yield daemons


def _save(shot: Path, name: str) -> None:
    if NOTES.is_dir():
        shutil.copy(shot, NOTES / name)


async def test_dashboard_shows_the_swarm_and_streams_a_chat(swarm, tmp_path):
    a, b = swarm
    browser = Chromium(tmp_path / "profile")
    try:
        await browser.start()
        await browser.screen(1280, 900)
        # the key in the address is traded for a cookie, then the page loads without it
        await browser.send("Page.navigate", url=f"{b.url}/?key={KEY}")
        await browser.until("location.search === '' && document.querySelectorAll('#nodes tr').length === 2",
                            "both nodes in the table")
        assert not browser.exceptions, browser.exceptions
        names = await browser.js("[...document.querySelectorAll('#nodes tr')].map(r => r.dataset.node)")
        assert sorted(names) == ["a", "b"]
        stages = await browser.js("[...document.querySelectorAll('#pipeline li.stage')].map(li => li.innerText)")
        assert [s.split("\n")[0].split()[0] for s in stages] == ["a", "b"], stages
        assert "layers 0–2" in stages[0] and "layers 3–4" in stages[1]
        assert (await browser.js("document.getElementById('cluster-pill').innerText")).startswith("OPEN")
        assert "model.layers.3-4" in await browser.js("document.getElementById('topology').value")

        await browser.js("document.getElementById('max-tokens').value = '48'; document.getElementById('chat-input').focus()")
        await browser.send("Input.insertText", text="Once upon a time")
        await browser.js("document.getElementById('chat-send').click()")
        text = await browser.until("(() => { const m = document.querySelector('.msg.assistant .meta');"
                                   " return m && document.querySelector('.msg.assistant .text').textContent; })()",
                                   "the streamed answer")
        assert text.startswith(", there was"), text
        meta = await browser.js("document.querySelector('.msg.assistant .meta').textContent")
        assert meta.startswith("48 tokens"), meta
        # the live feed brought the request's numbers without a reload
        await browser.until("document.getElementById('stat-served').textContent === '1'", "the request counted")
        await browser.until("document.getElementById('stat-sessions-sub').textContent === 'through this node'",
                            "every stage to report its session freed")
        assert not browser.exceptions, browser.exceptions

        desktop, phone = tmp_path / "dashboard.png", tmp_path / "dashboard-phone.png"
        await browser.screenshot(desktop, 1280)
        await browser.screenshot(phone, 390, mobile=True)
        assert desktop.read_bytes().startswith(b"\x89PNG") and phone.stat().st_size > 10_000
        _save(desktop, "dashboard.png")
        _save(phone, "dashboard-phone.png")

        # a swarm without its model source, or with a refused topology edit, says so (the same state, changed)
        banner = await browser.js("render({...state, source_present: false, topology_error: 'topo.yaml not applied: "
                                  "line 3: boom'}); document.getElementById('banners').innerText")
        assert "No model source" in banner and "line 3: boom" in banner
        # the node that plans, left alone with too small a budget, shows why there is no plan, live
        await browser.send("Page.navigate", url=f"{a.url}/?key={KEY}")
        await browser.until("document.querySelectorAll('#nodes tr').length === 2", "a's dashboard")
        await asyncio.to_thread(b.stop)
        banner = await browser.until("document.getElementById('banners').innerText.includes('No plan.')"
                                     " && document.getElementById('banners').innerText", "the plan error", 60)
        assert "does not fit" in banner
        assert await browser.js("document.querySelectorAll('#nodes tr').length") == 1
        await browser.screenshot(tmp_path / "dashboard-plan-error.png", 1280)
        _save(tmp_path / "dashboard-plan-error.png", "dashboard-plan-error.png")
        assert not browser.exceptions, browser.exceptions
    finally:
        await browser.close()
