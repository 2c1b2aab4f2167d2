"""A page in headless Chromium, driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
JSON messages ending in NUL on file descriptors 3 and 4), so tests can run a report's script, change its
menus and read what it builds without a WebDriver or a websocket library."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _above_4(fd: int) -> int:
    """`fd` moved to a number above 4, so that the shell can put it on 3 or 4 without clobbering the other."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


class Page:
    """One tab with `url` loaded; `evaluate` runs JavaScript in it and returns the value (JSON-able)."""

    def __init__(self, url: str, profile: Path, timeout: float = 60.0):
        self.timeout = timeout
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        to_browser_r, from_browser_w = (_above_4(fd) for fd in (to_browser_r, from_browser_w))
        command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                   "--remote-debugging-pipe", "about:blank"]
        # bash (dash takes no descriptor above 9) moves the pipe ends onto 3 and 4, where Chromium looks for them
        shell = f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        try:
            self.proc = subprocess.Popen(["bash", "-c", shell, "bash", *command],
                                         pass_fds=(to_browser_r, from_browser_w),
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except BaseException:
            for fd in (self._to_browser, self._from_browser):
                os.close(fd)
            raise
        finally:
            os.close(to_browser_r)
            os.close(from_browser_w)
        self._buffer = b""
        self._id = 0
        self._session = None
        self._page_enabled = False
        try:
            target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.goto(url)
        except BaseException:
            self.close()
            raise

    def goto(self, url: str, session: str | None = None) -> None:
        """Load `url` and wait until the document (scripts included) has finished loading."""
        self._call("Page.navigate", {"url": url}, session=session)
        deadline = time.monotonic() + self.timeout
        scheme = url.split(":", 1)[0] + ":"
        while self.evaluate("document.readyState + ' ' + location.protocol", session) != f"complete {scheme}":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading")
            time.sleep(0.05)

    def open_tab(self, url: str) -> Tab:
        """A second tab of the same browser (the same storage) with `url` loaded."""
        target = self._call("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        tab = Tab(self, self._call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                   browser=True)["sessionId"])
        tab.goto(url)
        return tab

    def run_first(self, source: str) -> str:
        """Run `source` in every document loaded from now on, before the page's own scripts (in the
        order added); returns an id for `stop_running`."""
        if not self._page_enabled:
            self._call("Page.enable", {})
            self._page_enabled = True
        return self._call("Page.addScriptToEvaluateOnNewDocument", {"source": source})["identifier"]

    def stop_running(self, identifier: str) -> None:
        self._call("Page.removeScriptToEvaluateOnNewDocument", {"identifier": identifier})

    def press(self, key: str) -> None:
        """Press and release one key in the focused element, as a person types it: a letter (its
        character too) or 'Tab'."""
        code = key if len(key) > 1 else "Key" + key.upper()
        vk = 9 if key == "Tab" else ord(key.upper())
        self._call("Input.dispatchKeyEvent", {"type": "rawKeyDown", "key": key, "code": code,
                                              "windowsVirtualKeyCode": vk})
        if len(key) == 1:
            self._call("Input.dispatchKeyEvent", {"type": "char", "key": key, "text": key})
        self._call("Input.dispatchKeyEvent", {"type": "keyUp", "key": key, "code": code, "windowsVirtualKeyCode": vk})

    def downloads_to(self, folder: Path) -> None:
        """Save what the page downloads into `folder` (under the name the page gives it)."""
        self._call("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)}, browser=True)

    def evaluate(self, expression: str, session: str | None = None) -> Any:
        reply = self._call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression!r} threw: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def _call(self, method: str, params: dict, browser: bool = False, session: str | None = None) -> dict:
        """Send one command (to this tab once attached, to `session`'s, or to the browser) and wait for
        its answer."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if not browser and (session or self._session) is not None:
            message["sessionId"] = session or self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                    raise TimeoutError(f"no answer from Chromium to {method}")
                chunk = os.read(self._from_browser, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe (exit {self.proc.poll()})")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # events (no id) and other answers are skipped
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def close(self) -> None:
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Tab:
    """Another tab of a Page's browser (`Page.open_tab`)."""

    def __init__(self, page: Page, session: str):
        self.page, self.session = page, session

    def goto(self, url: str) -> None:
        self.page.goto(url, self.session)

    def evaluate(self, expression: str) -> Any:
        return self.page.evaluate(expression, self.session)
