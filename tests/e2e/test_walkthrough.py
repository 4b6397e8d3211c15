"""The README's five-minute walk-through, step by step, against the real binary: provision a device
with the CLI, publish with mosquitto_pub, read it back with the CLI, subscribe as an agency with
docs/examples/agency_subscribe.py. If this fails, README.md and docs/src/getting-started.md say
something untrue."""

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from support import wait_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs/examples/agency_subscribe.py"


def cli(gw, *args: str) -> str:
    """`citygw ARGS` as a person types it (table output), pointed at the test gateway."""
    proc = gw.cli_raw(*args, output_json=False)
    assert proc.returncode == 0, f"citygw {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def shown_once(text: str, label: str) -> str:
    m = re.search(rf"^{label}: (\S+)$", text, re.M)
    assert m, f"no '{label}:' line in:\n{text}"
    return m.group(1)


def publish(gw, secret: str, message: str) -> None:
    host, port = gw.mqtt_listen.rsplit(":", 1)
    subprocess.run(["mosquitto_pub", "-h", host, "-p", port, "-V", "mqttv5", "-q", "1",
                    "-i", "aq-0001", "-u", "aq-0001", "-P", secret,
                    "-t", "devices/aq-0001/telemetry", "-m", message],
                   check=True, timeout=30, capture_output=True)


def test_readme_walkthrough(gateway_factory):
    gw = gateway_factory()

    # 1. provision a device: the secret is shown once
    out = cli(gw, "device", "add", "aq-0001", "--tenant", "hanoi", "--kind", "air_quality",
              "--commune", "00004", "--lat", "21.0386", "--lon", "105.838")
    assert re.search(r"^aq-0001\s+hanoi\s+air_quality\s+00004\s+true", out, re.M), out
    secret = shown_once(out, "secret")

    # 2. publish as that device
    publish(gw, secret, '{"temp": 29.5, "hum": 78, "pm25": 41.2}')

    # 3. read it back: canonical names and default units, as the README prints them
    out = cli(gw, "readings", "aq-0001")
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    assert [(r[0], r[2], r[3], r[4], r[5]) for r in rows] == [
        ("1", "temperature", "29.5", "Cel", "mqtt"),
        ("2", "humidity", "78.0", "%RH", "mqtt"),
        ("3", "pm2_5", "41.2", "ug/m3", "mqtt"),
    ], out

    # 4. subscribe as an agency: the stored readings, then a live one
    out = cli(gw, "agency", "add", "environment", "--tenant", "hanoi", "--kind", "air_quality")
    assert re.search(r"^environment\s+hanoi\s+air_quality\s+false", out, re.M), out
    token = shown_once(out, "token")
    env = dict(os.environ, CITYGW_AGENCY_TOKEN=token)
    sub = subprocess.Popen([sys.executable, str(EXAMPLE), "--server", gw.grpc_url.removeprefix("http://"),
                            "--kind", "air_quality", "--count", "4"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(sub.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: len(lines) >= 3, timeout=60, desc="the stored readings in the subscription")
        assert lines == ["1 aq-0001 temperature 29.5 Cel\n", "2 aq-0001 humidity 78.0 %RH\n",
                         "3 aq-0001 pm2_5 41.2 ug/m3\n"], lines
        publish(gw, secret, '{"pm25": 38.0}')  # "publish again and the new readings appear"
        assert sub.wait(timeout=60) == 0, sub.stderr.read()
        reader.join(timeout=10)
        assert lines[3] == "4 aq-0001 pm2_5 38.0 ug/m3\n", lines
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
