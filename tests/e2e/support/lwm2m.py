"""tests/e2e/lwm2m/client.js, a real LwM2M 1.0 client (npm lwm2m-node-lib run with node), as a
subprocess: its events (registered, write, execute, ...) are read from its stdout as JSON lines,
commands (set, update, deregister) written to its stdin."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
from pathlib import Path

from . import Gateway

LWM2M_DIR = Path(__file__).resolve().parent.parent / "lwm2m"


class NodeClient:
    """tests/e2e/lwm2m/client.js (lwm2m-node-lib) as a subprocess; events from its stdout."""

    def __init__(self, gw: Gateway, endpoint: str, lifetime: int, temperature: float,
                 battery: int, queue_mode: bool = False):
        node = shutil.which("node")
        assert node, "node not installed (tests/run installs it)"
        assert (LWM2M_DIR / "node_modules" / "lwm2m-node-lib").is_dir(), \
            "run `npm ci` in tests/e2e/lwm2m (tests/run does)"
        self.proc = subprocess.Popen(
            [node, "client.js", gw.host, str(gw.coap_port), endpoint, str(lifetime),
             str(temperature), str(battery)] + (["queue"] if queue_mode else []),
            cwd=LWM2M_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                pass

    def expect(self, event: str, timeout: float = 20.0) -> dict:
        """The next event of that kind (events of other kinds before it are passed over)."""
        while True:
            try:
                e = self.events.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"lwm2m client: no {event!r} within {timeout}s") from None
            assert e.get("event") != "error", e
            if e.get("event") == event:
                return e

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def nothing(self, event: str, within: float) -> None:
        """Asserts that no event of that kind comes within `within` seconds."""
        try:
            while True:
                e = self.events.get(timeout=within)
                assert e.get("event") != event, f"lwm2m client: unexpected {e}"
        except queue.Empty:
            pass

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
