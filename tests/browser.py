"""Open a page in headless Chromium (Debian's `chromium`) through the DevTools protocol: console errors,
uncaught exceptions and failed loads collected, a script's result, a full-page screenshot."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websocket

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1200,900"]


@dataclass
class PageVisit:
    errors: list[str] = field(default_factory=list)   # console errors, exceptions, failed requests
    result: object = None                             # what the check script returned
    screenshot: Path | None = None


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise RuntimeError("headless Chromium is needed for the page tests: install Debian's `chromium` package "
                           "(`make test` does when it can: apt-get as root or with sudo)")
    return found


def visit(path: Path, check_script: str, screenshot: Path, timeout: float = 60) -> PageVisit:
    """Load file `path`, wait for its load event, run `check_script` (an expression; its JSON value is returned)."""
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            return _drive(Path(profile), path.resolve().as_uri(), check_script, screenshot, timeout)
        finally:                     # Chromium and its helper processes: the whole process group
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _drive(profile: Path, url: str, check_script: str, screenshot: Path, timeout: float) -> PageVisit:
    deadline = time.monotonic() + timeout
    port_file = profile / "DevToolsActivePort"
    while not port_file.exists() or not port_file.read_text().strip():
        if time.monotonic() > deadline:
            raise TimeoutError("Chromium did not open its DevTools port")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    pages = [t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10))
             if t["type"] == "page"]
    ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
    visit, ids = PageVisit(), iter(range(1, 10_000))

    def note(event: dict) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            visit.errors.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            visit.errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                       for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            visit.errors.append(f"log: {params['entry']['text']}")
        elif method == "Network.loadingFailed":
            visit.errors.append(f"load failed: {params.get('errorText')}")

    def call(method: str, **params) -> dict:
        message_id = next(ids)
        ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(ws.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            note(message)

    def wait_for(event_name: str) -> None:
        while time.monotonic() < deadline:
            message = json.loads(ws.recv())
            note(message)
            if message.get("method") == event_name:
                return
        raise TimeoutError(f"no {event_name}")

    try:
        for domain in ("Runtime", "Log", "Page", "Network"):
            call(f"{domain}.enable")
        call("Page.navigate", url=url)
        wait_for("Page.loadEventFired")
        evaluated = call("Runtime.evaluate", expression=f"JSON.stringify({check_script})", returnByValue=True)
        if "exceptionDetails" in evaluated:
            visit.errors.append(f"check script: {evaluated['exceptionDetails'].get('text')}")
        else:
            visit.result = json.loads(evaluated["result"]["value"])
        shot = call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        visit.screenshot = screenshot
    finally:
        ws.close()
    return visit
