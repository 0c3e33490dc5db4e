"""Load a page in a real headless Chromium and report what a reader would see.

Chromium is driven through the DevTools protocol over its pipe transport (`--remote-debugging-pipe`:
commands on fd 3, replies on fd 4, each message JSON ending in a NUL byte), so no websocket client is
needed. The page is loaded from a file:// URL in a fresh profile with networking features off; the
result lists every console error, uncaught exception and failed load, and how each image and SVG
rendered.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def find_chromium() -> str | None:
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


@dataclass
class PageResult:
    title: str
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    # {alt, complete, width, height (natural), shown_width, shown_height, left, right (page pixels)}
    images: list[dict[str, Any]] = field(default_factory=list)
    page_width: int = 0  # the viewport's, without a scroll bar
    scroll_width: int = 0  # the page's: wider than page_width when something sticks out sideways
    svgs: int = 0
    text: str = ""
    screenshot: bytes | None = None


class _Pipe:
    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int) -> None:
        self.proc, self.to_browser, self.from_browser = proc, to_browser, from_browser
        self.next_id = 0
        self.buffer = b""
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read(max(0.1, deadline - time.monotonic())))
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout} s")

    def _read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited ({self.proc.poll()})")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)


_INSPECT = """(() => {
  const images = Array.from(document.images).map(img => ({
    alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
    shown_width: img.getBoundingClientRect().width, shown_height: img.getBoundingClientRect().height,
    left: img.getBoundingClientRect().left + window.scrollX, right: img.getBoundingClientRect().right + window.scrollX}));
  return JSON.stringify({title: document.title, images: images,
    page_width: document.documentElement.clientWidth, scroll_width: document.documentElement.scrollWidth,
    svgs: document.querySelectorAll('svg').length, text: document.body ? document.body.innerText : ''});
})()"""


def load_page(path: str, chromium: str, *, width: int = 1100, screenshot: bool = False, timeout: float = 60.0) -> PageResult:
    """Open `path` in headless Chromium, wait for its load event, and inspect it."""
    cmd_r, cmd_w = os.pipe()  # we write commands, Chromium reads them on fd 3
    out_r, out_w = os.pipe()  # Chromium writes replies on fd 4

    def child_fds() -> None:  # in the child, before exec: the two pipe ends become fds 3 and 4
        read_end, write_end = os.dup(cmd_r), os.dup(out_w)  # above 4, so neither dup2 clobbers the other
        os.dup2(read_end, 3)
        os.dup2(write_end, 4)

    with tempfile.TemporaryDirectory(prefix="potstill-chromium-") as profile:
        proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child_fds, close_fds=False,  # os.pipe fds are close-on-exec; 3 and 4 (dup2) are not
        )
        os.close(cmd_r)
        os.close(out_w)
        pipe = _Pipe(proc, cmd_w, out_r)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
            pipe.send("Page.navigate", {"url": "file://" + os.path.abspath(path)}, session=session)
            pipe.wait_event("Page.loadEventFired", timeout=timeout)
            inspected = pipe.send("Runtime.evaluate", {"expression": _INSPECT, "returnByValue": True}, session=session)
            value = json.loads(inspected["result"]["value"])
            result = PageResult(title=value["title"], images=value["images"], svgs=value["svgs"], text=value["text"],
                                page_width=value["page_width"], scroll_width=value["scroll_width"])
            if screenshot:
                import base64

                shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                                 session=session, timeout=timeout)
                result.screenshot = base64.b64decode(shot["data"])
            with contextlib.suppress(TimeoutError):  # let late messages (a deferred console error) arrive
                pipe.wait_event("never.happens", timeout=0.3)
            for event in pipe.events:
                method, params = event.get("method"), event.get("params", {})
                if method == "Runtime.exceptionThrown":
                    details = params.get("exceptionDetails", {})
                    result.errors.append("exception: " + str(details.get("exception", {}).get("description") or details.get("text")))
                elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    result.errors.append("console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
                elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                    entry = params["entry"]
                    result.errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
            return result
        finally:
            with contextlib.suppress(RuntimeError, TimeoutError, OSError):
                pipe.send("Browser.close", timeout=5)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(cmd_w)
            os.close(out_r)
