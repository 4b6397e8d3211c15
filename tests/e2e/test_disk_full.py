"""Disk full: the data dir on a small filesystem, filled under QoS 1 load.

A real size-limited filesystem (a tmpfs mounted with `size=`; root can mount one here and in CI),
no injected error. The gateway publishes through paho (MQTT 5) while ballast files take the space:

1. below the low-space watermark (`store.min_free_mb`) new readings are refused (PUBACK 0x80),
   `/readyz` says 503 and why, a registry write still goes in (the watermark's reserve);
2. with the filesystem completely full, a registry write fails in the storage engine itself
   (ENOSPC): fjall refuses every later write on that engine, `/readyz` names the failure;
3. ballast removed: within seconds, without a restart, the store reopens and PUBACKs are 0 again;
4. kill -9 and restart: every acknowledged reading is there exactly once, ids strictly increasing.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from support import CliError, wait_until

MOUNT_MB = 48
WATERMARK_MB = 6
TEXT = "x" * 2000  # ~2 KB per reading, so the space goes quickly


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={MOUNT_MB}m,mode=0700", "tmpfs",
                        str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> None:
    """Writes `path` until the filesystem has at most `leave` bytes free (0: completely full)."""
    chunk = b"\0" * (1 << 16)
    with open(path, "ab") as f:
        while free_bytes(path.parent) > leave:
            want = free_bytes(path.parent) - leave
            try:
                f.write(chunk[:max(1, min(len(chunk), want))])
                f.flush()
            except OSError:
                break
    if leave == 0:
        # The last partial pages: byte by byte until the filesystem says no.
        with open(path, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 512)
            except OSError:
                pass
            try:
                while True:
                    f.write(b"\0")
            except OSError:
                pass


def readyz(gw) -> tuple[int, str]:
    r = gw.http_get("/readyz")
    return r.status_code, r.text


def test_full_disk_refuses_then_recovers_without_restart(small_fs, gateway_factory):
    data = small_fs / "data"
    gw = gateway_factory(env={"CITYGW_DATA_DIR": str(data),
                              "CITYGW_STORE__MIN_FREE_MB": str(WATERMARK_MB)})
    dev = gw.add_device()
    client = gw.connected_client(dev, version=5)
    acked: set[int] = set()
    seq = 0

    def publish(n: int) -> list[int | None]:
        nonlocal seq
        codes = []
        for _ in range(n):
            seq += 1
            code = client.publish(dev.topic, json.dumps({"seq": seq, "vehicle_count": seq,
                                                         "note": TEXT}))
            codes.append(code)
            if code == 0:
                acked.add(seq)
        return codes

    assert publish(200) == [0] * 200
    assert readyz(gw)[0] == 200

    # 1. Below the watermark: readings refused early, readiness says why, the reserve still
    #    takes a registry write.
    fill(small_fs / "ballast-1", leave=(WATERMARK_MB << 20) * 3 // 4)
    # The writer looks at the free space at most every 250 ms.
    wait_until(lambda: publish(1) == [0x80], timeout=5, desc="the first refused PUBACK")
    codes = publish(20)
    assert set(codes) == {0x80}, codes
    status, text = readyz(gw)
    assert status == 503 and "free space" in text and "min_free_mb" in text, text
    assert gw.metric("citygw_store_writable") == 0
    assert gw.metric("citygw_store_refused_total", what="reading", reason="low_space") >= 20
    gw.add_device()
    assert not client.disconnected.is_set(), "an MQTT 5 client keeps its connection"

    # 2. Completely full: a registry write reaches the storage engine and fails (ENOSPC).
    fill(small_fs / "ballast-2", leave=0)
    failed = False
    for _ in range(50):
        try:
            gw.add_device()
        except CliError:
            failed = True
            break
    assert failed, "a registry write on a full filesystem should fail"
    assert gw.metric("citygw_store_commit_errors_total") >= 1
    status, text = readyz(gw)
    assert status == 503 and "storage engine failed" in text, text
    assert set(publish(10)) == {0x80}

    # 3. Space freed: the store reopens by itself, readiness and PUBACKs come back.
    (small_fs / "ballast-1").unlink()
    (small_fs / "ballast-2").unlink()
    wait_until(lambda: readyz(gw)[0] == 200, timeout=15,
               desc="readiness back after space was freed")
    assert gw.metric("citygw_store_recoveries_total") >= 1
    assert gw.metric("citygw_store_writable") == 1
    assert publish(200) == [0] * 200
    gw.add_device()
    client.close()
    # The log says why, once per change of state, not once per refused message.
    log = gw.log_path.read_text()
    assert "store commit failed" in log and "store engine reopened" in log
    assert 1 <= log.count("store refuses new data") <= 4, log.count("store refuses new data")
    assert "reading not stored" not in log

    # 4. Nothing acknowledged is lost, nothing is doubled, ids only grow.
    gw.kill9()
    gw.start()
    stored = gw.readings(dev.id)
    seqs = [r["device_seq"] for r in stored if r["quantity"] == "vehicle_count"]
    assert len(seqs) == len(set(seqs)), "a reading stored twice"
    missing = acked - set(seqs)
    assert not missing, f"{len(missing)} acknowledged readings lost, e.g. {sorted(missing)[:5]}"
    ids = [r["id"] for r in sorted(stored, key=lambda r: r["id"])]
    assert len(ids) == len(set(ids))
    assert len(acked) >= 400
